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
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from secateur.models.base import Adapter, Geometry, LinearView, register


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

    def base_model(self) -> nn.Module:
        return _resolve(self.model, self.base_model_path)

    def blocks(self) -> nn.ModuleList:
        return getattr(self.base_model(), self.blocks_attr)

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        setattr(self.base_model(), self.blocks_attr, blocks)

    def linears(self, block: nn.Module) -> dict[str, LinearView]:
        return {name: LinearView(_resolve(block, name), self.transposed) for name in self.linear_names}

    def ensure_bias(self, block: nn.Module, name: str) -> bool:
        if getattr(_resolve(block, name), "bias", None) is not None:
            return True
        flag = self.bias_flags.get(name)
        if flag is None:
            return False
        # The flag governs several linears in every block; a checkpoint saved with the flag on
        # must carry all of those biases, or from_pretrained would initialise them randomly.
        setattr(self.config, flag, True)
        governed = [n for n, f in self.bias_flags.items() if f == flag]
        for each_block in self.blocks():
            for linear_name in governed:
                _add_zero_bias(_resolve(each_block, linear_name), self.transposed)
        return True


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
    model_types = ("qwen3", "gemma3_text")
    bias_flags: ClassVar[dict[str, str]] = dict.fromkeys(LlamaLikeAdapter._attention, "attention_bias")


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

    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(
            hidden_size=c.hidden_size,
            num_blocks=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            ffn_width=c.ffn_dim,
        )


@register
class GPT2Adapter(_LayoutAdapter):
    model_types = ("gpt2",)
    base_model_path = "transformer"
    blocks_attr = "h"
    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # c_attn is fused q|k|v
    transposed = True

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

    def geometry(self) -> Geometry:
        c = self.config
        return Geometry(
            hidden_size=c.hidden_size,
            num_blocks=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            ffn_width=c.intermediate_size,
        )
