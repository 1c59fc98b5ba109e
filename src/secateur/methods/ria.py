"""RIA (Zhang et al., ICLR 2024): relative importance times activations, with N:M channel permutation.

    S_ij = ( |W_ij| / Σ_k |W_ik|  +  |W_ij| / Σ_k |W_kj| ) · ‖X_:,j‖₂^a

A weight is judged against the other weights of its output row (Σ over the row's inputs) and
of its input column (Σ over the column's outputs), so no row or column is emptied just because
its weights are small overall ("channel corruption"); the activation norm, damped by the
exponent, adds what the input carries. No weight update; it costs what Wanda costs (Σx²).

Decisions:
  - a = 0.5 (`activation_exponent`), the paper's default; the sums are over |W| of the dense
    layer, rows and columns exactly as the paper's formula.
  - Comparison group: the whole layer (`scope="layer"`), as the reference code does (relative
    importance already balances the rows, which is the method's point); `scope="row"` compares
    within each output row like Wanda. N:M groups are fixed by the pattern.
  - `permute=true` (N:M only; an unstructured mask does not depend on the column order): the
    input columns are reordered so that large scores spread over the groups of M before the
    N:M mask is chosen, raising the score the mask keeps. The start is the better of the
    memory order and the paper's heuristic (columns sorted by total score, dealt to the M
    positions of the groups in alternating order); then, for each position in the group in
    turn, which column sits there in which group is solved exactly as a linear assignment
    (scipy's `linear_sum_assignment`), keeping the other positions. One sweep over the
    positions, as the reference (a second one added under 0.1 % of kept score on SmolLM2).
    Each step keeps the current order if it cannot improve it, so the kept score never falls
    below the plain mask's.
  - The permutation is undone on the mask, not folded into the layer before: the mask is chosen
    in the permuted order and mapped back to the layer's own columns, so the saved model is a
    standard checkpoint computing exactly the function of the pruned, permuted layer (W·P and
    Pᵀ·x multiply to W·x). Its zeros are therefore N:M in the permuted order, not in memory
    order: a 2:4 kernel needs the layer's inputs gathered by that permutation. Folding it into
    the producing layer (gate/up rows before down_proj, v rows within heads before o_proj)
    would keep memory-order N:M, but it changes a second layer, which a per-layer method cannot
    do and the roles (secateur.roles) do not describe; it is left out.
Cost of the permutation, per layer of `in` inputs: M assignments of size in/M and
O(out · (in/M)² · M) arithmetic to build them; seconds for a 1536-wide layer on a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

SCOPES = ("layer", "row")
GAIN_CHUNK_ELEMENTS = 1 << 20  # bounds the temporary (out, groups, groups) work of one assignment


def ria_scores(weight: torch.Tensor, stats: LinearStats, activation_exponent: float) -> torch.Tensor:
    """RIA's score (float32, (out, in)); a row or column of zeros scores 0."""
    magnitude = weight.abs().float()
    relative = magnitude / magnitude.sum(dim=1, keepdim=True) + magnitude / magnitude.sum(dim=0, keepdim=True)
    return relative.nan_to_num(nan=0.0) * stats.column_norm().to(torch.float32).pow(activation_exponent)


def kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score an n:m mask keeps (the m − n largest of every group of m columns of a row)."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(m - n, dim=-1).values.sum(dtype=torch.float64))


def nm_channel_permutation(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """An order `perm` of the input columns in which the n:m mask of `scores[:, perm]` keeps at
    least the score it keeps in memory order (see the module docstring)."""
    scores = scores.float()
    order = torch.arange(scores.shape[1], device=scores.device)
    heuristic = _spread_by_column_total(scores, m)
    best, spread = kept_score(scores, n, m), kept_score(scores[:, heuristic], n, m)
    if spread > best:
        order, best = heuristic, spread
    for position in range(m):
        candidate = _assign_position(scores, order, position, n, m)
        value = kept_score(scores[:, candidate], n, m)
        if value > best:
            order, best = candidate, value
    return order


def _spread_by_column_total(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The paper's heuristic: sort columns by total score; the p-th block of in/m of them fills
    position p of the groups, every other block reversed, so each group gets a fair share."""
    groups = scores.shape[1] // m
    blocks = torch.argsort(scores.sum(dim=0), stable=True).reshape(m, groups)
    blocks[1::2] = blocks[1::2].flip(-1)
    return blocks.T.reshape(-1)


def _assign_position(scores: torch.Tensor, order: torch.Tensor, position: int, n: int, m: int) -> torch.Tensor:
    """Re-deal the columns at `position` of every group, the others fixed, to maximise the kept score.

    With t_rg the (m−n)-th largest score among group g's other m−1 entries in row r, group g
    keeps, with column c added, a constant plus max(S_rc, t_rg) in row r; so the assignment
    maximises Σ_g Σ_r relu(S_r,c(g) − t_rg).
    """
    from scipy.optimize import linear_sum_assignment  # here: importing it takes ~1 s, only this needs it

    groups = order.reshape(-1, m)
    tiles = scores[:, groups]  # (out, groups, m)
    others = torch.cat([tiles[..., :position], tiles[..., position + 1:]], dim=-1)
    # (groups, out), so that the sums below run over contiguous memory.
    threshold = others.topk(m - n, dim=-1).values[..., -1].T.contiguous()
    candidate = tiles[..., position].T.contiguous()  # the column now at `position` of each group
    count = groups.shape[0]
    gain = torch.empty(count, count, device=scores.device)
    chunk = max(1, GAIN_CHUNK_ELEMENTS // (scores.shape[0] * count))
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        excess = candidate.unsqueeze(0) - threshold[start:stop].unsqueeze(1)  # (chunk, groups, out)
        gain[start:stop] = excess.clamp_min_(0.0).sum(dim=-1)
    _, source = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
    groups = groups.clone()
    groups[:, position] = groups[torch.as_tensor(source, device=groups.device), position]
    return groups.reshape(-1)


@register
@dataclass
class RIA:
    name: ClassVar[str] = "ria"
    needs: ClassVar[frozenset[str]] = frozenset({"sumsq"})

    activation_exponent: float = 0.5
    scope: str = "layer"
    permute: bool = False

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise SecateurError(f"ria: unknown scope {self.scope!r}; accepted: {', '.join(SCOPES)}")
        if not self.activation_exponent >= 0:
            raise SecateurError(f"ria: activation_exponent must be >= 0 (0.5 is the paper's), got "
                                f"{self.activation_exponent!r}")

    @property
    def permutes_columns(self) -> bool:
        """Whether N:M groups are chosen in a permuted column order (a refiner needs memory order)."""
        return self.permute

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        scores = ria_scores(weight, stats, self.activation_exponent)
        if target.kind == "unstructured":
            target = dataclasses.replace(target, scope=self.scope)
        if target.kind != "nm" or not self.permute:
            return PruneResult(weight.masked_fill(prune_mask(scores, target), 0.0))
        target.check_layer(scores.shape[1], "this layer")
        order = nm_channel_permutation(scores, target.n, target.m)
        mask = torch.empty_like(scores, dtype=torch.bool)
        mask[:, order] = prune_mask(scores[:, order], target)
        return PruneResult(weight.masked_fill(mask, 0.0))
