"""Putri (Prune, Update and Trim): the tensor math of the structured seed method.

Pure functions only; the flow that hooks the model, slices the weights and runs the greedy
head search lives elsewhere. See docs/algorithms.md, "Structured pruning / Putri".

Budget (decoder-block parameters only). With L blocks, target s, P_mlp / P_attn the parameters
of one MLP / attention module and α = 1.5, the attention share is

    n_attn = round(L · s^((P_mlp / P_attn) / α))          attention modules' worth of heads,

i.e. n_attn · num_groups KV groups over the whole model. The rest of the budget
s · L · (P_mlp + P_attn) − (removed attention parameters) is spread evenly over the FFNs, so
every FFN keeps the same width d_ff − remaining / (L · params per neuron), rounded.

FFN neurons (inputs j of down_proj, with H = XᵀX, C = XᵀY, c_r = mean y_r²):

    s_j = Σ_r c_r · W_rj² / U_jj²,     U = upper Cholesky factor of H⁻¹

(SparseGPT's saliency of column j, weighted by each output's energy). The kept neurons S get a
least-squares down_proj: Wᵀ = (H_SS)⁻¹ C_S = argmin ‖X_S Wᵀ − Y‖².
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.methods.base import StructuredMethod, register
from secateur.methods.sparsegpt import DAMP_RETRIES, inverse_cholesky_upper

ALPHA = 1.5


@dataclass(frozen=True)
class PutriBudget:
    """What to remove: KV groups over the whole model, and the FFN width every block keeps."""

    heads_groups_to_remove: int
    ffn_keep: int


def putri_budget(
    num_blocks: int,
    sparsity: float,
    mlp_params: int,
    attn_params: int,
    group_params: int,
    num_groups: int,
    ffn_width: int,
    ffn_neuron_params: int,
    alpha: float = ALPHA,
) -> PutriBudget:
    """Split the parameter budget s · L · (P_mlp + P_attn) between KV groups and FFN neurons.

    n_attn = round(L · s^((P_mlp / P_attn) / α)) attention modules' worth → n_attn · num_groups
    KV groups in total, capped at L · (num_groups − 1) so that no block can lose all its groups
    (with one KV group per block no group is removed). The removed attention parameters are
    (groups · group_params); what is left of the budget is spread evenly over the L FFNs:
    ffn_keep = round(d_ff − remaining / (L · ffn_neuron_params)), clamped to [1, d_ff]. When the
    attention share alone exceeds the target (small s with a large α), remaining < 0 and the
    FFNs are kept whole: the removal overshoots the target rather than growing FFNs.

    Raises SecateurError for a sparsity outside [0, 1), non-positive sizes, or a target that
    would need every FFN to lose all its neurons.
    """
    for name, value in (
        ("num_blocks", num_blocks),
        ("mlp_params", mlp_params),
        ("attn_params", attn_params),
        ("group_params", group_params),
        ("num_groups", num_groups),
        ("ffn_width", ffn_width),
        ("ffn_neuron_params", ffn_neuron_params),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecateurError(f"putri budget: {name} must be a positive integer, got {value!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0.0 <= sparsity < 1.0:
        raise SecateurError(
            f"putri: sparsity must be in [0, 1) (a fraction of block parameters), got {sparsity!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise SecateurError(f"putri: alpha must be > 0 (1.5 is the published value), got {alpha!r}")

    L = num_blocks
    n_attn = round(L * float(sparsity) ** ((mlp_params / attn_params) / alpha))
    groups = min(n_attn * num_groups, L * (num_groups - 1))
    target = sparsity * L * (mlp_params + attn_params)
    remaining = target - groups * group_params
    per_block_neurons = remaining / (L * ffn_neuron_params)
    raw_keep = ffn_width - per_block_neurons
    if raw_keep < 0.5:  # would round to 0 neurons: every FFN gone and still short of the target
        removable = groups * group_params + L * (ffn_width - 1) * ffn_neuron_params
        raise SecateurError(
            f"putri: sparsity {sparsity:g} asks to remove {target:.0f} block parameters, but at most "
            f"{removable} can go ({groups} KV groups and all but 1 of the {ffn_width} FFN neurons in each "
            f"of {L} blocks); use a lower sparsity"
        )
    ffn_keep = min(max(round(raw_keep), 1), ffn_width)
    return PutriBudget(heads_groups_to_remove=groups, ffn_keep=ffn_keep)


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
    gram: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damp: float = 1e-6
) -> torch.Tensor:
    """New weight (out, k) for the kept inputs S: ((H_SS + λI)⁻¹ C_S)ᵀ, float64.

    The argmin of ‖X_S Wᵀ − Y‖² given H = XᵀX (gram) and C = XᵀY (cross). λ = damp · mean(diag
    H_SS) is a tiny ridge for safety (damp = 0 solves exactly), raised tenfold while H_SS + λI is
    not positive definite; solved by Cholesky, never by an explicit inverse. Column i of the
    result belongs to input keep[i] (pass sorted indices, as `top_k` returns, for a sliced layer).
    """
    cols = gram.shape[0] if gram.dim() == 2 else -1
    if gram.dim() != 2 or gram.shape[1] != cols:
        raise SecateurError(f"putri: gram must be a square (in, in) matrix, got {tuple(gram.shape)}")
    if cross.dim() != 2 or cross.shape[0] != cols:
        raise SecateurError(f"putri: cross must be (in={cols}, out), got {tuple(cross.shape)}")
    keep = _check_index("keep", keep, cols)
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp >= 0:
        raise SecateurError(f"putri: damp must be >= 0 (1e-6 is usual), got {damp!r}")
    H = gram.detach().to(torch.float64)[keep][:, keep]
    C = cross.detach().to(torch.float64)[keep]
    if keep.numel() == 0:
        return C.T.clone()  # (out, 0)
    mean_diag = torch.diagonal(H).mean()
    scale = mean_diag if mean_diag > 0 else torch.ones((), dtype=H.dtype)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    factor = float(damp)
    for _ in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + factor * scale * eye)
        if info == 0:
            solution = torch.cholesky_solve(C, L)
            if torch.isfinite(solution).all():
                return solution.T.contiguous()
        factor = factor * 10 if factor > 0 else 1e-10
    raise SecateurError(
        f"putri: the kept neurons' Gram matrix is singular (not positive definite even with ridge "
        f"{factor / 10:g} · mean diagonal): use more calibration data or a larger refit damp"
    )


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k highest scores; among equal scores the lower index is kept."""
    if scores.dim() != 1:
        raise SecateurError(f"top_k: scores must be 1-D, got shape {tuple(scores.shape)}")
    n = scores.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise SecateurError(f"top_k: k must be an integer in [0, {n}], got {k!r}")
    if torch.isnan(scores).any():
        raise SecateurError("top_k: scores contain NaN; check the calibration statistics")
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


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


# --- the method: plumbing around the math above ---------------------------------------

HEAD_SCORES = ("reconstruction", "perplexity")


@register
@dataclass
class Putri(StructuredMethod):
    """Prune, Update and Trim: FFN neurons block by block with a least-squares update of the
    down projection, then whole KV groups of attention heads.

    Head score (`head_score`):
      - "reconstruction" (default): the energy a KV group adds to its block's attention output,
        ‖W_o[:, g] z_g‖² summed over calibration tokens, read off the o_proj input Gram matrix
        gathered in one pass. One forward pass in all, so it scales to real models.
      - "perplexity": the paper's greedy search: zero each remaining group in turn and measure the
        calibration loss on `search_windows` windows; remove the best candidates, repeat. About
        (blocks × groups) full forward passes per round: accurate, and hours on a 7B model on CPU.
    """

    name: ClassVar[str] = "putri"
    alpha: float = 1.5
    head_score: str = "reconstruction"
    refit_o_proj: bool = True
    search_windows: int = 1
    damp: float = 0.01

    def __post_init__(self):
        if self.head_score not in HEAD_SCORES:
            raise SecateurError(f"unknown putri head_score {self.head_score!r}; accepted: {', '.join(HEAD_SCORES)}")
        if self.alpha <= 0 or self.search_windows < 1:
            raise SecateurError("putri needs alpha > 0 and search_windows >= 1")


    def prune_model(self, session, sparsity: float) -> dict:
        budget = model_budget(session.adapter, sparsity, self.alpha)
        self._prune_ffn(session, budget.ffn_keep)
        removed = self._remove_heads(session, budget.heads_groups_to_remove)
        return {"ffn_keep": budget.ffn_keep, "kv_groups_removed": removed, "head_score": self.head_score}

    def _prune_ffn(self, session, keep_width: int) -> None:
        """Stage 1: block by block on the outputs of the already pruned blocks."""
        adapter = session.adapter
        session.start_pass()
        needs = frozenset({"sum", "gram", "cross", "out_sumsq"})
        blocks = adapter.blocks()
        for index, block in enumerate(tqdm(blocks, desc="putri FFN", unit="block", disable=not session.progress)):
            ffn = adapter.ffn_units(block)
            if keep_width < ffn.width:
                stats = session.gather(index, {ffn.consumer_name: ffn.consumer}, needs)[ffn.consumer_name]
                weight = ffn.consumer.get_weight().double()
                scores = ffn_neuron_scores(weight, stats.gram, stats.out_sumsq / stats.count, self.damp)
                keep = top_k(scores, keep_width)
                adapter.keep_ffn(block, keep)
                adapter.ffn_units(block).consumer.set_weight(
                    least_squares_refit(stats.gram, _target_cross(stats, ffn.consumer.get_bias()), keep).float()
                )
            if index + 1 < len(blocks):
                session.advance(index)

    def _remove_heads(self, session, count: int) -> list[list[int]]:
        """Stage 2: remove `count` KV groups over the whole model (at least one stays per block)."""
        adapter = session.adapter
        blocks = adapter.blocks()
        removed: list[list[int]] = [[] for _ in blocks]
        if count == 0:
            return removed
        grams = None
        if self.head_score == "reconstruction" or self.refit_o_proj:
            grams = self._o_proj_grams(session)
        if self.head_score == "reconstruction":
            scores = []
            for index, block in enumerate(blocks):
                heads = adapter.head_units(block)
                weight = heads.consumer.get_weight().double()
                scores.append(group_energy(weight, grams[index], heads.consumer_columns))
            removed = lowest_groups(scores, count)
        else:
            removed = self._greedy_search(session, count)
        for index, block in enumerate(blocks):
            heads = adapter.head_units(block)
            keep = [g for g in range(heads.num_groups) if g not in removed[index]]
            if len(keep) == heads.num_groups:
                continue
            kept_columns = torch.cat([heads.consumer_columns[g] for g in keep])
            new_weight = None
            if self.refit_o_proj:
                gram = grams[index]
                cross = gram @ heads.consumer.get_weight().double().T  # Y = X W_oᵀ: target is the dense output
                new_weight = least_squares_refit(gram, cross, kept_columns).float()
            adapter.keep_head_groups(block, keep)
            if new_weight is not None:
                adapter.head_units(block).consumer.set_weight(new_weight)
        return removed

    def _o_proj_grams(self, session) -> list[torch.Tensor]:
        """One pass: the Gram matrix of every block's o_proj input (XᵀX / n)."""
        adapter = session.adapter
        session.start_pass()
        grams = []
        blocks = adapter.blocks()
        for index, block in enumerate(tqdm(blocks, desc="putri heads", unit="block", disable=not session.progress)):
            heads = adapter.head_units(block)
            stats = session.gather(index, {heads.consumer_name: heads.consumer}, frozenset({"gram"}),
                                   advance=index + 1 < len(blocks))[heads.consumer_name]
            grams.append(stats.gram / stats.count)
        return grams

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


def model_budget(adapter, sparsity: float, alpha: float) -> PutriBudget:
    """Putri's α-rule budget for a model whose blocks all have the first block's shape."""
    first = adapter.blocks()[0]
    ffn, heads = adapter.ffn_units(first), adapter.head_units(first)
    mlp_params = unit_params(ffn)
    return putri_budget(
        len(adapter.blocks()), sparsity, mlp_params, heads.params_per_group * heads.num_groups,
        heads.params_per_group, heads.num_groups, ffn.width, mlp_params // ffn.width, alpha,
    )


def unit_params(ffn) -> int:
    """Weights of one FFN: its producers and its consumer."""
    return sum(v.out_features * v.in_features for v in ffn.producers.values()) + (
        ffn.consumer.out_features * ffn.consumer.in_features)


def _target_cross(stats, bias):
    """XᵀY for fitting the weight alone: the bias stays, so fit Y − b (XᵀY − (Σx) bᵀ)."""
    if bias is None:
        return stats.cross
    return stats.cross - torch.outer(stats.sum, bias.double())


def group_energy(weight: torch.Tensor, gram: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Per KV group g: mean over tokens of ‖W[:, g] z_g‖² = Σ (W_g G_gg ⊙ W_g), G = XᵀX / n."""
    return torch.stack([((weight[:, c] @ gram[c][:, c]) * weight[:, c]).sum() for c in columns])


def lowest_groups(scores: list[torch.Tensor], count: int) -> list[list[int]]:
    """The `count` lowest-scoring groups over all blocks, at most all-but-one per block."""
    order = sorted((float(s), index, group) for index, block in enumerate(scores) for group, s in enumerate(block))
    removed: list[list[int]] = [[] for _ in scores]
    for _, index, group in order:
        if sum(map(len, removed)) == count:
            break
        if len(removed[index]) < len(scores[index]) - 1:
            removed[index].append(group)
    return [sorted(groups) for groups in removed]


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
