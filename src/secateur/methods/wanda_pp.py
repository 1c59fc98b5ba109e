"""Wanda++ (Yang et al., ACL Findings 2025): Wanda's score plus a decoder block's own gradients,
then a short fit of the pruned block to the dense one.

Wanda scores a weight by |W_ij|·‖X_j‖₂, blind to how much the block's output depends on it.
Gradient scores (GBLM) see that, but need a backward pass through the whole model. Wanda++ takes
the gradient of a loss local to one decoder block ("regional"), so one block's backward pass on
one window at a time is enough, and repairs what pruning still breaks by a few optimiser steps
on that block alone ("regional optimisation", RO).

What the paper computes (arXiv 2503.04992). Sources: the loss, the score and α = 100 are the
paper's as its abstract and published summaries state them; the aggregation over windows, the
optimiser, 3e-7, M = 32, K = 5, 128 windows and the last re-pruning are the defaults of the
community reproduction the paper itself points to for code (github.com/TTTTTTris/wandaplus; the
authors could not release theirs), read to understand it, nothing copied:
  - regional loss of block l on calibration window n: L(X_n) = ‖f_l(X_n)‖₂, the ℓ2 norm of the
    block's output (the whole window's hidden states);
  - regional gradient score (RGS):  S_ij = (α·G_ij + ‖X_j‖₂)·|W_ij|,  α = 100, with G the
    gradient magnitude of L with respect to W aggregated over the N = 128 calibration windows as
    G = sqrt(Σ_n g_n² / N) (the reproduction's, and GBLM's ℓ2-over-samples aggregation; torchao's
    port averages |g_n| instead); the lowest scores go in each comparison group, as Wanda's;
  - regional optimisation: minimise the squared error (MSE) between the dense block's and the
    pruned block's outputs on the same inputs, with RMSprop at learning rate 3e-7, one step per
    window, on M = 32 windows drawn at random from the calibration set;
  - the loop, per block: K = 5 times (RGS prune, then RO), RO updating every weight of the block
    (pruned ones too), then a last RGS prune restores the sparsity; the pruned block's outputs
    are the next block's inputs.

α's balance depends on the calibration budget: ‖X_j‖₂ grows as the square root of the number of
calibration tokens while G, an average over windows, barely moves. α = 100 is the paper's for 128
windows of 2048 tokens (secateur's defaults); with far fewer tokens the gradient term dominates
(on the tiny test models, RGS alone then reconstructs worse than Wanda).

Here (`regional = True`: the engine, `secateur.engine.regional`, does the block-level passes):
  - gradients are taken once, on the dense block, over every calibration window; the mask is
    this file's `rgs_scores` over Wanda's statistics, in the target's groups (unstructured per
    row or per layer, N:M, TRIM's row counts);
  - RO runs `iterations` rounds of `ro_samples` random windows (one RMSprop step each, one
    optimiser for all rounds) with the mask held fixed: pruned weights get no gradient and stay
    exactly zero. Adaptation: the paper lets RO move pruned weights and prunes again; at
    lr 3e-7 RMSprop moves a weight by at most 10·lr per step (lr/√(1−0.99)), 4.8e-4 over the
    160 steps, well below a typical kept weight of a trained model, so the re-pruning zeroes
    the grown weights again and keeps nearly the same mask, leaving the kept weights fitted to
    a block that still had the grown ones. Holding the mask makes every step fit the block that
    is kept, and makes re-scoring between rounds a no-op (pruned weights score 0), so the K
    rounds are K·M steps of one fit and the gradients are not recomputed;
  - the fit is undone (with a warning) if it leaves the block's error on its windows higher than
    before it: a safeguard the paper does not have;
  - the error is a sum over the window, not a mean: RMSprop divides the gradient by its own
    running scale, so the two give the same steps, except that a mean over millions of entries
    brings gradients down towards RMSprop's ε = 1e-8.

Cost per block, in forward passes of one window (a backward ≈ 2 forwards), N calibration
windows: Wanda needs 2N (statistics, advance). Wanda++ needs 5N + 3U + 3K·min(M, N): the same
2N, 3N for the gradients, 3 forwards over the U ≤ min(N, K·M) windows RO uses (dense targets,
error before and after) and K·min(M, N) forward+backward steps. With the defaults and N = 128
(U ≈ 98): about 1410 against 256, 5.5× Wanda; with N = 32 (the P0 protocol) 736 against 64,
11.5× (measured: 12–14.5× Wanda's time, README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods.base import LayerInfo, PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

ALPHA = 100.0  # the paper's weight of the regional gradient against the activation norm
ITERATIONS = 5  # K: rounds of regional optimisation per block
RO_SAMPLES = 32  # M: calibration windows per round, drawn at random
RO_LR = 3e-7  # RMSprop's learning rate


def rgs_scores(weight: torch.Tensor, regional_grad: torch.Tensor, stats: LinearStats, alpha: float) -> torch.Tensor:
    """The regional gradient score (α·G_ij + ‖X_j‖₂)·|W_ij| as a float32 (out, in) matrix.
    α = 0 gives Wanda's score |W_ij|·‖X_j‖₂ exactly."""
    norm = stats.column_norm().to(torch.float32)
    return (alpha * regional_grad.to(torch.float32) + norm) * weight.abs().float()


@register
@dataclass
class WandaPP:
    name: ClassVar[str] = "wanda++"
    needs: ClassVar[frozenset[str]] = frozenset({"sumsq"})
    takes_layer_info: ClassVar[bool] = True
    regional: ClassVar[bool] = True

    alpha: float = ALPHA
    iterations: int = ITERATIONS  # 0: RGS pruning only, no regional optimisation
    ro_samples: int = RO_SAMPLES
    ro_lr: float = RO_LR

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha >= 0:
            raise SecateurError(f"wanda++: alpha must be >= 0 (the paper's is 100), got {self.alpha!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise SecateurError(f"wanda++: iterations must be an integer >= 0 (the paper's is 5), got "
                                f"{self.iterations!r}")
        if isinstance(self.ro_samples, bool) or not isinstance(self.ro_samples, int) or self.ro_samples < 1:
            raise SecateurError(f"wanda++: ro_samples must be an integer >= 1 (the paper's is 32), got "
                                f"{self.ro_samples!r}")
        if isinstance(self.ro_lr, bool) or not isinstance(self.ro_lr, int | float) or not self.ro_lr > 0:
            raise SecateurError(f"wanda++: ro_lr must be > 0 (the paper's is 3e-7), got {self.ro_lr!r}")

    def prune(self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget,
              layer: LayerInfo | None = None) -> PruneResult:
        if layer is None or layer.regional_grad is None:
            raise SecateurError("wanda++ scores weights with the block's regional gradients, which the sequential "
                                "engine computes for the methods that declare them; it cannot prune a lone layer")
        if layer.regional_grad.shape != weight.shape:
            raise SecateurError(f"wanda++: regional gradient of shape {tuple(layer.regional_grad.shape)} for a "
                                f"weight of shape {tuple(weight.shape)}")
        grad = layer.regional_grad.to(weight.device)
        mask = prune_mask(rgs_scores(weight, grad, stats, float(self.alpha)), target)
        return PruneResult(weight.masked_fill(mask, 0.0))
