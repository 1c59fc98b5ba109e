"""Putri (Prune, Update and Trim): the structured seed method, math first, then its flow.

See docs/algorithms.md, "Structured pruning / Putri". The α-rule budget (how many KV groups
go, how wide every FFN stays) is shared with wanda-sp and lives in `methods/_units.py`.

FFN neurons (inputs j of down_proj, with H = XᵀX, c_r = mean y_r²):

    s_j = Σ_r c_r · W_rj² / U_jj²,     U = upper Cholesky factor of H⁻¹

(SparseGPT's saliency of column j, weighted by each output's energy). The kept neurons S get a
least-squares down_proj that reproduces the dense layer's output XWᵀ:
Wᵀ = (H_SS + λ D)⁻¹ (H Wᵀ)_S, D = diag(H_SS) (see `least_squares_refit` for the ridge).

Deviations from the reference, each chosen by measurement on SmolLM2-135M (README,
"Structured pruning"):
- Ridge on both refits (`refit_damp` = 0.1, relative to each kept input's own energy, pulling
  towards the dense weights rather than zero). The reference solves exactly on 256 × 2048
  tokens; on the few thousand tokens a CPU run affords the exact solve overfits (kept neurons
  without refit: 64, with an exact refit: 1.3e7 at 512 tokens).
- No o_proj refit by default (`refit_o_proj=false`): measured worse at every ratio tried.
- Head scores normalised by the block's residual-stream energy (`head_norm="residual"`): the
  energy a KV group adds to the attention output is on its block's scale, and the first block's
  residual stream is ~300× smaller than the others', so raw energies empty block 0 first.
"""

from __future__ import annotations

import heapq
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.methods._linalg import DAMP_RETRIES, inverse_cholesky_upper
from secateur.methods._units import (  # noqa: F401  (re-exported: the budget is part of Putri's public math)
    ALPHA,
    PutriBudget,
    lowest_groups,
    model_budget,
    putri_budget,
    top_k,
    unit_params,
)
from secateur.methods.base import StructuredMethod, register


def ffn_neuron_scores(
    down_weight: torch.Tensor, gram: torch.Tensor, out_energy: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """Neuron (down_proj input column) scores s_j = Σ_r c_r · W_rj² / U_jj², float64, shape (in,).

    U is the upper Cholesky factor of (H + λI)⁻¹ with H = gram and λ = damp · mean(diag H), the
    damping raised tenfold while H is not positive definite (SparseGPT's helper). The reference
    uses no damping; a small λ only keeps the inverse finite and barely moves the ranking. A
    dead column (diag H = 0: the neuron never fired) gets its diagonal set to 1 for the
    factorisation and scores 0: removing it changes no output.
    """
    out, cols = _check_2d("down_weight", down_weight)
    if gram.shape != (cols, cols):
        raise SecateurError(
            f"putri: gram must be ({cols}, {cols}) for a down_proj of {cols} inputs, got {tuple(gram.shape)}"
        )
    if out_energy.shape != (out,):
        raise SecateurError(
            f"putri: out_energy must be ({out},), one per down_proj output, got {tuple(out_energy.shape)}"
        )
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp >= 0:
        raise SecateurError(f"putri: damp must be >= 0 (0.01 is usual), got {damp!r}")
    H = gram.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    U = inverse_cholesky_upper(H, damp, method="putri")
    W2 = down_weight.detach().to(torch.float64).square()
    c = out_energy.detach().to(torch.float64)
    scores = (c @ W2) / torch.diagonal(U).square()
    scores[dead] = 0.0
    return scores


def least_squares_refit(
    gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damp: float = 0.0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """New weight (out, k) for the kept inputs S, float64:

        argmin_W ‖X_S Wᵀ − Y‖² + λ Σ_j D_jj ‖W_:,j − P_:,j‖²  =  ((H_SS + λD)⁻¹ (C_S + λ D Pᵀ))ᵀ

    given H = XᵀX (gram) and C = XᵀY (cross), with D = diag(H_SS) and P = `prior` (out, k), the
    weights to fall back on (zero when None). The ridge scales with each kept input's own
    energy, so λ = `damp` means the same whatever the activation scale (LLM channels differ by
    orders of magnitude); pulling towards the dense layer's own kept columns rather than towards
    zero means that scarce calibration data degrades the refit into "keep the weights", not into
    shrunken ones. damp = 0 solves exactly; while H_SS + λD is not positive definite λ is raised
    tenfold (from 1e-10). Solved by Cholesky, never by an explicit inverse. Column i of the
    result belongs to input keep[i] (pass sorted indices, as `top_k` returns, for a sliced layer).
    """
    cols = gram.shape[0] if gram.dim() == 2 else -1
    if gram.dim() != 2 or gram.shape[1] != cols:
        raise SecateurError(f"putri: gram must be a square (in, in) matrix, got {tuple(gram.shape)}")
    if cross.dim() != 2 or cross.shape[0] != cols:
        raise SecateurError(f"putri: cross must be (in={cols}, out), got {tuple(cross.shape)}")
    keep = _check_index("keep", keep, cols)
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp >= 0:
        raise SecateurError(f"putri: refit damp must be >= 0 (0.01 is the default), got {damp!r}")
    H = gram.detach().to(torch.float64)[keep][:, keep]
    C = cross.detach().to(torch.float64)[keep]
    if keep.numel() == 0:
        return C.T.clone()  # (out, 0)
    if prior is not None and prior.shape != (C.shape[1], keep.numel()):
        raise SecateurError(f"putri: prior must be (out={C.shape[1]}, kept={keep.numel()}), got {tuple(prior.shape)}")
    for L, factor, diagonal in _ridge_factors(H, damp):
        rhs = C if prior is None else C + factor * diagonal[:, None] * prior.detach().to(torch.float64).T
        solution = torch.cholesky_solve(rhs, L)
        if torch.isfinite(solution).all():
            return solution.T.contiguous()
    raise SecateurError(
        "putri: the kept neurons' Gram matrix is singular (not positive definite even with a large ridge "
        "· diagonal): use more calibration data or a larger refit_damp"
    )


def _ridge_factors(H: torch.Tensor, damp: float):
    """Yield (L, λ, D): the lower Cholesky factor of H + λD with D = diag(H), λ = damp, then raised
    tenfold (from 1e-10 when damp = 0) while the factorisation fails, DAMP_RETRIES times at most.
    A caller that finds the solve non-finite takes the next, larger λ. A dead input (zero energy)
    gets the mean diagonal in D, so that it still has a positive ridge."""
    diagonal = torch.diagonal(H).clone()
    mean_diag = diagonal.mean()
    diagonal = torch.where(diagonal > 0, diagonal, mean_diag if mean_diag > 0 else torch.ones((), dtype=H.dtype))
    factor = float(damp)
    for _ in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + factor * torch.diag(diagonal))
        if info == 0:
            yield L, factor, diagonal
        factor = factor * 10 if factor > 0 else 1e-10


def refit_error(gram: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damp: float = 0.0,
                refit: bool = True) -> float:
    """Σ over calibration tokens of ‖X_S Ŵᵀ − X Wᵀ‖²: what a layer's output loses when only inputs
    `keep` stay, with Ŵ the ridge refit pulled towards W_S (`refit`) or the dense columns W_S.

    Exact from the Gram matrix H = XᵀX alone, since the target is the dense layer's own output:
    tr(Ŵ H_SS Ŵᵀ) − 2 tr(Ŵ (H Wᵀ)_S) + tr(W H Wᵀ).
    """
    H = gram.detach().to(torch.float64)
    W = weight.detach().to(torch.float64)
    keep = _check_index("keep", keep, H.shape[0])
    cross = H @ W.T
    new = least_squares_refit(H, cross, keep, damp, prior=W[:, keep]) if refit else W[:, keep]
    H_SS = H[keep][:, keep]
    total = ((W @ H) * W).sum() - 2 * (new * cross[keep].T).sum() + ((new @ H_SS) * new).sum()
    return max(float(total), 0.0)


def nested_refit_errors(gram: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, damp: float = 0.0,
                        refit: bool = True) -> torch.Tensor:
    """`refit_error` for every prefix of `order` at once: entry w is the error of keeping the
    inputs order[:w] (w = 0 … n), float64, shape (n + 1,).

    One factorisation serves every width: with the inputs permuted into `order`, the Cholesky
    factor of a leading block of H + λD is the leading block of the full factor, and so is the
    forward substitution Z = L⁻¹ b, b = H Wᵀ + λ D Wᵀ. The refit's error is then
    tr(W H Wᵀ) + λ Σ_{j<w} D_jj ‖W_:,j‖² − ‖Z[:w]‖², exact for damp = 0; with a ridge it is the
    ridge objective (error + λ Σ D_jj ‖Ŵ_:,j − W_:,j‖²), slightly above the error, which is what
    the refit minimises. Without `refit` the error of keeping the
    dense columns is the sum of (WᵀW ⊙ H) over the removed inputs, a suffix-block sum.
    """
    H = gram.detach().to(torch.float64)
    order = _check_index("order", order, H.shape[0])
    if order.numel() != H.shape[0]:
        raise SecateurError(f"putri: order must list every one of the {H.shape[0]} inputs once")
    H = H[order][:, order]
    W = weight.detach().to(torch.float64)[:, order]
    if not refit:
        block = (W.T @ W) * H
        suffix = block.flip(0).cumsum(0).flip(0).flip(1).cumsum(1).flip(1)  # suffix[w, w] = Σ_{i,j >= w}
        return torch.cat([torch.diagonal(suffix), suffix.new_zeros(1)]).clamp_min(0)
    cross = H @ W.T
    total = (cross * W.T).sum()
    for L, factor, diagonal in _ridge_factors(H, damp):
        # Ridge towards the dense columns (see least_squares_refit): the objective's minimum is
        # T + λ Σ_{j<w} D_jj ‖W_:,j‖² − ‖L⁻¹ b‖² over the prefix, b = H Wᵀ + λ D Wᵀ.
        penalty = factor * diagonal * W.square().sum(0)
        Z = torch.linalg.solve_triangular(L, cross + factor * diagonal[:, None] * W.T, upper=False)
        if torch.isfinite(Z).all():
            explained = torch.cat([Z.new_zeros(1), (Z.square().sum(1) - penalty).cumsum(0)])
            return (total - explained).clamp_min(0)
    raise SecateurError("putri: the Gram matrix is singular (not positive definite even with a large ridge): "
                        "use more calibration data or a larger refit_damp")


def choose_dropped_blocks(curves: list[tuple[list[float], list[int]]], drop_errors: list[float],
                          block_params: list[int], params_to_remove: int, max_blocks: int
                          ) -> tuple[list[int], list[int]]:
    """Whole blocks and units in one budget: (blocks to drop, steps per curve).

    `curves` holds two curves per block (its FFN, its heads; see `allocate_steps`), `drop_errors[l]`
    the error of removing block l entirely, on the same scale. For k = 0 … max_blocks the k blocks
    of least drop error go and the rest of the budget is water-filled over the other blocks'
    curves; the k of least total error (dropped blocks' errors + error added on the curves) wins,
    the smaller k on a tie. A dropped block's curves get 0 steps.
    """
    by_drop_error = sorted(range(len(drop_errors)), key=lambda block: (drop_errors[block], block))
    best = None
    for k in range(max_blocks + 1):
        dropped = sorted(by_drop_error[:k])
        budget = params_to_remove - sum(block_params[b] for b in dropped)
        if budget < 0:
            break
        kept_curves = [i for i in range(len(curves)) if i // 2 not in dropped]
        try:
            steps = allocate_steps([curves[i] for i in kept_curves], budget)
        except SecateurError:
            continue  # the other blocks cannot absorb the rest: drop more
        added = sum(curves[i][0][n] - curves[i][0][0] for i, n in zip(kept_curves, steps, strict=True))
        total = sum(drop_errors[b] for b in dropped) + added
        if best is None or total < best[0]:
            taken = [0] * len(curves)
            for i, n in zip(kept_curves, steps, strict=True):
                taken[i] = n
            best = (total, dropped, taken)
    if best is None:
        raise SecateurError(f"putri: cannot remove {params_to_remove} parameters; use a lower sparsity")
    return best[1], best[2]


def allocate_steps(curves: list[tuple[list[float], list[int]]], params_to_remove: int) -> list[int]:
    """Greedy water-filling over removal curves: how many steps to take on each curve.

    `curves[i]` = (errors, costs): errors[k] is curve i's error after k steps (errors[0] the
    error with nothing removed), costs[k] the parameters the (k+1)-th step removes. Repeatedly
    take the step, over all curves, that adds the least error per parameter removed, until the
    removed count is within half the cheapest step of `params_to_remove`; a step that would
    overshoot by more is passed over while a smaller one still fits (a KV group can cost several
    FFN steps), as FLAP's threshold does. Errors must be on a common scale (the caller normalises
    them); ties go to the earlier curve. Returns the step count per curve.
    """
    taken = [0] * len(curves)
    all_costs = [c for _, costs in curves for c in costs]
    slack = min(all_costs) / 2 if all_costs else 0
    # Heap of each curve's next step: (error added per parameter, curve). Only near the target can
    # the best step overshoot; then cheaper-fitting ones are looked for below it.
    heap = [((errors[1] - errors[0]) / costs[0], i) for i, (errors, costs) in enumerate(curves) if costs]
    heapq.heapify(heap)
    removed = 0
    while removed < params_to_remove - slack:
        if not heap:
            raise SecateurError(f"putri: cannot remove {params_to_remove} parameters: every block is at its "
                                "minimum width; use a lower sparsity")
        passed_over = []
        while heap and removed + curves[heap[0][1]][1][taken[heap[0][1]]] > params_to_remove + slack:
            passed_over.append(heapq.heappop(heap))
        chosen = heapq.heappop(heap) if heap else passed_over.pop(0)  # none fits: the best overshoot
        for entry in passed_over:
            heapq.heappush(heap, entry)
        i = chosen[1]
        errors, costs = curves[i]
        removed += costs[taken[i]]
        taken[i] += 1
        if taken[i] < len(costs):
            k = taken[i]
            heapq.heappush(heap, ((errors[k + 1] - errors[k]) / costs[k], i))
    return taken


def _check_2d(name: str, tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.dim() != 2:
        raise SecateurError(f"putri: {name} must be a 2-D (out, in) matrix, got shape {tuple(tensor.shape)}")
    return tensor.shape[0], tensor.shape[1]


def _check_index(name: str, index: torch.Tensor, size: int) -> torch.Tensor:
    index = torch.as_tensor(index)
    if (
        index.dim() != 1
        or index.dtype == torch.bool
        or index.dtype.is_floating_point
        or index.dtype.is_complex
    ):
        raise SecateurError(
            f"putri: {name} must be a 1-D integer index tensor, got {index.dtype} {tuple(index.shape)}"
        )
    index = index.to(torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= size):
        raise SecateurError(
            f"putri: {name} indices must be in [0, {size}), got [{index.min()}, {index.max()}]"
        )
    if index.unique().numel() != index.numel():
        raise SecateurError(f"putri: {name} contains repeated indices")
    return index


def output_gain(norm, out_sumsq: torch.Tensor, count: int) -> float:
    """How far the residual stream moves per unit of squared error in a unit's output, when that
    output is normalised before the residual add (Gemma's sandwich norms: `norm` is the RMSNorm
    the adapter names; 1.0 where the output is added as it is).

    An RMSNorm maps y to γ ⊙ y / rms(y), so an error Δy reaches the residual stream as about
    γ ⊙ Δy / rms(y): its energy is scaled by mean(γ²) / rms². rms² is the unit's mean output
    energy per dimension on the calibration tokens (Σ y² / (tokens · d), from `out_sumsq`), and
    γ is read by normalising a vector of ones (rms 1), whatever the family's convention for the
    stored weight (Gemma stores γ − 1). Without this, an error measured before a post-norm is
    compared across blocks on the wrong scale: on Gemma-3-270M the factor grows from ~40 in
    block 0 to ~3·10⁷ in block 17, and the global allocation emptied the last blocks."""
    if norm is None:
        return 1.0
    width = out_sumsq.numel()
    weight = next(norm.parameters())
    with torch.no_grad():
        gamma_sq = float(norm(torch.ones(1, width, dtype=weight.dtype, device=weight.device)).double().square().mean())
    mean_energy = float(out_sumsq.sum()) / (count * width)
    return gamma_sq / mean_energy


# --- the method: plumbing around the math above ---------------------------------------

HEAD_SCORES = ("reconstruction", "perplexity")
HEAD_NORMS = ("residual", "none")
ALLOCATIONS = ("uniform", "global")
TOKENS_PER_KEPT_INPUT = 10  # below this many calibration tokens per kept input a refit overfits


@register
@dataclass
class Putri(StructuredMethod):
    """Prune, Update and Trim: FFN neurons block by block with a least-squares update of the
    down projection, then whole KV groups of attention heads.

    Head score (`head_score`):
      - "reconstruction" (default): the energy a KV group adds to its block's attention output,
        ‖W_o[:, g] z_g‖² summed over calibration tokens, read off the o_proj input Gram matrix
        gathered in one pass, divided by the block's residual-stream energy (`head_norm`,
        "none" for the raw energy) so that groups of different blocks compare. One forward
        pass in all, so it scales to real models.
      - "perplexity": the paper's greedy search: zero each remaining group in turn and measure the
        calibration loss on `search_windows` windows; remove the best candidates, repeat. About
        (blocks × groups) full forward passes per round: accurate, and hours on a 7B model on CPU.

    Allocation (`allocation`):
      - "uniform" (the paper's): the α-rule split; every FFN keeps the same width.
      - "global": per-block FFN widths and KV-group counts chosen together over the whole model.
        One pass over the model as loaded measures, for every block, the exact output error of
        its down_proj (after the least-squares refit) at `steps` candidate widths and of its
        o_proj with 0 … G−1 groups removed, each divided by the block's residual-stream energy
        (the relative change of the block's output: comparable across blocks; where the family
        normalises a unit's output before the residual add, Gemma's post-norms, the error is
        first scaled by that norm's gain, `output_gain`); a greedy
        water-filling then removes, step by step, whatever adds the least relative error per
        parameter until the target is met (`allocate_steps`). With `drop_blocks` (default) whole
        blocks compete in the same budget: removing block l costs its relative output change
        ‖h_out − h_in‖² / ‖h_in‖² (ShortGPT's view of a block, on the same scale as the unit
        errors); for k = 0, 1, 2, … the k cheapest blocks are dropped, the rest of the budget is
        water-filled over the other blocks, and the k with the least total error wins. Putri's
        sequential pass then prunes each kept block to its allotted width and head count,
        re-scoring on pruned inputs.

    `refit_o_proj` refits o_proj on the kept heads (least squares to the dense attention output;
    off by default: on SmolLM2 at P0 it cost 2–11 % perplexity at 30–50 %); `refit_damp` is the
    ridge of both refits, relative to each kept input's energy and pulling towards the dense
    weights (0.1 measured best of 0.001–1 at P0).
    """

    name: ClassVar[str] = "putri"
    alpha: float = ALPHA
    head_score: str = "reconstruction"
    head_norm: str = "residual"
    refit_o_proj: bool = False  # measured: the o_proj refit costs perplexity (README, "Structured pruning")
    refit_damp: float = 0.1
    allocation: str = "uniform"
    drop_blocks: bool = True
    steps: int = 32
    search_windows: int = 1
    damp: float = 0.01

    @property
    def streams(self) -> bool:
        """Whether the flow holds one block at a time (`prune --stream`): the global plan may drop
        blocks and the perplexity search runs the whole model."""
        return self.allocation == "uniform" and self.head_score == "reconstruction"

    def __post_init__(self):
        for field, value, accepted in (("head_score", self.head_score, HEAD_SCORES),
                                       ("head_norm", self.head_norm, HEAD_NORMS),
                                       ("allocation", self.allocation, ALLOCATIONS)):
            if value not in accepted:
                raise SecateurError(f"unknown putri {field} {value!r}; accepted: {', '.join(accepted)}")
        if self.alpha <= 0 or self.search_windows < 1 or self.steps < 2 or self.refit_damp < 0:
            raise SecateurError("putri needs alpha > 0, search_windows >= 1, steps >= 2 and refit_damp >= 0")
        if self.allocation == "global" and self.head_score == "perplexity":
            raise SecateurError("putri: allocation=global chooses each block's head count from reconstruction "
                                "errors; it does not combine with head_score=perplexity")

    def prune_model(self, session, sparsity: float) -> dict:
        if self.allocation == "global":
            widths, head_counts, dropped = self._global_plan(session, sparsity)
            if dropped:
                session.adapter.remove_blocks(dropped)
            kept = [i for i in range(len(widths)) if i not in dropped]
            self._prune_ffn(session, [widths[i] for i in kept])
            removed = self._remove_heads(session, per_block=[head_counts[i] for i in kept])
            return {"ffn_keep": [widths[i] for i in kept], "kv_groups_removed": removed,
                    "removed_blocks": dropped, "head_score": self.head_score, "allocation": self.allocation}
        budget = model_budget(session.adapter, sparsity, self.alpha)
        self._prune_ffn(session, [budget.ffn_keep] * len(session.adapter.blocks()))
        removed = self._remove_heads(session, count=budget.heads_groups_to_remove)
        return {"ffn_keep": budget.ffn_keep, "kv_groups_removed": removed, "head_score": self.head_score,
                "allocation": self.allocation}

    def _prune_ffn(self, session, widths: list[int]) -> None:
        """Stage 1: block by block on the outputs of the already pruned blocks. One resumable
        step per block ("putri-ffn/<index>"): the kept neurons and the refitted down_proj."""
        adapter = session.adapter
        session.start_pass()
        needs = frozenset({"sum", "gram", "out_sumsq"})
        count = len(adapter.blocks())
        for index in tqdm(range(count), desc="putri FFN", unit="block", disable=not session.progress):
            step = f"putri-ffn/{index}"
            saved = session.replay(step)
            with session.block(index) as block:
                if saved is not None:  # done by the interrupted run this one resumes
                    if saved.tensors:
                        _cut_ffn(adapter, block, saved.tensors["keep"], saved.tensors["down_proj"])
                    continue
                ffn = adapter.ffn_units(block)
                keep_width = widths[index]
                cut = {}
                if keep_width < ffn.width:
                    name = ffn.consumer_name
                    # Under torchrun the Gram matrix goes to one owner rank, which solves and
                    # sends the kept neurons and the refitted weights to the others.
                    stats = session.gather(index, {name: ffn.consumer}, needs, owners=True)[name]
                    self._warn_few_tokens(session, stats.count, keep_width)
                    keep = new = None
                    if session.solves(name):
                        weight = ffn.consumer.get_weight().double()
                        scores = ffn_neuron_scores(weight, stats.gram, stats.out_sumsq / stats.count, self.damp)
                        keep = top_k(scores, keep_width)
                        # Target: the dense layer's own output X Wᵀ (the bias stays as it is).
                        new = least_squares_refit(stats.gram, stats.gram @ weight.T, keep, self.refit_damp,
                                                  prior=weight[:, keep]).float()
                    cut = {"keep": session.share_result(name, keep), "down_proj": session.share_result(name, new)}
                    _cut_ffn(adapter, block, **cut)
                if index + 1 < count:
                    session.advance(index)
            session.complete(step, cut)

    def _warn_few_tokens(self, session, tokens: int, kept: int) -> None:
        if tokens < TOKENS_PER_KEPT_INPUT * kept and not any("calibration tokens" in w for w in session.warnings):
            session.warnings.append(
                f"putri: {tokens} calibration tokens for {kept} kept inputs per refit (fewer than "
                f"{TOKENS_PER_KEPT_INPUT}× the kept width): the least-squares refits may overfit; give more "
                "--nsamples or a longer --seqlen, or raise the refit_damp option")

    def _remove_heads(self, session, count: int = 0, per_block: list[int] | None = None) -> list[list[int]]:
        """Stage 2: remove `count` KV groups over the whole model, or `per_block[i]` in block i
        (at least one group stays per block)."""
        adapter = session.adapter
        blocks = adapter.blocks()
        removed: list[list[int]] = [[] for _ in blocks]
        if (per_block is None and count == 0) or (per_block is not None and not any(per_block)):
            return removed
        scores, refit_inputs = self._o_proj_pass(session)
        if self.head_score == "reconstruction":
            if per_block is None:
                removed = lowest_groups(scores, count)
            else:
                removed = [top_k(-block_scores, n).tolist() for block_scores, n in zip(scores, per_block, strict=True)]
        else:
            removed = self._greedy_search(session, count)
        for index in range(len(blocks)):
            with session.block(index) as block:
                heads = adapter.head_units(block)
                keep = [g for g in range(heads.num_groups) if g not in removed[index]]
                if len(keep) == heads.num_groups:
                    continue
                kept_columns = torch.cat([heads.consumer_columns[g] for g in keep])
                new_weight = None
                if self.refit_o_proj:
                    gram, dense_o = refit_inputs[index]
                    new_weight = least_squares_refit(gram, gram @ dense_o.T, kept_columns, self.refit_damp,
                                                     prior=dense_o[:, kept_columns]).float()
                adapter.keep_head_groups(block, keep)
                if new_weight is not None:
                    adapter.head_units(block).consumer.set_weight(new_weight)
        return removed

    def _o_proj_pass(self, session) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """One pass over the blocks as stage 1 left them: each block's KV-group scores (the energy
        each group adds to the o_proj output, read off the o_proj input Gram matrix XᵀX / n and
        the dense o_proj, divided by the typical energy ‖h‖² of the residual stream entering the
        block: `residual_energy`) and, when o_proj is refitted, the refit's (Gram matrix, dense
        o_proj), which the later search must not have zeroed. Weights are read while the pass
        holds the block, so a streamed run has one block in memory. One resumable step per block
        ("putri-heads/<index>")."""
        adapter = session.adapter
        session.start_pass()
        scores, refit_inputs = [], []
        count = len(adapter.blocks())
        for index in tqdm(range(count), desc="putri heads", unit="block", disable=not session.progress):
            step = f"putri-heads/{index}"
            saved = session.replay(step)
            if saved is None:
                with session.block(index) as block:
                    heads = adapter.head_units(block)
                    norm = adapter.output_norm(block, "heads")
                    energy = residual_energy(session.hidden, session.gather_tokens)
                    needs = frozenset({"gram"} | ({"out_sumsq"} if norm is not None else set()))
                    stats = session.gather(index, {heads.consumer_name: heads.consumer}, needs,
                                           advance=index + 1 < count)[heads.consumer_name]
                    dense_o = heads.consumer.get_weight().double().clone()
                    gram = stats.gram / stats.count
                    group_scores = group_energy(dense_o, gram, heads.consumer_columns)
                    if self.head_norm == "residual":
                        group_scores = group_scores / energy
                        if norm is not None:  # the energy the residual stream receives (see output_gain)
                            group_scores = group_scores * output_gain(norm, stats.out_sumsq, stats.count)
                saved_tensors = {"scores": group_scores} | ({"gram": gram, "dense_o": dense_o}
                                                            if self.refit_o_proj else {})
                session.complete(step, saved_tensors)
            else:
                saved_tensors = saved.tensors
            scores.append(saved_tensors["scores"])
            if self.refit_o_proj:
                refit_inputs.append((saved_tensors["gram"], saved_tensors["dense_o"]))
        return scores, refit_inputs

    def _global_plan(self, session, sparsity: float) -> tuple[list[int], list[int], list[int]]:
        """Per-block FFN widths, KV-group counts and blocks to drop for allocation="global" (see the class doc)."""
        adapter = session.adapter
        count = len(adapter.blocks())
        to_remove = round(sparsity * adapter.count_block_params())
        session.start_pass()
        curves, candidate_widths = [], []  # curves: block 0's FFN, block 0's heads, block 1's FFN, ...
        drop_errors, block_params = [], []
        for index in tqdm(range(count), desc="putri allocation", unit="block", disable=not session.progress):
            step = f"putri-plan/{index}"  # one resumable step per block: its curves, widths and drop error
            saved = session.replay(step)
            if saved is not None:
                plan = saved.meta
            else:
                with session.block(index) as block:
                    plan = self._block_plan(session, index, block)
                session.complete(step, meta=plan)
            curves += [tuple(plan["ffn_curve"]), tuple(plan["head_curve"])]
            candidate_widths.append(plan["widths"])
            drop_errors.append(plan["drop_error"])
            block_params.append(plan["block_params"])
        dropped, taken = choose_dropped_blocks(curves, drop_errors, block_params, to_remove,
                                               max_blocks=count - 1 if self.drop_blocks else 0)
        widths = [ws[steps] for ws, steps in zip(candidate_widths, taken[0::2], strict=True)]
        return widths, taken[1::2], dropped

    def _block_plan(self, session, index: int, block) -> dict:
        """Block `index`'s removal curves (its FFN's, its heads': see `allocate_steps`), candidate
        FFN widths, the error of dropping it whole and its parameter count, measured on its inputs;
        advances the pass. JSON values: the step a resumed run takes up."""
        adapter = session.adapter
        ffn, heads = adapter.ffn_units(block), adapter.head_units(block)
        energy = residual_energy(session.hidden, session.gather_tokens)
        inputs = list(session.hidden)  # the pass replaces the list's entries, not the tensors
        stats = session.gather(index, {ffn.consumer_name: ffn.consumer, heads.consumer_name: heads.consumer},
                               frozenset({"gram", "out_sumsq"}), advance=True)
        drop_sum, _ = session.reduce_loss(sum(float((out.double() - x.double()).square().sum())
                                              for x, out in zip(inputs, session.hidden, strict=True)), 0)
        drop_error = drop_sum / (energy * stats[ffn.consumer_name].count)
        del inputs
        down, o_stats = stats[ffn.consumer_name], stats[heads.consumer_name]
        weight = ffn.consumer.get_weight().double()
        scores = ffn_neuron_scores(weight, down.gram, down.out_sumsq / down.count, self.damp)
        step = -(-ffn.width // self.steps)  # ceil: at most `steps` steps, the last one may be smaller
        widths = list(range(ffn.width, 0, -step))  # candidate widths, the dense one first, all >= 1
        tokens_energy = energy * down.count
        by_score = torch.argsort(scores, descending=True, stable=True)  # top_k(scores, w) = by_score[:w]
        # Errors in what the residual stream receives (output_gain: 1 unless the output is normalised).
        errors = (nested_refit_errors(down.gram, weight, by_score, self.refit_damp) / tokens_energy
                  * output_gain(adapter.output_norm(block, "ffn"), down.out_sumsq, down.count))
        neuron_params = unit_params(ffn) // ffn.width
        # KV groups leave in ascending order of energy; group g's columns stay while it does.
        o_weight = heads.consumer.get_weight().double()
        energy_order = torch.argsort(group_energy(o_weight, o_stats.gram, heads.consumer_columns),
                                     descending=True, stable=True).tolist()
        columns = [heads.consumer_columns[g] for g in energy_order]
        head_errors = (nested_refit_errors(o_stats.gram, o_weight, torch.cat(columns), self.refit_damp,
                                           self.refit_o_proj) / tokens_energy
                       * output_gain(adapter.output_norm(block, "heads"), o_stats.out_sumsq, o_stats.count))
        kept_columns = [sum(len(c) for c in columns[:kept]) for kept in range(heads.num_groups, 0, -1)]
        return {
            "ffn_curve": [[float(errors[w]) for w in widths],
                          [(a - b) * neuron_params for a, b in itertools.pairwise(widths)]],
            "head_curve": [[float(head_errors[k]) for k in kept_columns],
                           [heads.params_per_group] * (heads.num_groups - 1)],
            "widths": widths,
            "drop_error": drop_error,
            "block_params": sum(p.numel() for p in block.parameters()),
        }

    def _greedy_search(self, session, count: int) -> list[list[int]]:
        adapter = session.adapter
        blocks = adapter.blocks()
        units = [adapter.head_units(block) for block in blocks]
        removed: list[list[int]] = [[] for _ in blocks]
        per_round = units[0].num_groups  # one attention module's worth of groups per round
        bar = tqdm(total=count, desc="putri head search", unit="group", disable=not session.progress)
        while sum(map(len, removed)) < count:
            candidates = []
            for index, heads in enumerate(units):
                if len(removed[index]) >= heads.num_groups - 1:
                    continue  # never empty a block's attention
                for group in range(heads.num_groups):
                    if group in removed[index]:
                        continue
                    with zeroed_columns(heads.consumer, heads.consumer_columns[group]):
                        candidates.append((session.calibration_nll(self.search_windows), index, group))
            if not candidates:
                break
            quota, taken = min(per_round, count - sum(map(len, removed))), 0  # fixed before this round takes any
            for _, index, group in sorted(candidates):
                if taken == quota:
                    break
                if len(removed[index]) >= units[index].num_groups - 1:
                    continue
                removed[index].append(group)
                _zero(units[index].consumer, units[index].consumer_columns[group])  # stays removed
                taken += 1
                bar.update(1)
        bar.close()
        return [sorted(groups) for groups in removed]


def _cut_ffn(adapter, block, keep: torch.Tensor, down_proj: torch.Tensor) -> None:
    """Keep FFN neurons `keep` of `block`, with `down_proj` as the new down projection."""
    adapter.keep_ffn(block, keep)
    adapter.ffn_units(block).consumer.set_weight(down_proj)


def residual_energy(hidden: list[torch.Tensor], gather_tokens=None) -> float:
    """Typical energy ‖h_t‖² of the residual stream entering a block: the median over tokens.

    Not the mean: past the first few blocks LLMs carry "massive activations" — one or two
    channels of a few tokens (the first token, delimiters) hundreds of times larger than the
    rest. On SmolLM2-135M blocks 12–28 hold ~97 % of their residual energy in one channel and
    their mean ‖h_t‖² is 50× the median, so dividing by the mean would make those blocks look
    50× cheaper to prune than they are.

    `gather_tokens` (a session's): the norms of every process's windows, when `hidden` holds
    only this process's share (torchrun), since a median is not a sum of shares.
    """
    norms = torch.cat([h.detach().double().square().sum(-1).reshape(-1) for h in hidden])
    if gather_tokens is not None:
        norms = gather_tokens(norms)
    if norms.numel() == 0 or not float(norms.median()) > 0:
        raise SecateurError("putri: the residual stream is empty or all zero; check the calibration data")
    return float(norms.median())


def group_energy(weight: torch.Tensor, gram: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Per KV group g: mean over tokens of ‖W[:, g] z_g‖² = Σ (W_g G_gg ⊙ W_g), G = XᵀX / n."""
    return torch.stack([((weight[:, c] @ gram[c][:, c]) * weight[:, c]).sum() for c in columns])


def _zero(view, columns) -> None:
    weight = view.get_weight().clone()
    weight[:, columns] = 0
    view.set_weight(weight)


@contextmanager
def zeroed_columns(view, columns: torch.Tensor):
    """Temporarily zero some input columns of a layer (removes those units' contribution
    exactly, without slicing): used to try a removal before committing to it."""
    weight = view.get_weight()
    saved = weight[:, columns].clone()
    patched = weight.clone()
    patched[:, columns] = 0
    view.set_weight(patched)
    try:
        yield
    finally:
        restored = view.get_weight().clone()
        restored[:, columns] = saved
        view.set_weight(restored)
