"""STADE: score |W_ij| · σ_j and fold the pruned weights' mean contribution into the bias.

With inputs x_j = μ_j + (x_j − μ_j), a pruned weight's loss splits into a constant part
W_ij·μ_j, which the bias can absorb exactly, and a fluctuating part whose size is |W_ij|·σ_j;
so the score only needs σ_j (population std) and the bias gets
    b_i += Σ_j W_ij · M_ij · μ_j        (M_ij = 1 where pruned),
computed from the weights *before* zeroing (the released code zeroes first, so its
correction is always 0). The mean output over the calibration data is then unchanged.

`layers="out"` is the reference's split variant: STADE only on the layers that write into
the residual stream (o_proj, down_proj, ...), whose inputs — attention outputs, FFN
activations — have large per-channel means for the bias to absorb; Wanda (same mask, no
bias) on the layers fed by a normalisation, where the mean is small and ‖X_:,j‖ ranks
better. On Llama it beats Wanda where STADE on every layer does not. The adapter, through
the engine's `LayerInfo`, says which layer is which; only the "out" layers get a bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods._scores import wanda_scores
from secateur.methods.base import LayerInfo, PruneResult, SparsityTarget, register
from secateur.roles import ROLE_OUT
from secateur.stats import LinearStats

LAYERS = ("all", "out")


@register
@dataclass
class Stade:
    name: ClassVar[str] = "stade"
    needs: ClassVar[frozenset[str]] = frozenset({"sum", "sumsq"})  # Wanda's Σx² is among them
    takes_layer_info: ClassVar[bool] = True

    layers: str = "all"  # "all": STADE everywhere; "out": STADE on "out" layers, Wanda on the rest

    def __post_init__(self) -> None:
        if self.layers not in LAYERS:
            raise SecateurError(f"stade: unknown layers {self.layers!r}; accepted: {', '.join(LAYERS)}")

    def prune(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LinearStats,
        target: SparsityTarget,
        layer: LayerInfo | None = None,
    ) -> PruneResult:
        if self.layers == "out":
            if layer is None:
                raise SecateurError("stade: layers='out' needs each layer's role (LayerInfo), which the engine gives")
            if layer.role != ROLE_OUT:  # exactly Wanda: its score, its mask, the bias left alone
                return PruneResult(weight.masked_fill(prune_mask(wanda_scores(weight, stats), target), 0.0))
        std = stats.variance().sqrt().to(torch.float32)
        mask = prune_mask(weight.abs().float() * std, target)
        # float64: the correction is a sum of many products of possibly large, cancelling terms.
        removed = weight.double() * mask
        new_bias = removed @ stats.mean().double()
        if bias is not None:
            new_bias += bias.double()
        # Always a bias, so a layer without one gets one.
        return PruneResult(weight.masked_fill(mask, 0.0), new_bias.to(torch.float32))
