"""FLAP (fluctuation-based adaptive structured pruning): the tensor math.

Pure functions only; the flow that gathers statistics and slices the model lives elsewhere.
See docs/algorithms.md, "Structured pruning / FLAP".

- Score of input channel j of a consumer (down_proj, o_proj): its fluctuation
  var(x_j) · ‖W_:,j‖² (variance of the channel over calibration tokens, times the squared
  norm of the weight column it feeds). For o_proj the fluctuation is squared, as in the
  reference implementation's WIFV metric for attention.
- Scores are standardized per layer over its *channels* (z-score) so that layers of different
  scale compare; only then does a head score the mean of its channels' z-scores
  (`head_scores`). Standardizing the few head means instead (3 KV groups on SmolLM2) would
  force Σz = 0, Σz² = n − 1 in every block, so every block's weakest head would look equally
  weak whatever its real importance. One global threshold over every layer's units (a unit
  counts with its parameter cost) then picks what to remove: blocks end up with different
  widths.
- GQA adaptation: the paper's unit is one attention head; with grouped-query attention a key /
  value head is shared by n_heads / n_kv_heads query heads and can only go with all of them,
  so the unit is a KV group and its score is the mean over all its query heads' o_proj channels
  (the same reduction the reference's GQA port makes).
- Bias compensation: the removed channels' mean contribution moves into the bias,
  b += W_:,pruned · μ_pruned, so the output's mean over the calibration data is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.methods._units import unit_params
from secateur.methods.base import StructuredMethod, register


def fluctuation_scores(variance: torch.Tensor, consumer_weight: torch.Tensor) -> torch.Tensor:
    """var_j · ‖W_:,j‖² per input channel j of the consumer, float64, shape (in,)."""
    if consumer_weight.dim() != 2:
        raise SecateurError(
            f"flap: consumer_weight must be a 2-D (out, in) matrix, got shape {tuple(consumer_weight.shape)}"
        )
    cols = consumer_weight.shape[1]
    if variance.shape != (cols,):
        raise SecateurError(
            f"flap: variance must be ({cols},), one per consumer input, got {tuple(variance.shape)}"
        )
    column_sq = consumer_weight.detach().to(torch.float64).square().sum(0)
    return variance.detach().to(torch.float64) * column_sq


def group_scores(channel_scores: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Mean channel score of each group (e.g. the o_proj columns of a KV group's query heads)."""
    if channel_scores.dim() != 1:
        raise SecateurError(f"flap: channel_scores must be 1-D, got shape {tuple(channel_scores.shape)}")
    scores = channel_scores.detach().to(torch.float64)
    out = torch.empty(len(columns), dtype=torch.float64)
    for g, cols in enumerate(columns):
        cols = torch.as_tensor(cols, dtype=torch.long)
        if cols.numel() == 0:
            raise SecateurError(f"flap: group {g} has no channels")
        if cols.min() < 0 or cols.max() >= scores.numel():
            raise SecateurError(f"flap: group {g} channel indices must be in [0, {scores.numel()})")
        out[g] = scores[cols].mean()
    return out


def head_scores(channel_fluctuation: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """FLAP's attention unit scores: square the o_proj channel fluctuations, standardize them over
    the layer's channels, then average per group (KV group) — in that order, see the module doc."""
    return group_scores(standardize(channel_fluctuation.detach().to(torch.float64).square()), columns)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(scores − mean) / std within one layer, float64; all zeros when std is 0 or undefined.

    The std is the unbiased (n − 1) one, as in the reference FLAP code; a layer of one unit
    (std undefined) or of equal scores standardizes to zeros.
    """
    x = scores.detach().to(torch.float64).reshape(-1)
    if x.numel() < 2:
        return torch.zeros_like(x).reshape(scores.shape)
    std = x.std()
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x).reshape(scores.shape)
    return ((x - x.mean()) / std).reshape(scores.shape)


def global_selection(
    units: list[tuple[torch.Tensor, int]], params_to_remove: int, min_keep: list[int]
) -> list[torch.Tensor]:
    """Keep masks (True = keep) per layer after removing the globally lowest-scored units.

    `units[i]` = (standardized scores of layer i's units, parameter cost of one unit there).
    Units are removed in ascending score order over all layers (one threshold), each adding its
    cost, until the removed count is within half the cheapest unit's cost of `params_to_remove`:
    a unit that would overshoot further is passed over (a KV group can be 60× a FFN channel)
    and cheaper ones above the threshold are taken instead. A layer whose removable
    units (count − min_keep[i]) are used up is skipped, so the threshold rises past it. Ties go
    to the earlier layer, then the lower index (stable sort): the same input gives the same
    masks. Raises SecateurError when min_keep leaves fewer removable parameters than asked.
    """
    if len(min_keep) != len(units):
        raise SecateurError(f"flap: min_keep has {len(min_keep)} entries for {len(units)} layers")
    sizes, costs, all_scores = [], [], []
    for i, (scores, cost) in enumerate(units):
        if scores.dim() != 1:
            raise SecateurError(f"flap: layer {i} scores must be 1-D, got shape {tuple(scores.shape)}")
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise SecateurError(f"flap: layer {i} unit cost must be a positive integer, got {cost!r}")
        if not 0 <= min_keep[i] <= scores.numel():
            raise SecateurError(f"flap: min_keep[{i}] must be in [0, {scores.numel()}], got {min_keep[i]}")
        if torch.isnan(scores).any():
            raise SecateurError(f"flap: layer {i} scores contain NaN; check the calibration statistics")
        sizes.append(scores.numel())
        costs.append(cost)
        all_scores.append(scores.detach().to(torch.float64))
    keep = [torch.ones(n, dtype=torch.bool) for n in sizes]
    if params_to_remove <= 0 or not units:
        return keep
    removable = sum((n - k) * c for n, k, c in zip(sizes, min_keep, costs, strict=True))
    if removable < params_to_remove:
        raise SecateurError(
            f"flap: asked to remove {params_to_remove} parameters but at most {removable} can go while "
            "keeping the required units in every layer; use a lower sparsity"
        )
    flat = torch.cat(all_scores)
    layer_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
    order = torch.argsort(flat, stable=True)
    budget_left = [n - k for n, k in zip(sizes, min_keep, strict=True)]
    removed = 0
    slack = min(costs) / 2
    # First pass: never overshoot by more than half the cheapest unit. Second pass (only when
    # the cheap units ran out): take the next units in score order until the target is met.
    for strict in (True, False):
        for pos in order.tolist():
            if removed >= params_to_remove - slack:
                return keep
            layer = int(layer_of[pos])
            index = pos - int(offsets[layer])
            if budget_left[layer] == 0 or not keep[layer][index]:
                continue
            if strict and removed + costs[layer] > params_to_remove + slack:
                continue
            keep[layer][index] = False
            budget_left[layer] -= 1
            removed += costs[layer]
    return keep


def bias_compensation(
    consumer_weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor
) -> torch.Tensor:
    """Bias to add to the consumer, W[:, removed] @ mean[removed], float64, shape (out,)."""
    if consumer_weight.dim() != 2:
        raise SecateurError(
            f"flap: consumer_weight must be a 2-D (out, in) matrix, got shape {tuple(consumer_weight.shape)}"
        )
    cols = consumer_weight.shape[1]
    if mean.shape != (cols,) or removed.shape != (cols,) or removed.dtype != torch.bool:
        raise SecateurError(
            f"flap: mean and removed must be ({cols},) (removed boolean), got {tuple(mean.shape)} and "
            f"{removed.dtype} {tuple(removed.shape)}"
        )
    W = consumer_weight.detach().to(torch.float64)
    return W[:, removed] @ mean.detach().to(torch.float64)[removed]


# --- the method: plumbing around the math above ---------------------------------------


@register
@dataclass
class Flap(StructuredMethod):
    """FLAP: fluctuation scores of FFN channels and KV groups, standardised per layer, one global
    threshold (blocks end with different widths), bias compensation with the removed channels'
    mean contribution. Statistics come from the dense model in one pass, as in the paper."""

    name: ClassVar[str] = "flap"
    heads: bool = True  # also remove KV groups (False: FFN channels only)


    def prune_model(self, session, sparsity: float) -> dict:
        adapter = session.adapter
        blocks = adapter.blocks()
        to_remove = round(sparsity * adapter.count_block_params())
        session.start_pass()
        units, min_keep, layout = [], [], []
        for index, block in enumerate(tqdm(blocks, desc="flap stats", unit="block", disable=not session.progress)):
            step = f"flap-stats/{index}"  # one resumable step per block: its scores and channel means
            saved = session.replay(step)
            if saved is not None:
                scored = saved.tensors
            else:
                with session.block(index) as block:
                    scored = self._block_scores(session, index, block, advance=index + 1 < len(blocks))
                session.complete(step, scored)
            ffn = adapter.ffn_units(block)
            units.append((scored["ffn_scores"], unit_params(ffn) // ffn.width))
            min_keep.append(1)
            layout.append((index, "ffn", ffn.consumer_name, scored["ffn_mean"], None))
            if self.heads:
                heads = adapter.head_units(block)
                units.append((scored["head_scores"], heads.params_per_group))
                min_keep.append(1)
                layout.append((index, "heads", heads.consumer_name, scored["head_mean"], heads.consumer_columns))
        if to_remove > sum(cost * (len(s) - keep) for (s, cost), keep in zip(units, min_keep)):
            raise SecateurError(f"flap cannot remove {sparsity:.0%} of the block parameters: at most one KV group "
                                "and one FFN channel must stay per block; lower --sparsity")
        # A compensated consumer without a bias gains one (out_features kept parameters): count
        # them in the budget, so that the model lands on the target with its new biases.
        target = to_remove
        for _ in range(4):
            masks = global_selection(units, target, min_keep)
            new_bias_params = self._new_bias_params(adapter, blocks, layout, masks)
            if target == to_remove + new_bias_params:
                break
            target = to_remove + new_bias_params
        for (index, kind, consumer_name, mean, columns), keep_mask in zip(layout, masks):
            if bool(keep_mask.all()):
                continue
            with session.block(index) as block:
                view = adapter.linears(block)[consumer_name]
                removed_columns = (~keep_mask).nonzero().flatten() if columns is None else torch.cat(
                    [columns[g] for g in (~keep_mask).nonzero().flatten().tolist()])
                removed = torch.zeros(view.in_features, dtype=torch.bool)
                removed[removed_columns] = True
                shift = bias_compensation(view.get_weight().double(), mean, removed)
                if adapter.ensure_bias(block, consumer_name):
                    view = adapter.linears(block)[consumer_name]
                    old = view.get_bias()
                    view.set_bias(old.double() + shift)
                else:
                    session.warnings.append(f"block {index} {consumer_name}: the architecture cannot hold a bias "
                                            "here; FLAP's bias compensation skipped")
                if kind == "ffn":
                    adapter.keep_ffn(block, keep_mask.nonzero().flatten())
                else:
                    adapter.keep_head_groups(block, keep_mask.nonzero().flatten().tolist())
        return {}

    def _block_scores(self, session, index: int, block, advance: bool) -> dict[str, torch.Tensor]:
        """Block `index`'s standardised unit scores and its consumers' input means, from one pass
        of the block (which also advances it when `advance`)."""
        adapter = session.adapter
        ffn = adapter.ffn_units(block)
        views = {ffn.consumer_name: ffn.consumer}
        heads = adapter.head_units(block) if self.heads else None
        if heads is not None:
            views[heads.consumer_name] = heads.consumer
        stats = session.gather(index, views, frozenset({"sum", "sumsq"}), advance=advance)
        down = stats[ffn.consumer_name]
        scored = {"ffn_scores": standardize(fluctuation_scores(down.variance(), ffn.consumer.get_weight().double())),
                  "ffn_mean": down.mean()}
        if heads is not None:
            o_stats = stats[heads.consumer_name]
            channel = fluctuation_scores(o_stats.variance(), heads.consumer.get_weight().double())
            scored |= {"head_scores": head_scores(channel, heads.consumer_columns), "head_mean": o_stats.mean()}
        return scored

    @staticmethod
    def _new_bias_params(adapter, blocks, layout, masks) -> int:
        """Parameters of the biases that compensation will add for these keep masks."""
        total = 0
        for (index, _, consumer_name, _, _), keep_mask in zip(layout, masks, strict=True):
            view = adapter.linears(blocks[index])[consumer_name]
            if (not bool(keep_mask.all()) and view.get_bias() is None
                    and adapter.can_hold_bias(blocks[index], consumer_name)):
                total += view.out_features
        return total
