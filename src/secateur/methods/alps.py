"""ALPS (Meng et al., NeurIPS 2024): solve the layer's reconstruction problem, then refit the weights kept.

    minimise ‖XWᵀ − XŴᵀ‖²  over Ŵ with the target's sparsity pattern (unstructured or N:M)

is solved by ADMM on the split Ŵ = D, D sparse, in coordinates where H = XᵀX has a unit
diagonal (B = W·diag(√H_jj), G = diag⁻½ H diag⁻½; in them the magnitude |B_ij| is Wanda's score
|W_ij|·‖X_:,j‖, and the scaling is the diagonal preconditioner of the final refit):

    B ← (B̂G − V + ρD)(G + ρI)⁻¹      exact minimiser of the augmented Lagrangian in B
    D ← projection of B + V/ρ onto the pattern (keep the largest magnitudes)
    V ← V + ρ(B − D)

starting from D = projection of the dense weights (Wanda's mask) and ρ = 0.1. The penalty ρ
grows on the paper's schedule, by how much the support moved in the last three iterations:
×1.3 when more than 10 % of the kept weights changed, ×1.2 above 0.5 %, ×1.1 for any change;
it stops when the support no longer moves (or moves by less than 0.03 % after iteration 30),
or after 300 iterations. If the support barely moves before ρ ever grew, ρ was too large
(ADMM stuck at the start): ρ is divided by 5 and the iterations restart. The support is then
that of the projected B, and the kept weights are refitted on it by conjugate gradients (10
iterations; G's unit diagonal makes this Jacobi-preconditioned CG), which solves the
least-squares problem on the fixed support that ADMM only approaches. `(G + ρI)⁻¹` comes from one
eigendecomposition of G, so a new ρ costs a matrix product, not a factorisation.

H is damped like SparseGPT's (λ = damp · mean diagonal, 0.01) and dead inputs (diag H = 0) are
pruned for free, as SparseGPT does. Cost: one (in × in) eigendecomposition plus two
(out × in × in) products per iteration and one (in)³ product per change of ρ: tens to a few
hundred SparseGPT-sized updates per layer, where SparseGPT does one.

Mask groups: `mask_scope="row"` (default) keeps floor(s·in) zeros in every row, like Wanda and
SparseGPT, so the methods compare weight for weight; `"layer"` projects over the whole matrix
as the paper does (floor(s·numel) zeros, rows uneven). N:M projects every group of m columns
of a row. A target with per-row counts (TRIM) is projected row by row with those counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods._linalg import conjugate_gradient_on_support, damped_hessian
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

MASK_SCOPES = ("layer", "row")
MAX_RHO = 1e6
# The paper's penalty schedule: (share of the kept weights whose support changed, factor on ρ).
RHO_STEPS = ((0.1, 1.3), (0.005, 1.2))
RHO_SMALL_CHANGE = 1.1  # any smaller change, once ρ has started growing
RHO_RESTART_DIVISOR = 5.0  # ρ too large from the start: ADMM would stay at the initial mask
SETTLED_SHARE = 0.0003  # after `switch_iter`, a support moving less than this is final


@register
@dataclass
class ALPS:
    name: ClassVar[str] = "alps"
    needs: ClassVar[frozenset[str]] = frozenset({"gram"})

    damp: float = 0.01
    rho: float = 0.1  # initial ADMM penalty, in the unit-diagonal coordinates
    max_iter: int = 300
    update_iter: int = 3  # ρ is revised every this many iterations
    switch_iter: int = 30  # from here on, a support moving less than 0.03 % ends ADMM
    cg_iter: int = 10
    mask_scope: str = "row"  # "row": floor(s·in) zeros per row, like SparseGPT; "layer": the paper's

    def __post_init__(self) -> None:
        for option in ("max_iter", "update_iter", "switch_iter", "cg_iter"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if option == "update_iter" else 0):
                raise SecateurError(f"alps: {option} must be a non-negative integer (update_iter >= 1), got {value!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not self.damp >= 0:
            raise SecateurError(f"alps: damp must be >= 0 (0.01 is usual), got {self.damp!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, int | float) or not 0 < self.rho <= MAX_RHO:
            raise SecateurError(f"alps: rho must be in (0, {MAX_RHO:g}] (the paper starts at 0.1), got {self.rho!r}")
        if self.mask_scope not in MASK_SCOPES:
            raise SecateurError(f"alps: unknown mask_scope {self.mask_scope!r}; accepted: {', '.join(MASK_SCOPES)}")

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        if target.kind == "unstructured" and target.row_counts is None:
            target = dataclasses.replace(target, scope=self.mask_scope)
        H, dead = self._damped_hessian(stats)
        scale = H.diagonal().sqrt()
        G64 = H / scale.unsqueeze(0) / scale.unsqueeze(1)
        eigenvalues, eigenvectors = (t.to(torch.float32) for t in torch.linalg.eigh(G64))
        G = G64.to(torch.float32)
        scale = scale.to(torch.float32)

        dense = weight.detach().to(torch.float32) * scale
        dense[:, dead] = 0.0
        dense_G = dense @ G  # B̂G, the right-hand side of every solve
        sparse, removed = self._admm(dense, dense_G, eigenvalues, eigenvectors, target)
        refit = conjugate_gradient_on_support(G, dense_G, sparse, ~removed, self.cg_iter)
        return PruneResult(refit / scale)

    def trim_scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """ALPS's first ranking, |W_ij|·√H_jj (Wanda's score, damped): TRIM's search prunes by it
        instead of running ALPS for every candidate allocation (secateur.trim)."""
        H, dead = self._damped_hessian(stats)
        return (weight.abs().float() * H.diagonal().sqrt().to(torch.float32)).masked_fill(dead, 0.0)

    def _damped_hessian(self, stats: LinearStats) -> tuple[torch.Tensor, torch.Tensor]:
        return damped_hessian(stats, self.damp, "alps")

    def _admm(self, dense, dense_G, eigenvalues, eigenvectors, target) -> tuple[torch.Tensor, torch.Tensor]:
        """ADMM's last B projected onto the pattern (the refit's start) and its mask (True = removed)."""
        def project(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            removed = prune_mask(values.abs(), target)
            return values.masked_fill(removed, 0.0), removed

        def inverse(rho: float) -> torch.Tensor:  # (G + ρI)⁻¹ from G's eigendecomposition
            return (eigenvectors / (eigenvalues + rho)) @ eigenvectors.T

        start, start_removed = project(dense)
        kept_count = max(int((~start_removed).sum()), 1)
        rho, grown = float(self.rho), False
        solve = inverse(rho)
        D, V, B = start, torch.zeros_like(dense), dense
        removed_before = start_removed
        for iteration in range(self.max_iter):
            B = (dense_G - V + rho * D) @ solve
            D, removed = project(B + V / rho)
            V += rho * (B - D)
            if (iteration + 1) % self.update_iter:
                continue
            changed = int((removed != removed_before).sum())
            removed_before = removed
            share = changed / kept_count
            factor = next((f for threshold, f in RHO_STEPS if share > threshold), None)
            if factor is not None:
                rho, grown = rho * factor, True
            elif changed and grown:
                rho *= RHO_SMALL_CHANGE
            elif grown:  # the support stopped moving: done
                break
            else:  # ρ too large from the start: lower it (and start again from the initial mask if it moved)
                rho /= RHO_RESTART_DIVISOR
                if changed:
                    D, V = start, torch.zeros_like(dense)
            rho = min(rho, MAX_RHO)
            solve = inverse(rho)
            if iteration >= self.switch_iter and share < SETTLED_SHARE:
                break
        return project(B)
