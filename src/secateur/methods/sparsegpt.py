"""SparseGPT: choose the mask block by block and update the kept weights (OBS) to compensate.

H = (2/n)·XᵀX is the Hessian of the layer's squared reconstruction error. With U the upper
Cholesky factor of H⁻¹, pruning column j of a row costs w²/U_jj², and the best correction
of the columns after it is −(w/U_jj)·U[j, j+1:]. Columns are processed left to right in
blocks; inside a block the update is applied column by column, and the block's accumulated
error is applied to all later columns at once (one matmul, the "lazy batch" trick).

Mask groups (decision): the paper picks, in every block, the lowest fraction s over the whole
rows × block tile (`mask_scope="block"`), so rows end with different sparsities. Our default
`mask_scope="row"` picks per row, with the block's count chosen so that after the block ending
at column e every row has exactly floor(s·e) zeros: every row ends with exactly floor(s·cols)
zeros, the same comparison group as Wanda and STADE, which makes the methods comparable
weight for weight. "block" is also exact over the layer in the same cumulative way. The
target's own `scope` is not used: SparseGPT's groups are set by `mask_scope`. N:M picks the n
lowest of each group of m columns of a row when the update reaches the group's first column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import count_to_prune, mask_lowest
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

MASK_SCOPES = ("block", "row")
DAMP_RETRIES = 6  # each retry multiplies the damping by 10


@register
@dataclass
class SparseGPT:
    name: ClassVar[str] = "sparsegpt"
    needs: ClassVar[frozenset[str]] = frozenset({"gram"})

    blocksize: int = 128
    damp: float = 0.01
    mask_scope: str = "row"

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise SecateurError(f"sparsegpt: blocksize must be a positive integer, got {self.blocksize!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not self.damp >= 0:
            raise SecateurError(f"sparsegpt: damp must be >= 0 (0.01 is usual), got {self.damp!r}")
        if self.mask_scope not in MASK_SCOPES:
            raise SecateurError(
                f"sparsegpt: unknown mask_scope {self.mask_scope!r}; accepted: {', '.join(MASK_SCOPES)}"
            )

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        if target.kind not in ("unstructured", "nm"):
            raise SecateurError(f"unknown sparsity kind {target.kind!r}; accepted: nm, unstructured")
        if stats.gram is None or stats.count == 0:
            raise SecateurError("sparsegpt needs the input Gram matrix of at least one calibration token")
        rows, cols = weight.shape
        W = weight.detach().to(torch.float32).clone()

        H = stats.gram.to(torch.float64) * (2.0 / stats.count)
        # A column that never fires carries no information: prune-for-free and keep H invertible.
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        U = inverse_cholesky_upper(H, self.damp).to(torch.float32)

        nm = target.kind == "nm"
        blocksize = -(-self.blocksize // target.m) * target.m if nm else self.blocksize
        s = target.sparsity
        for start in range(0, cols, blocksize):
            end = min(start + blocksize, cols)
            Wb = W[:, start:end].clone()
            Ub = U[start:end, start:end]
            d2 = torch.diagonal(Ub).square()
            pruned = torch.zeros_like(Wb, dtype=torch.bool)
            if not nm:
                score = Wb.square() / d2
                if self.mask_scope == "row":
                    k = count_to_prune(s, end) - count_to_prune(s, start)
                    pruned = mask_lowest(score, k)
                else:
                    k = count_to_prune(s, rows * end) - count_to_prune(s, rows * start)
                    pruned = mask_lowest(score.reshape(1, -1), k).reshape(score.shape)
            Q = torch.empty_like(Wb)
            Err = torch.empty_like(Wb)
            for j in range(end - start):
                if nm and j % target.m == 0:
                    group = slice(j, j + target.m)
                    pruned[:, group] = mask_lowest(Wb[:, group].square() / d2[group], target.n)
                w = Wb[:, j]
                q = w.masked_fill(pruned[:, j], 0.0)
                err = (w - q) / Ub[j, j]
                # Column j itself becomes ~0 where pruned; q keeps the exact values.
                Wb[:, j:] -= err.unsqueeze(1) * Ub[j, j:].unsqueeze(0)
                Q[:, j] = q
                Err[:, j] = err
            W[:, start:end] = Q
            W[:, end:] -= Err @ U[start:end, end:]
        return PruneResult(W)


def inverse_cholesky_upper(H: torch.Tensor, damp: float, method: str = "sparsegpt") -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), raising λ tenfold on failure.

    Shared with the structured methods (Putri's neuron scores); `method` names the option to
    raise in the error message.
    """
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    factor = damp
    for _ in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + factor * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        factor = factor * 10 if factor > 0 else 1e-4  # damp=0 still gets a chance to recover
    raise SecateurError(
        f"a layer's Hessian is singular (not positive definite even with damping {factor / 10:g} · mean "
        f"diagonal): use more calibration data or a larger {method} damp"
    )
