"""STADE: score |W_ij| · σ_j and fold the pruned weights' mean contribution into the bias.

With inputs x_j = μ_j + (x_j − μ_j), a pruned weight's loss splits into a constant part
W_ij·μ_j, which the bias can absorb exactly, and a fluctuating part whose size is |W_ij|·σ_j;
so the score only needs σ_j (population std) and the bias gets
    b_i += Σ_j W_ij · M_ij · μ_j        (M_ij = 1 where pruned),
computed from the weights *before* zeroing (the released code zeroes first, so its
correction is always 0). The mean output over the calibration data is then unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.masks import prune_mask
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats


@register
@dataclass
class Stade:
    name: ClassVar[str] = "stade"
    needs: ClassVar[frozenset[str]] = frozenset({"sum", "sumsq"})

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        std = stats.variance().sqrt().to(torch.float32)
        mask = prune_mask(weight.abs().float() * std, target)
        # float64: the correction is a sum of many products of possibly large, cancelling terms.
        removed = weight.double() * mask
        new_bias = removed @ stats.mean().double()
        if bias is not None:
            new_bias += bias.double()
        # Always a bias, so a layer without one gets one.
        return PruneResult(weight.masked_fill(mask, 0.0), new_bias.to(torch.float32))
