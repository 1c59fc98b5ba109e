"""SparseFW (Roux, Zimmer, d'Aspremont, Pokutta, 2025): choose the mask by Frank-Wolfe on its convex relaxation.

Mask selection as an optimisation problem, not a ranking: with the weights kept as they are,

    minimise f(M) = ‖X(W − M⊙W)ᵀ‖² = tr(D H Dᵀ),   D = (1 − M)⊙W,   H = XᵀX

over the masks M with the target's pattern (k kept weights in each comparison group: a row,
the whole layer, or every group of m columns). Greedy scores (Wanda, RIA) rank the weights one
by one and ignore how their removals interact through H; here M is relaxed to the convex hull of
the pattern's masks (0 ≤ M ≤ 1, every group summing to its k) and minimised by Frank-Wolfe,
which needs only a linear minimisation over that set: in each group, the k entries of lowest
gradient

    ∇f(M) = −2 W ⊙ (D H)

(a top-k, the same selection every mask uses). The relaxed M is then rounded to the k largest
entries of each group. The paper's "fixed weights": the share α (`fixed_share`, 0.9 as the
paper) of each group's budget with the highest Wanda score |W_ij|·‖X_:,j‖ is kept outright and
only the rest of the budget is optimised, over the remaining weights: a smaller problem whose
relaxation is tighter.

Decisions (where the paper leaves a choice, or a port must):
  - Start: Wanda's mask (a vertex of the set, feasible). Step: exact line search, separately
    for every row when groups are rows or N:M groups (the rows do not interact: f is a sum over
    rows), for the whole layer when the group is the layer. A step never raises the relaxed
    objective; D H is updated in place, so an iteration costs one (out × in × in) product.
  - `iterations` = 100 by default: ALPS spends tens to 300 such products on a layer; measured on
    SmolLM2's layers (benchmarks/layer_error.py) SparseFW's 100 take 1.6–2.0 × ALPS's time.
  - Rounding can lose what the relaxation gained: every row (or the layer, for scope "layer")
    keeps the better, by f, of the rounded mask and Wanda's; so f never ends above Wanda's.
  - The paper's method removes weights and updates nothing (it compares with Wanda and RIA).
    `refit=true` then fits the kept weights to the dense outputs by least squares on the chosen
    support (ALPS's conjugate-gradient refit on the damped H, `secateur.methods._linalg`), the
    step SparseGPT and ALPS add to a mask; with it SparseFW compares with them.
  - H = XᵀX / n as gathered (float32): inputs that never fired cost nothing to prune, as they should.
  - A target with per-row counts (TRIM) keeps row i's own count; N:M keeps m − n per group.
Statistics: the Gram matrix XᵀX (as SparseGPT); Wanda's score comes from its diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods._linalg import refit_kept_weights
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats


@register
@dataclass
class SparseFW:
    name: ClassVar[str] = "sparsefw"
    needs: ClassVar[frozenset[str]] = frozenset({"gram"})

    iterations: int = 100
    fixed_share: float = 0.9  # α: share of each group's kept budget fixed by Wanda's score
    refit: bool = False
    damp: float = 0.01  # the refit's damping (λ = damp · mean diag H), as ALPS and SparseGPT
    cg_iter: int = 10

    def __post_init__(self) -> None:
        for option in ("iterations", "cg_iter"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SecateurError(f"sparsefw: {option} must be a non-negative integer, got {value!r}")
        share = self.fixed_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise SecateurError(f"sparsefw: fixed_share must be in [0, 1] (the paper's α = 0.9), got {share!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not self.damp >= 0:
            raise SecateurError(f"sparsefw: damp must be >= 0 (0.01 is usual), got {self.damp!r}")

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        if stats.gram is None or stats.count == 0:
            raise SecateurError("sparsefw needs the input Gram matrix of at least one calibration token")
        H = (stats.gram / stats.count).to(torch.float32)
        W = weight.detach().float()
        removed = self.select_mask(W, H, target)
        if self.refit:
            return PruneResult(refit_kept_weights(weight, stats, ~removed, self.damp, self.cg_iter, "sparsefw"))
        return PruneResult(weight.masked_fill(removed, 0.0))

    def trim_scores(self, weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """SparseFW's start, Wanda's score from the Gram diagonal: TRIM's search ranks by it instead of
        running Frank-Wolfe for every candidate allocation (secateur.trim), as it does for ALPS."""
        return _saliency(weight.detach().float(), (stats.gram.diagonal() / max(stats.count, 1)).to(torch.float32))

    def select_mask(self, W: torch.Tensor, H: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
        """The mask (True = removed) Frank-Wolfe settles on, never worse by f than Wanda's."""
        saliency = _saliency(W, H.diagonal())
        start = ~prune_mask(saliency, target)  # Wanda's kept weights
        fixed = _fixed_weights(saliency, start, target, self.fixed_share)
        whole_layer = target.kind == "unstructured" and target.row_counts is None and target.scope == "layer"

        def vertex(scores: torch.Tensor) -> torch.Tensor:
            """The pattern's mask keeping the fixed weights and the largest `scores` elsewhere."""
            return ~prune_mask(scores.masked_fill(fixed, float("inf")), target)

        def per_group(values: torch.Tensor) -> torch.Tensor:  # row sums, or one sum for the whole layer
            return values.sum() if whole_layer else values.sum(dim=1)

        M = start.float()
        DH = ((1.0 - M) * W) @ H
        for _ in range(self.iterations):
            gradient = -2.0 * W * DH
            V = vertex(-gradient).float()  # the linear minimiser: lowest gradient among the free weights
            E = W * (V - M)  # D moves by −η·E
            EH = E @ H
            slope, curvature = per_group(E * DH), per_group(E * EH)
            step = torch.where(curvature > 0, slope / curvature.clamp_min(torch.finfo(H.dtype).tiny), 0.0).clamp(0, 1)
            if not bool((step > 0).any()):
                break
            step = step if whole_layer else step.unsqueeze(1)
            M += step * (V - M)
            DH -= step * EH

        rounded = vertex(M + 1e-6 * saliency / saliency.max().clamp_min(1e-30))  # ties to Wanda's order
        # Rounding can undo the gain: keep Wanda's mask where it is better (per row; the layer as one).
        better = per_group(_output_error(W, H, rounded)) <= per_group(_output_error(W, H, start))
        kept = torch.where(better if whole_layer else better.unsqueeze(1), rounded, start)
        return ~kept


def _saliency(W: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_:,j‖ (Wanda's score) from diag(XᵀX) / n: the norm up to a factor every score shares."""
    return W.abs() * mean_square.clamp_min(0.0).sqrt()


def _output_error(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per row, (D H Dᵀ)_ii with D = W off `kept`: f's terms, as an (out, in) matrix to sum."""
    D = W.masked_fill(kept, 0.0)
    return D * (D @ H)


def _fixed_weights(saliency: torch.Tensor, start: torch.Tensor, target: SparsityTarget, share: float) -> torch.Tensor:
    """The floor(share · k) kept weights of highest saliency in each group (the paper's fixed weights)."""
    if share <= 0:
        return torch.zeros_like(start)
    rows, cols = saliency.shape
    if target.kind == "nm":
        kept = target.m - target.n
        fixed = int(share * kept)
        grouped = saliency.reshape(rows, cols // target.m, target.m)
        top = grouped.topk(fixed, dim=-1).indices
        return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)
    ranked = saliency.masked_fill(~start, -1.0)  # only Wanda's kept weights can be fixed
    if target.row_counts is None and target.scope == "layer":
        fixed = int(share * int(start.sum()))
        top = ranked.reshape(-1).topk(fixed).indices
        return torch.zeros(rows * cols, dtype=torch.bool, device=start.device).scatter_(0, top, True).reshape(rows, cols)
    counts = (share * start.sum(dim=1)).floor().long()  # per row: each row's own budget
    order = ranked.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(cols, device=order.device).expand(rows, cols))
    return ranks < counts.unsqueeze(1)
