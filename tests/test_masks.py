"""prune_mask: exact counts in every comparison group, N:M patterns, deterministic ties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateur.errors import SecateurError
from secateur.masks import count_to_prune, prune_mask
from secateur.methods.base import SparsityTarget


def test_row_scope_removes_exactly_floor_per_row_and_the_lowest():
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0], [0.1, 0.5, 0.3, 0.2, 0.4]])
    mask = prune_mask(scores, SparsityTarget.unstructured(0.5))  # floor(2.5) = 2 per row
    expected = torch.tensor([[False, True, False, True, False], [True, False, False, True, False]])
    assert torch.equal(mask, expected)


def test_layer_scope_uses_one_threshold_for_the_matrix():
    scores = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    mask = prune_mask(scores, SparsityTarget.unstructured(0.5, scope="layer"))
    # The three lowest of the whole matrix all sit in row 0.
    assert torch.equal(mask, torch.tensor([[True, True, True], [False, False, False]]))


def test_ties_remove_lower_indices_first():
    scores = torch.ones(3, 8)
    mask = prune_mask(scores, SparsityTarget.unstructured(0.25))
    assert torch.equal(mask, torch.tensor([[True, True] + [False] * 6] * 3))
    flat = prune_mask(scores, SparsityTarget.unstructured(0.25, scope="layer"))
    assert flat.flatten().nonzero().flatten().tolist() == list(range(6))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern_in_every_group(n, m):
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    mask = prune_mask(scores, SparsityTarget.n_m(n, m))
    groups_mask = mask.reshape(16, -1, m)
    assert (groups_mask.sum(-1) == n).all()
    # Within each group the removed scores are the n lowest.
    groups = scores.reshape(16, -1, m)
    removed_max = groups.masked_fill(~groups_mask, -1.0).amax(-1)
    kept_min = groups.masked_fill(groups_mask, 2.0).amin(-1)
    assert (removed_max < kept_min).all()


def test_nm_differs_from_row_scope():
    # Row 0's lowest four scores are all in the first group of 4; 2:4 must still spread them.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0]])
    mask = prune_mask(scores, SparsityTarget.n_m(2, 4))
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_count_to_prune_is_robust_to_round_off():
    assert 0.29 * 100 < 29  # the float product falls just short
    assert count_to_prune(0.29, 100) == 29
    assert count_to_prune(0.5, 7) == 3
    assert count_to_prune(0.0, 7) == 0


@pytest.mark.parametrize(
    "target",
    [
        SparsityTarget.unstructured(1.5),
        SparsityTarget.unstructured(0.5, scope="column"),
        SparsityTarget("blocky", 0.5),
        SparsityTarget.n_m(2, 3),  # 3 does not divide 8
    ],
)
def test_bad_targets_raise(target):
    with pytest.raises(SecateurError):
        prune_mask(torch.rand(2, 8), target)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 24),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    coarse=st.booleans(),
)
def test_property_unstructured_counts_and_order(rows, cols, sparsity, seed, coarse):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols, generator=gen)
    if coarse:  # many ties
        scores = (scores * 3).floor()
    row_mask = prune_mask(scores, SparsityTarget.unstructured(sparsity))
    assert (row_mask.sum(1) == count_to_prune(sparsity, cols)).all()
    for r in range(rows):
        if row_mask[r].any() and (~row_mask[r]).any():
            assert scores[r][row_mask[r]].max() <= scores[r][~row_mask[r]].min()
    layer_mask = prune_mask(scores, SparsityTarget.unstructured(sparsity, scope="layer"))
    assert int(layer_mask.sum()) == count_to_prune(sparsity, rows * cols)
    if layer_mask.any() and (~layer_mask).any():
        assert scores[layer_mask].max() <= scores[~layer_mask].min()
    # Deterministic: same input, same mask.
    assert torch.equal(layer_mask, prune_mask(scores.clone(), SparsityTarget.unstructured(sparsity, "layer")))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
    seed=st.integers(0, 2**16),
)
def test_property_nm_exact_per_group(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = prune_mask(scores, SparsityTarget.n_m(n, m))
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
