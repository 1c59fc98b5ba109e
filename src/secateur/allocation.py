"""OWL (outlier-weighted layerwise sparsity): give blocks with more outlier weights less sparsity.

Pure functions: in a first dense pass the engine hands each block's weights and input
statistics to `block_outlier_ratio` (Wanda scores → fraction of outliers), then asks
`owl_sparsities` for the per-block sparsities to prune with. OWL counts outliers of the
Wanda score whatever method then prunes, as the OWL paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from secateur.errors import SecateurError
from secateur.methods._scores import wanda_scores
from secateur.stats import LinearStats

# Statistics the first pass must gather for `block_outlier_ratio` (those of Wanda's score).
OWL_NEEDS = frozenset({"sumsq"})
OWL_MAX_SPARSITY = 0.99  # no block is emptied: its output would be its bias alone


def block_outlier_ratio(layers: Sequence[tuple[torch.Tensor, LinearStats]], threshold: float = 5.0) -> float:
    """OWL's outlier ratio of one block from its layers' (weight, input statistics) pairs."""
    return outlier_ratio([wanda_scores(weight, stats) for weight, stats in layers], threshold)


def outlier_ratio(scores: list[torch.Tensor] | torch.Tensor, threshold: float = 5.0) -> float:
    """Fraction of a block's scores larger than `threshold` × their mean, all its layers pooled.

    The pooled mean is computed from per-tensor sums, so the layers are never concatenated
    (a block's scores can be hundreds of MB).
    """
    tensors = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    if not tensors or sum(t.numel() for t in tensors) == 0:
        raise SecateurError("outlier_ratio needs at least one score")
    if not threshold > 0:
        raise SecateurError(f"outlier threshold must be > 0 (OWL uses 5), got {threshold}")
    total = sum(t.numel() for t in tensors)
    mean = sum(t.double().sum().item() for t in tensors) / total
    above = sum(int((t.double() > threshold * mean).sum().item()) for t in tensors)
    return above / total


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsities: outlier ratios mapped linearly, reversed, onto a span of 2·lam.

    The block with the most outliers gets target − lam and the one with the fewest target + lam;
    then all are shifted so their mean is exactly `target`. The shift moves the range unless the
    ratios are symmetric around their midrange, so values lie within target ± 2·lam·(1 − 1/L)
    (L = number of blocks), not always within target ± lam. Equal ratios give the uniform target.
    Values outside [0, 0.99] are clipped and the difference is spread over the blocks that are
    not clipped, repeatedly, so the mean is exactly `target` in every case (the reference code
    does not clip, and hands out sparsities above 1 there). Recipes keep target ± lam inside
    [0, 0.99], so this only trims the shift's overhang.
    """
    values = [float(r) for r in ratios]
    if not values:
        raise SecateurError("owl_sparsities needs at least one block's outlier ratio")
    if not all(math.isfinite(r) for r in values):
        raise SecateurError(f"outlier ratios must be finite numbers, got {values}")
    if not 0.0 <= target < 1.0:
        raise SecateurError(f"OWL target sparsity must be in [0, 1), got {target}")
    if not lam >= 0.0:
        raise SecateurError(f"OWL lambda must be >= 0 (0.08 is usual), got {lam}")
    low, high = min(values), max(values)
    if high == low or lam == 0.0:
        return [target] * len(values)
    mapped = [target + lam - 2.0 * lam * (r - low) / (high - low) for r in values]
    shift = target - sum(mapped) / len(mapped)
    return _clip_keeping_mean([v + shift for v in mapped], target)


def _clip_keeping_mean(values: list[float], target: float) -> list[float]:
    clipped = values
    for _ in range(len(values)):
        clipped = [min(max(v, 0.0), OWL_MAX_SPARSITY) for v in values]
        excess = target * len(values) - sum(clipped)
        free = [i for i, v in enumerate(clipped) if (v < OWL_MAX_SPARSITY if excess > 0 else v > 0.0)]
        if abs(excess) < 1e-12 or not free:
            break
        values = [v + excess / len(free) if i in free else v for i, v in enumerate(clipped)]
    return clipped
