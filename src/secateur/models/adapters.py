"""One adapter per decoder family, registered by `config.model_type`.

Which layers can hold a bias, and which config flag creates it, was read from each
family's modeling code in transformers 5.x:

- llama: `attention_bias` → q/k/v/o; `mlp_bias` → gate/up/down.
- qwen3, gemma3_text: `attention_bias` → q/k/v/o; the MLP is hard-coded bias=False.
- qwen2: q/k/v always have a bias; o_proj and the MLP are hard-coded bias=False.
- mistral: every linear is hard-coded bias=False.
- opt: `enable_bias` → all six linears (on by default).
- gpt2: every Conv1D always has a bias.
- gpt_neox: `attention_bias` → query_key_value/dense; the MLP always has a bias.

A bias is added only to the layer that needs one (`ensure_bias`); the flag is turned on
only when every layer it governs has one, and a checkpoint in which only some do records
those per module (secateur.structured.checkpoint).

Structured slicing (physically removing FFN neurons, KV groups, blocks) was checked
against the same attention forwards: the Llama-like families, GPT-NeoX and (for
heads) nothing else reshape with `-1` heads, so only the weights change; OPT reads
`self_attn.num_heads` and GPT-2 reads `attn.num_heads`/`attn.split_size`, which are
updated with the weights. Every block's `layer_idx` is renumbered after block removal
(the KV cache is indexed by it) and so is every per-layer config list (`layer_types`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import (
    ROLE_NORMED,
    ROLE_OUT,
    Adapter,
    BlockShape,
    FfnUnits,
    Geometry,
    HeadUnits,
    LinearView,
    register,
)


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _assign(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, attr = dotted.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, attr, value)


class _LayoutAdapter(Adapter):
    """Everything that follows from a handful of class attributes, shared by all families.

    Subclasses name where the base model and the block list live, the block's linears in
    execution order, and which config flag creates the bias of which linear.
    """

    base_model_path: ClassVar[str]  # dotted path from the CausalLM to its base model
    blocks_attr: ClassVar[str]  # attribute of the base model holding the block list
    linear_names: ClassVar[tuple[str, ...]]
    transposed: ClassVar[bool] = False  # GPT-2's Conv1D stores W as (in, out)
    bias_flags: ClassVar[dict[str, str]] = {}  # linear name → config flag that gives it a bias
    output_norm_names: ClassVar[dict[str, str]] = {}  # unit ("ffn", "heads") → norm applied to its output

    def base_model(self) -> nn.Module:
        return _resolve(self.model, self.base_model_path)

    def blocks(self) -> nn.ModuleList:
        return getattr(self.base_model(), self.blocks_attr)

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        setattr(self.base_model(), self.blocks_attr, blocks)

    def linears(self, block: nn.Module) -> dict[str, LinearView]:
        return {name: LinearView(_resolve(block, name), self.transposed) for name in self.linear_names}

    def layer_role(self, name: str) -> str:
        # The consumers of the FFN and of the heads are the block's output projections; every
        # other prunable linear reads one of the block's normalisations (pre- or post-norm alike).
        if name not in self.linear_names:
            raise SecateurError(f"{name!r} is not a prunable linear of {self.config.model_type}")
        return ROLE_OUT if name in (self.ffn_consumer_name, self.head_consumer_name) else ROLE_NORMED

    def ensure_bias(self, block: nn.Module, name: str) -> bool:
        module = _resolve(block, name)
        if getattr(module, "bias", None) is not None:
            return True
        if name not in self.bias_flags:  # the family's modeling code never gives this layer a bias
            return False
        # This layer only: the others the flag governs get no zero bias (they would count as kept
        # parameters). The flag follows, so that once every governed layer has a bias (STADE on
        # every layer) a plain save_pretrained/from_pretrained round trip keeps them all.
        _add_zero_bias(module, self.transposed)
        for flag, value in self.bias_flag_values().items():
            setattr(self.config, flag, value)
        return True

    def can_hold_bias(self, block: nn.Module, name: str) -> bool:
        return getattr(_resolve(block, name), "bias", None) is not None or name in self.bias_flags

    def bias_flag_values(self) -> dict[str, bool]:
        values: dict[str, bool] = {}
        for name, flag in self.bias_flags.items():
            has_bias = all(getattr(_resolve(block, name), "bias", None) is not None for block in self.blocks())
            values[flag] = values.get(flag, True) and has_bias
        return values


    # --- structured slicing -------------------------------------------------------
    ffn_producer_names: ClassVar[tuple[str, ...]]
    ffn_consumer_name: ClassVar[str]
    attention_name: ClassVar[str]  # the attention module, relative to the block
    head_consumer_name: ClassVar[str]
    ffn_width_attrs: ClassVar[dict[str, str]] = {}  # module (relative to block) -> attribute holding the FFN width
    per_layer_config_lists: ClassVar[tuple[str, ...]] = ("layer_types",)

    def _view(self, block: nn.Module, name: str) -> LinearView:
        return LinearView(_resolve(block, name), self.transposed)

    def _block_index(self, block: nn.Module) -> int:
        for i, candidate in enumerate(self.blocks()):
            if candidate is block:
                return i
        raise SecateurError("the block given is not one of this model's decoder blocks")

    def output_norm(self, block: nn.Module, unit: str) -> nn.Module | None:
        name = self.output_norm_names.get(unit)
        return None if name is None else _resolve(block, name)

    def ffn_units(self, block: nn.Module) -> FfnUnits:
        consumer = self._view(block, self.ffn_consumer_name)
        return FfnUnits(
            producers={name: self._view(block, name) for name in self.ffn_producer_names},
            consumer_name=self.ffn_consumer_name,
            consumer=consumer,
            width=consumer.in_features,
        )

    def keep_ffn(self, block: nn.Module, keep: torch.Tensor) -> None:
        units = self.ffn_units(block)
        index = self._block_index(block)
        keep = _checked_indices(keep, units.width, f"FFN neurons of block {index}")
        if keep.numel() == 0:  # a zero-width layer breaks some forwards (GPT-2's Conv1D) and configs
            raise SecateurError(f"cannot remove every FFN neuron of block {index}")
        for view in units.producers.values():
            view.keep_rows(keep)
        units.consumer.keep_columns(keep)
        for module_name, attr in self.ffn_width_attrs.items():
            module = _resolve(block, module_name)
            if hasattr(module, attr):
                setattr(module, attr, len(keep))

    # Heads: subclasses give the head size, the query heads per KV group, and the rows of
    # group g in each producer (relative to the block).
    def _head_dim(self, attention: nn.Module) -> int:
        return attention.head_dim

    def _queries_per_group(self, attention: nn.Module) -> int:
        return 1

    def _group_rows(self, block: nn.Module, num_groups: int) -> dict[str, list[torch.Tensor]]:
        raise NotImplementedError

    def _num_groups(self, block: nn.Module) -> int:
        attention = _resolve(block, self.attention_name)
        consumer = self._view(block, self.head_consumer_name)
        return consumer.in_features // (self._head_dim(attention) * self._queries_per_group(attention))

    def _set_head_attrs(self, attention: nn.Module, num_groups: int) -> None:
        """Update the attention module's head-count attributes after slicing."""

    def _kept_rows(self, group_rows: list[torch.Tensor]) -> torch.Tensor:
        """The rows a producer keeps, in the order its forward expects, from the kept groups' rows."""
        return torch.cat(group_rows)

    def head_units(self, block: nn.Module) -> HeadUnits:
        attention = _resolve(block, self.attention_name)
        head_dim = self._head_dim(attention)
        per_group = self._queries_per_group(attention) * head_dim
        num_groups = self._num_groups(block)
        producer_rows = self._group_rows(block, num_groups)
        producers = {name: self._view(block, name) for name in producer_rows}
        consumer = self._view(block, self.head_consumer_name)
        columns = [torch.arange(g * per_group, (g + 1) * per_group) for g in range(num_groups)]
        params = per_group * consumer.out_features
        for name, rows in producer_rows.items():
            view = producers[name]
            params += len(rows[0]) * (view.in_features + (view.get_bias() is not None))
        return HeadUnits(
            num_groups=num_groups,
            producer_rows=producer_rows,
            producers=producers,
            consumer_name=self.head_consumer_name,
            consumer=consumer,
            consumer_columns=columns,
            params_per_group=params,
        )

    def keep_head_groups(self, block: nn.Module, keep: list[int]) -> None:
        index = self._block_index(block)
        if len(keep) == 0:
            raise SecateurError(f"cannot remove every KV group of block {index}")
        units = self.head_units(block)
        keep = _checked_indices(keep, units.num_groups, f"KV groups of block {index}").tolist()
        for name, rows in units.producer_rows.items():
            units.producers[name].keep_rows(self._kept_rows([rows[g] for g in keep]))
        units.consumer.keep_columns(torch.cat([units.consumer_columns[g] for g in keep]))
        self._set_head_attrs(_resolve(block, self.attention_name), len(keep))

    def _check_block_removal(self, keep: list[int]) -> None:
        """Refuse a removal the family cannot express (hook for subclasses)."""

    def remove_blocks(self, indices: list[int]) -> None:
        blocks = self.blocks()
        total = len(blocks)
        drop = {int(i) for i in indices}
        if any(i < 0 or i >= total for i in drop):
            raise SecateurError(f"block indices must be in 0..{total - 1}; got {sorted(indices)}")
        if len(drop) == total:
            raise SecateurError(f"cannot remove all {total} decoder blocks")
        keep = [i for i in range(total) if i not in drop]
        self._check_block_removal(keep)
        kept = nn.ModuleList([blocks[i] for i in keep])
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        self.set_blocks(kept)
        for name in self.per_layer_config_lists:
            value = getattr(self.config, name, None)
            if isinstance(value, (list, tuple)) and len(value) == total:
                setattr(self.config, name, [value[i] for i in keep])
        self.config.num_hidden_layers = len(keep)

    def block_shapes(self) -> list[BlockShape]:
        shapes = []
        for block in self.blocks():
            attention = _resolve(block, self.attention_name)
            groups = self._num_groups(block)
            shapes.append(
                BlockShape(
                    ffn_width=self._view(block, self.ffn_consumer_name).in_features,
                    num_heads=groups * self._queries_per_group(attention),
                    num_kv_heads=groups,
                )
            )
        return shapes

    def shape_attributes(self, block: nn.Module) -> dict[str, dict[str, object]]:
        found: dict[str, dict[str, object]] = {}
        for module_name, attr in self.ffn_width_attrs.items():
            module = _resolve(block, module_name)
            if hasattr(module, attr):
                found.setdefault(module_name, {})[attr] = getattr(module, attr)
        return found


def _checked_indices(keep, size: int, what: str) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= size):
        raise SecateurError(f"indices to keep must be in 0..{size - 1} ({what})")
    if keep.unique().numel() != keep.numel():
        raise SecateurError(f"indices to keep must not repeat ({what})")
    return keep


def _ranges(starts: list[int], length: int) -> torch.Tensor:
    return torch.cat([torch.arange(s, s + length) for s in starts])


def _add_zero_bias(module: nn.Module, transposed: bool) -> None:
    if getattr(module, "bias", None) is not None:
        return
    weight = module.weight
    out_features = weight.shape[1 if transposed else 0]
    module.bias = nn.Parameter(torch.zeros(out_features, dtype=weight.dtype, device=weight.device))


class LlamaLikeAdapter(_LayoutAdapter):
    """model.model.layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj."""

    base_model_path = "model"
    blocks_attr = "layers"
    _attention: ClassVar[tuple[str, ...]] = tuple(f"self_attn.{p}_proj" for p in "qkvo")
    _mlp: ClassVar[tuple[str, ...]] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    linear_names = _attention + _mlp
    bias_flags: ClassVar[dict[str, str]] = {
        **dict.fromkeys(_attention, "attention_bias"),
        **dict.fromkeys(_mlp, "mlp_bias"),
    }

    ffn_producer_names = ("mlp.gate_proj", "mlp.up_proj")
    ffn_consumer_name = "mlp.down_proj"
    attention_name = "self_attn"
    head_consumer_name = "self_attn.o_proj"
    ffn_width_attrs: ClassVar[dict[str, str]] = {"mlp": "intermediate_size"}

    # GQA: group g is KV head g and query heads g*rep .. (g+1)*rep-1. The forward reshapes
    # with -1 heads and repeats KV by `num_key_value_groups`, which keeping whole groups
    # leaves unchanged, so only the weights change (q_norm/k_norm act per head_dim).
    def _queries_per_group(self, attention: nn.Module) -> int:
        return attention.num_key_value_groups

    def _group_rows(self, block: nn.Module, num_groups: int) -> dict[str, list[torch.Tensor]]:
        attention = _resolve(block, self.attention_name)
        d, rep = attention.head_dim, attention.num_key_value_groups
        q = [torch.arange(g * rep * d, (g + 1) * rep * d) for g in range(num_groups)]
        kv = [torch.arange(g * d, (g + 1) * d) for g in range(num_groups)]
        return {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv}

    def uniform_config(self, shape: BlockShape) -> dict[str, object] | None:
        head_dim = self.blocks()[0].self_attn.head_dim
        return {
            "intermediate_size": shape.ffn_width,
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": head_dim,  # explicit, or the stock model would derive hidden/heads
        }

    def geometry(self) -> Geometry:
        c = self.config
        heads = c.num_attention_heads
        # head_dim is explicit (and not hidden/heads) in qwen3 and gemma3 configs.
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return Geometry(
            hidden_size=c.hidden_size,
            num_blocks=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn_width=c.intermediate_size,
        )


@register
class LlamaAdapter(LlamaLikeAdapter):
    model_types = ("llama",)


@register
class MistralAdapter(LlamaLikeAdapter):
    model_types = ("mistral",)
    bias_flags: ClassVar[dict[str, str]] = {}


@register
class Qwen2Adapter(LlamaLikeAdapter):
    model_types = ("qwen2",)
    bias_flags: ClassVar[dict[str, str]] = {}  # q/k/v already have biases; o_proj and the MLP cannot


@register
class AttentionBiasOnlyAdapter(LlamaLikeAdapter):
    model_types = ("qwen3",)
    bias_flags: ClassVar[dict[str, str]] = dict.fromkeys(LlamaLikeAdapter._attention, "attention_bias")


@register
class Gemma3Adapter(AttentionBiasOnlyAdapter):
    """Qwen3's layout plus sandwich norms: the attention and FFN outputs are normalised
    (post_attention_layernorm, post_feedforward_layernorm) before the residual add."""

    model_types = ("gemma3_text",)
    output_norm_names: ClassVar[dict[str, str]] = {"heads": "post_attention_layernorm",
                                                   "ffn": "post_feedforward_layernorm"}


@register
class OPTAdapter(_LayoutAdapter):
    model_types = ("opt",)
    base_model_path = "model.decoder"
    blocks_attr = "layers"
    linear_names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    )
    bias_flags: ClassVar[dict[str, str]] = dict.fromkeys(linear_names, "enable_bias")
    ffn_producer_names = ("fc1",)
    ffn_consumer_name = "fc2"
    attention_name = "self_attn"
    head_consumer_name = "self_attn.out_proj"

    def max_positions(self) -> int:
        return self.config.max_position_embeddings  # learned table (+2 offset rows it never exposes)

    # Multi-head: one group is one head. The forward views with `self.num_heads`.
    def _group_rows(self, block: nn.Module, num_groups: int) -> dict[str, list[torch.Tensor]]:
        d = block.self_attn.head_dim
        rows = [torch.arange(g * d, (g + 1) * d) for g in range(num_groups)]
        return {f"self_attn.{p}_proj": rows for p in "qkv"}

    def _set_head_attrs(self, attention: nn.Module, num_groups: int) -> None:
        attention.num_heads = num_groups

    def shape_attributes(self, block: nn.Module) -> dict[str, dict[str, object]]:
        return {"self_attn": {"num_heads": block.self_attn.num_heads}}

    def uniform_config(self, shape: BlockShape) -> dict[str, object] | None:
        if shape.num_heads != self.config.num_attention_heads:
            return None  # head_dim is derived as hidden/heads
        return {"ffn_dim": shape.ffn_width}

    def geometry(self) -> Geometry:
        return _multi_head_geometry(self.config, self.config.ffn_dim)


@register
class GPT2Adapter(_LayoutAdapter):
    model_types = ("gpt2",)
    base_model_path = "transformer"
    blocks_attr = "h"
    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # c_attn is fused q|k|v
    transposed = True
    ffn_producer_names = ("mlp.c_fc",)
    ffn_consumer_name = "mlp.c_proj"
    attention_name = "attn"
    head_consumer_name = "attn.c_proj"

    def max_positions(self) -> int:
        return self.config.n_positions  # learned table `wpe`

    # c_attn = [q | k | v], each `split_size` wide; the forward splits by `split_size`
    # and views with -1 heads, so both attributes follow the weights.
    def _group_rows(self, block: nn.Module, num_groups: int) -> dict[str, list[torch.Tensor]]:
        d, split = block.attn.head_dim, block.attn.split_size
        return {"attn.c_attn": [_ranges([g * d, split + g * d, 2 * split + g * d], d) for g in range(num_groups)]}

    def _kept_rows(self, group_rows: list[torch.Tensor]) -> torch.Tensor:
        # Each group's rows are [its q | its k | its v]; the layer must stay [all q | all k | all v].
        return torch.cat([part for rows in zip(*(r.chunk(3) for r in group_rows)) for part in rows])

    def _set_head_attrs(self, attention: nn.Module, num_groups: int) -> None:
        attention.num_heads = num_groups
        attention.split_size = num_groups * attention.head_dim

    def shape_attributes(self, block: nn.Module) -> dict[str, dict[str, object]]:
        return {"attn": {"num_heads": block.attn.num_heads, "split_size": block.attn.split_size}}

    def _check_block_removal(self, keep: list[int]) -> None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False) and keep != list(range(len(keep))):
            raise SecateurError(
                "cannot remove gpt2 blocks before others when scale_attn_by_inverse_layer_idx is set: "
                "the attention scale depends on the block's position"
            )

    def uniform_config(self, shape: BlockShape) -> dict[str, object] | None:
        if shape.num_heads != self.config.n_head:
            return None  # head_dim is derived as n_embd/n_head
        return {"n_inner": shape.ffn_width}

    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(
            hidden_size=c.n_embd,
            num_blocks=c.n_layer,
            num_heads=c.n_head,
            num_kv_heads=c.n_head,
            head_dim=c.n_embd // c.n_head,
            ffn_width=c.n_inner or 4 * c.n_embd,  # GPT-2's MLP defaults to 4x when n_inner is unset
        )


@register
class GPTNeoXAdapter(_LayoutAdapter):
    model_types = ("gpt_neox",)
    base_model_path = "gpt_neox"
    blocks_attr = "layers"
    # query_key_value is fused and interleaved per head: (heads, 3, head_dim) rows.
    linear_names = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    bias_flags: ClassVar[dict[str, str]] = dict.fromkeys(linear_names[:2], "attention_bias")
    ffn_producer_names = ("mlp.dense_h_to_4h",)
    ffn_consumer_name = "mlp.dense_4h_to_h"
    attention_name = "attention"
    head_consumer_name = "attention.dense"

    # The forward views query_key_value with -1 heads of 3*head_size: head h owns rows
    # h*3*d .. (h+1)*3*d ([q_h, k_h, v_h]); no attribute stores the head count.
    def _head_dim(self, attention: nn.Module) -> int:
        return attention.head_size

    def _group_rows(self, block: nn.Module, num_groups: int) -> dict[str, list[torch.Tensor]]:
        d = block.attention.head_size
        return {"attention.query_key_value": [torch.arange(g * 3 * d, (g + 1) * 3 * d) for g in range(num_groups)]}

    def uniform_config(self, shape: BlockShape) -> dict[str, object] | None:
        if shape.num_heads != self.config.num_attention_heads:
            return None  # head_size is derived as hidden/heads
        return {"intermediate_size": shape.ffn_width}

    def geometry(self) -> Geometry:
        return _multi_head_geometry(self.config, self.config.intermediate_size)


def _multi_head_geometry(c, ffn_width: int) -> Geometry:
    """Geometry of a plain multi-head family (no GQA; head size derived as hidden / heads)."""
    return Geometry(
        hidden_size=c.hidden_size,
        num_blocks=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        ffn_width=ffn_width,
    )
