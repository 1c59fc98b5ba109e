"""Which weights to remove, given their scores: one pure function for every metric method.

Ties are broken deterministically: among equal scores the one with the lower index (column,
or flat position for scope "layer") is removed first. A stable sort gives that for free,
which `topk` does not promise, so the same model always gets the same mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from secateur.errors import SecateurError

if TYPE_CHECKING:  # a runtime import would be circular: the methods package imports this module
    from secateur.methods.base import SparsityTarget


def count_to_prune(sparsity: float, size: int) -> int:
    """floor(sparsity · size), robust to binary round-off.

    0.29 · 100 is 28.999999999999996 in floating point; rounding the product to 6 decimals
    before the floor makes it 29, as the user meant. A genuine fraction (3.5) still floors to 3.
    """
    return math.floor(round(sparsity * size, 6))


def mask_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (True = remove) of the `k` lowest scores along the last dimension."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return mask
    if scores.numel() == scores.shape[-1] and k < scores.numel():
        # One big group (scope "layer"): a selection is ~5x faster than sorting tens of millions.
        # Same result as the stable sort: everything below the k-th value, then ties by index.
        kth = scores.kthvalue(k, dim=-1, keepdim=True).values
        below = scores < kth
        ties = scores == kth
        return below | (ties & (ties.cumsum(-1) <= k - below.sum(-1, keepdim=True)))
    order = torch.argsort(scores, dim=-1, stable=True)
    return mask.scatter_(-1, order[..., :k], True)


def mask_lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = remove) of the `counts[i]` lowest scores of each row i of a 2-D `scores`."""
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    chosen = ranks < counts.to(scores.device).unsqueeze(-1)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, chosen)


def row_counts_tensor(target: SparsityTarget, rows: int, cols: int) -> torch.Tensor:
    """The target's per-row removal counts as a tensor, checked against the layer's shape."""
    counts = torch.tensor(target.row_counts, dtype=torch.long)
    if counts.shape != (rows,) or bool((counts < 0).any()) or bool((counts > cols).any()):
        raise SecateurError(f"per-row counts must be {rows} integers in [0, {cols}] for this layer, "
                            f"got {len(target.row_counts)} in [{int(counts.min())}, {int(counts.max())}]")
    return counts


def prune_mask(scores: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Mask (True = remove) of the lowest `scores` (out, in) of one layer, in the target's groups.

    unstructured, scope "row": floor(sparsity · in) per row; scope "layer": floor(sparsity · numel)
    over the whole matrix; with `row_counts` (TRIM), row_counts[i] in row i whatever the scope;
    kind "nm": `n` in every run of `m` consecutive input columns of a row.
    """
    if scores.dim() != 2:
        raise SecateurError(f"scores must be a 2-D (out, in) matrix, got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if target.kind == "unstructured":
        if not 0.0 <= target.sparsity <= 1.0:
            raise SecateurError(f"sparsity must be between 0 and 1, got {target.sparsity}")
        if target.row_counts is not None:
            return mask_lowest_per_row(scores, row_counts_tensor(target, rows, cols))
        if target.scope == "row":
            return mask_lowest(scores, count_to_prune(target.sparsity, cols))
        if target.scope == "layer":
            k = count_to_prune(target.sparsity, scores.numel())
            return mask_lowest(scores.reshape(1, -1), k).reshape(rows, cols)
        raise SecateurError(f"unknown sparsity scope {target.scope!r}; accepted: layer, row")
    if target.kind == "nm":
        if not (target.m > 0 and 0 <= target.n <= target.m):
            raise SecateurError(f"N:M sparsity needs 0 <= N <= M and M > 0, got {target.n}:{target.m}")
        if cols % target.m:
            raise SecateurError(
                f"{target.n}:{target.m} sparsity needs an input width divisible by {target.m}"
            )
        grouped = scores.reshape(rows, cols // target.m, target.m)
        return mask_lowest(grouped, target.n).reshape(rows, cols)
    raise SecateurError(f"unknown sparsity kind {target.kind!r}; accepted: nm, unstructured")
