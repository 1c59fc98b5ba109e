"""What the structured methods share: the α-rule budget split, top-k and lowest-group
selection, and the parameter count of an FFN. Putri, wanda-sp and FLAP import these from here,
so that no method file is another method's toolkit.

Budget (decoder-block parameters only). With L blocks, target s, P_mlp / P_attn the parameters
of one MLP / attention module and α = 1.5 (Putri's published value), the attention share is

    n_attn = round(L · s^((P_mlp / P_attn) / α))          attention modules' worth of heads,

i.e. n_attn · num_groups KV groups over the whole model. The rest of the budget
s · L · (P_mlp + P_attn) − (removed attention parameters) is spread evenly over the FFNs, so
every FFN keeps the same width d_ff − remaining / (L · params per neuron), rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secateur.errors import SecateurError

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


def model_budget(adapter, sparsity: float, alpha: float) -> PutriBudget:
    """The α-rule budget for a model whose blocks all have the first block's shape."""
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
