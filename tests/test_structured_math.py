"""Pure tensor math of the structured methods: Putri, FLAP, Wanda-SP, ShortGPT block drop."""

from __future__ import annotations

import math

import pytest
import torch

from secateur.errors import SecateurError
from secateur.methods.block_drop import block_influence, blocks_to_drop, cosine_sum
from secateur.methods.flap import (
    bias_compensation,
    fluctuation_scores,
    global_selection,
    group_scores,
    standardize,
)
from secateur.methods.putri import PutriBudget, ffn_neuron_scores, least_squares_refit, putri_budget, top_k
from secateur.methods.wanda_sp import channel_scores, column_scores, group_scores_from_channels, row_scores

# SmolLM2-135M: hidden 576, FFN 1536, 9 query heads, 3 KV heads, head_dim 64, 30 blocks.
HIDDEN, FFN, HEADS, KV, HEAD_DIM, BLOCKS = 576, 1536, 9, 3, 64, 30
P_MLP = 3 * HIDDEN * FFN  # gate, up, down
P_ATTN = 2 * HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV * HEAD_DIM  # q, o + k, v
P_GROUP = (2 * (HEADS // KV) + 2) * HEAD_DIM * HIDDEN  # 3 query heads in q and o, one k and v head
P_NEURON = 3 * HIDDEN


def smollm_budget(sparsity: float) -> PutriBudget:
    return putri_budget(BLOCKS, sparsity, P_MLP, P_ATTN, P_GROUP, KV, FFN, P_NEURON)


# ---------------------------------------------------------------- Putri budget


def test_putri_budget_smollm2_hand_computed():
    # P_mlp = 2,654,208; P_attn = 884,736: ratio 3, /1.5 = 2 → n_attn = round(30 · 0.3²) = round(2.7) = 3
    # → 9 KV groups of 294,912 params = 2,654,208. Target 0.3 · 30 · 3,538,944 = 31,850,496; the
    # FFNs lose 29,196,288 / (30 · 1728) = 563.2 neurons each → keep round(972.8) = 973.
    assert P_MLP == 2_654_208 and P_ATTN == 884_736 and P_GROUP * KV == P_ATTN
    assert smollm_budget(0.3) == PutriBudget(heads_groups_to_remove=9, ffn_keep=973)


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.5, 0.7])
def test_putri_budget_meets_target_within_one_neuron_per_block(sparsity):
    budget = smollm_budget(sparsity)
    removed = budget.heads_groups_to_remove * P_GROUP + BLOCKS * (FFN - budget.ffn_keep) * P_NEURON
    target = sparsity * BLOCKS * (P_MLP + P_ATTN)
    assert abs(removed - target) <= BLOCKS * P_NEURON
    assert budget.heads_groups_to_remove <= BLOCKS * (KV - 1)


def test_putri_budget_zero_sparsity_and_group_cap():
    assert smollm_budget(0.0) == PutriBudget(0, FFN)
    # a single KV group per block can never go: the whole budget goes to the FFNs
    budget = putri_budget(4, 0.5, 300, 100, 100, 1, 100, 3)
    assert budget.heads_groups_to_remove == 0
    assert budget.ffn_keep == round(100 - 0.5 * 4 * 400 / (4 * 3))
    # cap at L · (groups − 1): s^(ratio/α) close to 1 would otherwise take every group
    # (α = 10: round(2 · 0.5^0.1) = 2 modules → 4 groups, capped at 2; FFNs lose 1000 / 20 = 50)
    capped = putri_budget(2, 0.5, 1000, 1000, 500, 2, 100, 10, alpha=10.0)
    assert capped == PutriBudget(heads_groups_to_remove=2, ffn_keep=50)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_putri_budget_refuses_bad_sparsity(sparsity):
    with pytest.raises(SecateurError, match=r"\[0, 1\)"):
        smollm_budget(sparsity)


def test_putri_budget_refuses_unreachable_target():
    # attention cannot shrink (1 group) and FFNs hold only 60 of 260 params: 90% is out of reach
    with pytest.raises(SecateurError, match="at most"):
        putri_budget(2, 0.9, 30, 100, 100, 1, 10, 3)


# ---------------------------------------------------------------- Putri neuron scores


def test_ffn_neuron_scores_diagonal_hessian_hand_computed():
    # H = diag(d): U = chol(H⁻¹) upper is diag(1/√d), so s_j = d_j · Σ_r c_r W_rj².
    W = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.0]])
    d = torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64)
    c = torch.tensor([1.0, 0.5], dtype=torch.float64)
    scores = ffn_neuron_scores(W, torch.diag(d), c, damp=0.0)
    expected = d * torch.tensor([1 + 0.5 * 9, 4 + 0.5 * 1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    assert int(scores.argmin()) == 2  # the neuron with zero weights scores lowest


def test_ffn_neuron_scores_output_energy_reorders():
    # neuron 0 writes to output 0, neuron 1 to output 1, with equal inputs: the energies decide
    W = torch.tensor([[2.0, 0.1], [0.1, 1.0]])
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    gram = X.T @ X
    low_0 = ffn_neuron_scores(W, gram, torch.tensor([1.0, 1.0], dtype=torch.float64))
    high_1 = ffn_neuron_scores(W, gram, torch.tensor([1.0, 100.0], dtype=torch.float64))
    assert low_0[0] > low_0[1]
    assert high_1[1] > high_1[0]


def test_ffn_neuron_scores_dead_and_correlated_columns_are_finite():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    X[:, 1] = 0.0  # a dead neuron
    X[:, 3] = X[:, 2]  # two identical neurons: H singular without damping
    W = torch.randn(3, 4, generator=gen)
    scores = ffn_neuron_scores(W, X.T @ X, torch.ones(3, dtype=torch.float64), damp=0.0)
    assert torch.isfinite(scores).all()
    assert scores[1] == 0 and scores.dtype == torch.float64


def test_ffn_neuron_scores_refuses_bad_shapes():
    with pytest.raises(SecateurError, match="gram"):
        ffn_neuron_scores(torch.ones(2, 3), torch.eye(2), torch.ones(2))
    with pytest.raises(SecateurError, match="out_energy"):
        ffn_neuron_scores(torch.ones(2, 3), torch.eye(3), torch.ones(3))


# ---------------------------------------------------------------- Putri refit and top-k


def _correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.8 * torch.randn(
        cols, cols, generator=gen, dtype=torch.float64
    )
    return base @ mix


def test_least_squares_refit_recovers_known_weight():
    X = _correlated_inputs(200, 8, seed=2)
    keep = torch.tensor([0, 2, 3, 6, 7])
    W_true = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Y = X[:, keep] @ W_true.T
    gram, cross = X.T @ X, X.T @ Y
    torch.testing.assert_close(least_squares_refit(gram, cross, keep, damp=0.0), W_true, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(least_squares_refit(gram, cross, keep), W_true, atol=1e-4, rtol=1e-4)


def test_least_squares_refit_beats_column_dropping():
    X = _correlated_inputs(300, 10, seed=4)
    W = torch.randn(6, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Y = X @ W.T
    keep = torch.tensor([1, 2, 4, 5, 8, 9])
    refit = least_squares_refit(X.T @ X, X.T @ Y, keep)
    assert refit.shape == (6, 6)
    err_refit = (X[:, keep] @ refit.T - Y).square().sum()
    err_drop = (X[:, keep] @ W[:, keep].T - Y).square().sum()
    assert err_refit < 0.5 * err_drop


def test_least_squares_refit_refuses_bad_keep():
    with pytest.raises(SecateurError, match="keep"):
        least_squares_refit(torch.eye(3), torch.ones(3, 2), torch.tensor([0, 3]))
    with pytest.raises(SecateurError, match="keep"):
        least_squares_refit(torch.eye(3), torch.ones(3, 2), torch.tensor([True, False, True]))


def test_top_k_sorted_and_ties_to_lower_index():
    scores = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0, 0.1])
    assert top_k(scores, 3).tolist() == [1, 2, 3]
    assert top_k(scores, 0).tolist() == []
    assert top_k(scores, 6).tolist() == list(range(6))
    assert top_k(scores, 3).dtype == torch.long
    with pytest.raises(SecateurError, match="k must"):
        top_k(scores, 7)


# ---------------------------------------------------------------- FLAP


def test_fluctuation_and_group_scores_hand_computed():
    W = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 3.0, 0.0, 1.0]])
    var = torch.tensor([2.0, 1.0, 0.5, 0.0])
    scores = fluctuation_scores(var, W)
    assert scores.tolist() == [4.0, 9.0, 2.0, 0.0]
    groups = group_scores(scores, [torch.tensor([0, 1]), torch.tensor([2, 3])])
    assert groups.tolist() == [6.5, 1.0]


def test_standardize():
    z = standardize(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert standardize(torch.full((4,), 7.0)).tolist() == [0.0] * 4
    assert standardize(torch.tensor([3.0])).tolist() == [0.0]


def test_global_selection_lowest_scores_min_keep_and_target():
    heads = torch.tensor([-1.5, -1.4, 0.2])  # cost 10 each, one must stay
    channels = torch.tensor([0.1, -2.0, 1.0, -0.5, 0.0])  # cost 3 each
    units = [(heads, 10), (channels, 3)]

    def removed(keep):
        return sum((~k).sum().item() * c for k, (_, c) in zip(keep, units, strict=True))

    # ascending: ch1 −2.0 (3), h0 −1.5 (13), h1 −1.4 would reach 23 > 20 + 1.5: passed over;
    # ch3 −0.5 (16), ch4 0.0 (19): within 1.5 of 20, stop
    keep = global_selection(units, 20, [1, 0])
    assert keep[0].tolist() == [False, True, True]
    assert keep[1].tolist() == [True, False, True, False, False]
    assert abs(removed(keep) - 20) <= 1.5
    # 23: h1 fits exactly after ch1 and h0
    keep = global_selection(units, 23, [1, 0])
    assert keep[0].tolist() == [False, False, True]
    assert keep[1].tolist() == [True, False, True, True, True]
    # 35: h2 (0.2) must stay (min_keep 1): every channel goes, then the target is met
    keep = global_selection(units, 35, [1, 0])
    assert keep[0].tolist() == [False, False, True]
    assert not keep[1].any()
    assert all(k.sum() >= m for k, m in zip(keep, [1, 0], strict=True))
    assert global_selection(units, 0, [1, 0])[1].all()
    # one kind of unit: the closest multiple of its cost (10 for 12, 20 for 16)
    assert (~global_selection([(heads, 10)], 12, [0])[0]).sum() == 1
    assert (~global_selection([(heads, 10)], 16, [0])[0]).sum() == 2


def test_global_selection_refuses_impossible_and_is_deterministic():
    units = [(torch.zeros(4), 5), (torch.zeros(4), 5)]
    with pytest.raises(SecateurError, match="at most 30"):
        global_selection(units, 31, [1, 1])
    first = global_selection(units, 12, [1, 1])
    # 12 with units of 5: two units (10) are closer than three (15)
    assert [k.tolist() for k in first] == [[False, False, True, True], [True, True, True, True]]
    assert [k.tolist() for k in global_selection(units, 12, [1, 1])] == [k.tolist() for k in first]


def test_bias_compensation_keeps_mean_output():
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(100, 6, generator=gen, dtype=torch.float64) + torch.arange(6, dtype=torch.float64)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    removed = torch.tensor([False, True, False, True, True, False])
    mean = X.mean(0)
    b = bias_compensation(W, mean, removed)
    kept = ~removed
    torch.testing.assert_close(W[:, kept] @ mean[kept] + b, W @ mean)
    torch.testing.assert_close((X[:, kept] @ W[:, kept].T + b).mean(0), (X @ W.T).mean(0))


# ---------------------------------------------------------------- Wanda-SP


def test_wanda_sp_scores_hand_computed():
    # 2 neurons, hidden 3: gate/up (2, 3) read x with norms [1, 2, 3]; down (3 outputs, 2 inputs)
    gate = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, 1.0]])
    up = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    hidden_norm = torch.tensor([1.0, 2.0, 3.0])
    down = torch.tensor([[1.0, 0.0], [-2.0, 1.0], [0.0, 3.0]])
    neuron_norm = torch.tensor([0.5, 2.0])
    assert row_scores(gate, hidden_norm).tolist() == [3.0, 7.0]
    assert row_scores(up, hidden_norm).tolist() == [3.0, 1.0]
    assert column_scores(down, neuron_norm).tolist() == [1.5, 8.0]
    assert channel_scores([gate, up], hidden_norm, down, neuron_norm).tolist() == [7.5, 16.0]
    assert channel_scores([], hidden_norm, down, neuron_norm).tolist() == [1.5, 8.0]
    with pytest.raises(SecateurError, match="rows"):
        channel_scores([gate.T], hidden_norm, down, neuron_norm)


def test_wanda_sp_group_scores_from_channels():
    q = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 2 groups of 2 query rows
    k = torch.tensor([10.0, 20.0])
    o_cols = torch.tensor([0.5, 0.5, 1.0, 1.0])
    rows = [[torch.tensor([0, 1]), torch.tensor([2, 3])], [torch.tensor([0]), torch.tensor([1])]]
    cols = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    scores = group_scores_from_channels([q, k], rows, o_cols, cols)
    assert scores.tolist() == [1 + 2 + 10 + 1.0, 3 + 4 + 20 + 2.0]


# ---------------------------------------------------------------- ShortGPT block drop


def test_cosine_sum_and_block_influence_hand_computed():
    h_in = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    h_out = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [0.0, -1.0]]])
    total = cosine_sum(h_in, h_out)  # 0 + 1 − 1
    assert math.isclose(total, 0.0, abs_tol=1e-12)
    h_out[0, 2] = torch.tensor([1.0, 1.0])  # cos 45° = √½
    total = cosine_sum(h_in, h_out)
    assert math.isclose(total, 1 + math.sqrt(0.5), rel_tol=1e-12)
    assert math.isclose(block_influence(total, 3), 1 - (1 + math.sqrt(0.5)) / 3, rel_tol=1e-12)
    assert cosine_sum(torch.zeros(2, 4), torch.ones(2, 4)) == 0.0
    with pytest.raises(SecateurError, match="count"):
        block_influence(1.0, 0)


def test_blocks_to_drop_lowest_sorted():
    influences = [0.3, 0.05, 0.2, 0.05, 0.9]
    assert blocks_to_drop(influences, 3) == [1, 2, 3]
    assert blocks_to_drop(influences, 1) == [1]
    assert blocks_to_drop(influences, 0) == []
    with pytest.raises(SecateurError, match="at least one must"):
        blocks_to_drop(influences, 5)
