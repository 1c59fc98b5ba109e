"""Wanda-SP: structured Wanda scores for FFN neurons and attention KV groups.

Pure functions only; the flow that gathers statistics and slices the model lives elsewhere.

Wanda scores one weight by |W_ij| · ‖X_j‖₂ (its magnitude times the norm of its input over the
calibration tokens, `LinearStats.column_norm()`). A structured unit (an FFN neuron, a KV group)
takes away several weights at once, and its score is the sum of theirs:

    FFN neuron j:  Σ_producers Σ_c |P[j, c]| · ‖X_c‖   (its row in gate_proj and up_proj,
                                                        with their input norms)
                 + ‖Z_j‖ · Σ_r |W_down[r, j]|          (its column in down_proj, with
                                                        down_proj's input norm)

Decision: we sum over every weight removed with the unit (producer rows and consumer column),
so the score is the Wanda mass the unit takes away. The FLAP authors' Wanda-sp baseline scores
only the consumer's columns; pass an empty producer list to get exactly that variant.
KV groups use the same sum over the rows of q/k/v (query heads of the group, its key and value
head) and the o_proj columns of its query heads: `group_scores_from_channels`.

Ranking KV groups across blocks: a Wanda mass lives on its block's own scale (activation norms
grow along the residual stream; SmolLM2's block 0 sums are 4–5× smaller than the others), so
ranking raw sums over the model empties block 0 first (3 groups, 0.8 % of the parameters, take
SmolLM2 from perplexity 27.5 to 318). The reference code sidesteps this with a per-layer quota
(every layer loses the same fraction of heads). Here KV groups are removed where they score
lowest over the model (Putri's budget split), so each group is scored by its *share of its
block's total* group mass (`block_shares`): comparable across blocks, and the ranking within a
block is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.methods._units import lowest_groups, model_budget, top_k
from secateur.methods.base import StructuredMethod, register


def row_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Σ_c |W[r, c]| · ‖X_c‖ per output row r of a producer, float64, shape (rows,)."""
    _, cols = _check_weight("producer weight", weight)
    _check_norm("producer input norm", input_norm, cols)
    return weight.detach().to(torch.float64).abs() @ input_norm.detach().to(torch.float64)


def column_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """‖X_j‖ · Σ_r |W[r, j]| per input column j of a consumer, float64, shape (cols,)."""
    _, cols = _check_weight("consumer weight", weight)
    _check_norm("consumer input norm", input_norm, cols)
    return weight.detach().to(torch.float64).abs().sum(0) * input_norm.detach().to(torch.float64)


def channel_scores(
    producer_weights: list[torch.Tensor],
    producer_input_norm: torch.Tensor,
    consumer_weight: torch.Tensor,
    consumer_input_norm: torch.Tensor,
) -> torch.Tensor:
    """Structured Wanda score of every intermediate channel j, float64, shape (in,).

    Row j of every producer (gate_proj, up_proj: (in, hidden), all reading the same input of
    norm `producer_input_norm`) plus column j of the consumer (down_proj: (out, in), input norm
    `consumer_input_norm`). An empty producer list scores the consumer column only.
    """
    _, cols = _check_weight("consumer weight", consumer_weight)
    total = column_scores(consumer_weight, consumer_input_norm)
    for i, producer in enumerate(producer_weights):
        if producer.dim() != 2 or producer.shape[0] != cols:
            raise SecateurError(
                f"wanda_sp: producer {i} must have {cols} rows (one per consumer input), "
                f"got shape {tuple(producer.shape)}"
            )
        total = total + row_scores(producer, producer_input_norm)
    return total


def group_scores_from_channels(
    producer_row_scores: list[torch.Tensor],
    producer_rows: list[list[torch.Tensor]],
    consumer_column_scores: torch.Tensor,
    consumer_columns: list[torch.Tensor],
) -> torch.Tensor:
    """Score of each group (KV group): the sum of the per-weight scores of everything it removes.

    producer_row_scores[i]: (rows_i,) `row_scores` of producer i (q_proj, k_proj, v_proj);
    producer_rows[i][g]: the rows of producer i that group g owns (its query heads' rows in
    q_proj, its key head's rows in k_proj, ...); consumer_column_scores: (cols,) `column_scores`
    of the consumer (o_proj); consumer_columns[g]: its columns of group g. Returns (groups,),
    float64: score_g = Σ_i Σ_{r ∈ rows_i[g]} row_i[r] + Σ_{c ∈ columns[g]} col[c]. A sum, not a
    mean: with equal-size groups the ranking is the same, and the sum is the Wanda mass removed.
    """
    groups = len(consumer_columns)
    if len(producer_rows) != len(producer_row_scores):
        raise SecateurError(
            f"wanda_sp: {len(producer_row_scores)} producer score vectors but {len(producer_rows)} row lists"
        )
    out = torch.zeros(groups, dtype=torch.float64)
    out += _gather_sums("consumer columns", consumer_column_scores, consumer_columns)
    for i, (scores, rows) in enumerate(zip(producer_row_scores, producer_rows, strict=True)):
        if len(rows) != groups:
            raise SecateurError(
                f"wanda_sp: producer {i} has row lists for {len(rows)} groups, expected {groups}"
            )
        out += _gather_sums(f"producer {i} rows", scores, rows)
    return out


def block_shares(scores: torch.Tensor) -> torch.Tensor:
    """Each unit's share of its block's total score, float64 (all equal when the total is 0)."""
    scores = scores.detach().to(torch.float64)
    total = scores.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(scores, 1.0 / max(scores.numel(), 1))
    return scores / total


def _gather_sums(name: str, scores: torch.Tensor, index_lists: list[torch.Tensor]) -> torch.Tensor:
    if scores.dim() != 1:
        raise SecateurError(f"wanda_sp: {name} scores must be 1-D, got shape {tuple(scores.shape)}")
    scores = scores.detach().to(torch.float64)
    sums = torch.empty(len(index_lists), dtype=torch.float64)
    for g, index in enumerate(index_lists):
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= scores.numel()):
            raise SecateurError(f"wanda_sp: {name} of group {g} must be in [0, {scores.numel()})")
        sums[g] = scores[index].sum()
    return sums


def _check_weight(name: str, weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise SecateurError(
            f"wanda_sp: {name} must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}"
        )
    return weight.shape[0], weight.shape[1]


def _check_norm(name: str, norm: torch.Tensor, cols: int) -> None:
    if norm.shape != (cols,):
        raise SecateurError(f"wanda_sp: {name} must be ({cols},), one per input, got {tuple(norm.shape)}")


# --- the method: plumbing around the math above ---------------------------------------


@register
@dataclass
class WandaSP(StructuredMethod):
    """Structured Wanda, the baseline: FFN channels and KV groups ranked by the summed Wanda
    score of the weights removed with them, no weight update. Uses Putri's budget split (same
    FFN width in every block, KV groups removed where they score lowest over the model), so the
    two differ only in what they score and whether they update."""

    name: ClassVar[str] = "wanda-sp"
    alpha: float = 1.5


    def prune_model(self, session, sparsity: float) -> dict:
        adapter = session.adapter
        blocks = adapter.blocks()
        budget = model_budget(adapter, sparsity, self.alpha)
        session.start_pass()
        group_scores_per_block = []
        for index in tqdm(range(len(blocks)), desc="wanda-sp", unit="block", disable=not session.progress):
            step = f"wanda-sp/{index}"  # one resumable step per block: its group shares and kept neurons
            saved = session.replay(step)
            with session.block(index) as block:
                scored = saved.tensors if saved is not None else self._block_scores(session, index, block,
                                                                                    budget.ffn_keep)
                group_scores_per_block.append(scored["group_shares"])
                if "keep" in scored:
                    adapter.keep_ffn(block, scored["keep"])
                if saved is None:
                    if index + 1 < len(blocks):
                        session.advance(index)
                    session.complete(step, scored)
        removed = lowest_groups(group_scores_per_block, budget.heads_groups_to_remove)
        for index in range(len(blocks)):
            if removed[index]:
                with session.block(index) as block:
                    heads = adapter.head_units(block)
                    adapter.keep_head_groups(block, [g for g in range(heads.num_groups) if g not in removed[index]])
        return {"ffn_keep": budget.ffn_keep, "kv_groups_removed": removed}

    def _block_scores(self, session, index: int, block, ffn_keep: int) -> dict[str, torch.Tensor]:
        """Block `index`'s KV groups' shares of its Wanda mass and, when its FFN is cut, the
        `ffn_keep` neurons it keeps, from one pass of the block."""
        adapter = session.adapter
        ffn, heads = adapter.ffn_units(block), adapter.head_units(block)
        views = dict(ffn.producers) | {ffn.consumer_name: ffn.consumer} | dict(heads.producers) | {
            heads.consumer_name: heads.consumer}
        stats = session.gather(index, views, frozenset({"sumsq"}))
        scored = {"group_shares": block_shares(self._group_scores(heads, stats))}
        if ffn_keep < ffn.width:
            first_producer = next(iter(ffn.producers))
            scores = channel_scores(
                [v.get_weight().double() for v in ffn.producers.values()],
                stats[first_producer].column_norm(),
                ffn.consumer.get_weight().double(),
                stats[ffn.consumer_name].column_norm(),
            )
            scored["keep"] = top_k(scores, ffn_keep)
        return scored

    @staticmethod
    def _group_scores(heads, stats) -> torch.Tensor:
        names = list(heads.producers)
        producer_scores = [row_scores(heads.producers[n].get_weight().double(), stats[n].column_norm()) for n in names]
        consumer_scores = column_scores(heads.consumer.get_weight().double(), stats[heads.consumer_name].column_norm())
        return group_scores_from_channels(
            producer_scores, [heads.producer_rows[n] for n in names], consumer_scores, heads.consumer_columns)
