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
target's own `scope` is not used: SparseGPT's groups are set by `mask_scope`, unless the target
carries per-row counts (TRIM): then row i ends with exactly row_counts[i] zeros, cumulatively as
in "row". N:M picks the n lowest of each group of m columns of a row when the update reaches the
group's first column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import count_to_prune, mask_lowest, mask_lowest_per_row, row_counts_tensor
from secateur.methods._linalg import inverse_cholesky_upper, layer_hessian
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

MASK_SCOPES = ("block", "row")


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
        H, dead = layer_hessian(stats, "sparsegpt")
        rows, cols = weight.shape
        W = weight.detach().to(torch.float32).clone()
        W[:, dead] = 0.0  # a column that never fires is pruned for free
        U = inverse_cholesky_upper(H, self.damp).to(torch.float32)

        nm = target.kind == "nm"
        row_counts = None if nm or target.row_counts is None else row_counts_tensor(target, rows, cols)
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
                if row_counts is not None:  # TRIM's per-row counts, spread over the blocks like floor(s·e)
                    pruned = mask_lowest_per_row(score, row_counts * end // cols - row_counts * start // cols)
                elif self.mask_scope == "row":
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
