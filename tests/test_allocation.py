"""OWL: outlier ratios and the per-block sparsities derived from them."""

import pytest
import torch

from secateur.allocation import outlier_ratio, owl_sparsities
from secateur.errors import SecateurError


def test_outlier_ratio_hand_made():
    # 18 ones and 2 tens: mean = 38/20 = 1.9, threshold 5 → 9.5; only the two tens exceed it.
    block = torch.ones(20)
    block[3] = block[17] = 10.0
    assert outlier_ratio(block) == pytest.approx(2 / 20)
    # Threshold 6 → 11.4: nothing exceeds it.
    assert outlier_ratio(block, threshold=6.0) == 0.0


def test_outlier_ratio_pools_the_layers_of_a_block():
    # Layer a alone: mean 5.5, nothing above 27.5. Pooled with b (all zeros, 8 values): mean 1.1,
    # so 10 exceeds 5.5 and 1 does not: 1 outlier out of 10 scores.
    a = torch.tensor([1.0, 10.0])
    b = torch.zeros(2, 4)
    assert outlier_ratio([a]) == 0.0
    assert outlier_ratio([a, b]) == pytest.approx(1 / 10)


def test_owl_mean_order_and_range_on_symmetric_ratios():
    ratios = [0.01, 0.05, 0.03, 0.02, 0.04]  # equally spaced: midrange is the mean
    target, lam = 0.6, 0.08
    s = owl_sparsities(ratios, target, lam)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert min(s) == pytest.approx(target - lam) and max(s) == pytest.approx(target + lam)
    assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s)
    order_by_ratio = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order_by_ratio] == sorted(s, reverse=True)  # more outliers → lower sparsity


def test_owl_skewed_ratios_keep_mean_and_span():
    # One block full of outliers: the mapped values are [t+λ, t+λ, t+λ, t−λ], mean t+λ/2, so the
    # shift moves everything down by λ/2; the span stays 2λ and the mean is the target.
    target, lam = 0.5, 0.08
    s = owl_sparsities([0.01, 0.01, 0.01, 0.09], target, lam)
    assert sum(s) / 4 == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam)
    assert s[3] == pytest.approx(target - 1.5 * lam)
    assert s[0] == s[1] == s[2] == pytest.approx(target + 0.5 * lam)


def test_owl_equal_ratios_give_uniform_target():
    assert owl_sparsities([0.2, 0.2, 0.2], 0.5) == [0.5, 0.5, 0.5]
    assert owl_sparsities([0.1, 0.3], 0.5, lam=0.0) == [0.5, 0.5]


def test_owl_clips_to_valid_sparsity_and_keeps_the_mean():
    # Unclipped this is [0.10, -0.06]; clipping alone gave [0.10, 0.0], a mean of 0.05 for a 0.02 target.
    s = owl_sparsities([0.0, 1.0], 0.02, lam=0.08)
    assert s == [pytest.approx(0.04), 0.0]
    s = owl_sparsities([0.0, 5.0, 5.0, 5.0, 5.0], 0.9, lam=0.08)  # the shift pushes block 0 past 0.99
    assert max(s) == pytest.approx(0.99) and sum(s) / len(s) == pytest.approx(0.9, abs=1e-12)


@pytest.mark.parametrize(
    ("ratios", "target", "lam"),
    [([0.1, 0.2], 1.0, 0.08), ([0.1, 0.2], -0.1, 0.08), ([0.1, 0.2], 0.5, -0.01), ([], 0.5, 0.08)],
)
def test_owl_rejects_bad_input(ratios, target, lam):
    with pytest.raises(SecateurError):
        owl_sparsities(ratios, target, lam)
