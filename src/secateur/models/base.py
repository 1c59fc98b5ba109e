"""What an architecture adapter tells the engine.

An adapter knows one decoder family's module layout: where the blocks are, which
linear layers inside a block can be pruned, the attention/MLP geometry, and how to
give a layer a bias that survives save and reload. It knows no pruning method.
Families are chosen by `config.model_type` (never by the model's name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.roles import ROLE_NORMED, ROLE_OUT  # noqa: F401  (re-exported for adapters)


@dataclass(frozen=True)
class Geometry:
    hidden_size: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_width: int


class LinearView:
    """One prunable linear layer seen as `y = W x + b` with W of shape (out, in).

    nn.Linear stores W as (out, in) already; GPT-2's Conv1D stores (in, out) and sets
    `transposed=True`. Reading and writing go through here so methods never see the
    difference.
    """

    def __init__(self, module: nn.Module, transposed: bool = False):
        self.module = module
        self.transposed = transposed

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    def get_weight(self) -> torch.Tensor:
        w = self.module.weight.detach()
        return w.T if self.transposed else w

    def set_weight(self, weight: torch.Tensor) -> None:
        target = self.module.weight
        value = weight.T if self.transposed else weight
        with torch.no_grad():
            target.copy_(value.to(dtype=target.dtype, device=target.device))

    def get_bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        return None if bias is None else bias.detach()

    def set_bias(self, bias: torch.Tensor) -> None:
        """Write a bias; the layer must have one (see `Adapter.ensure_bias`)."""
        with torch.no_grad():
            self.module.bias.copy_(bias.to(dtype=self.module.bias.dtype, device=self.module.bias.device))

    # --- structured slicing ---------------------------------------------------------
    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keep only output features `idx` (in that order): W rows and bias entries.

        The module stays the same object (hooks and references survive); its weight and
        bias become new, smaller Parameters and its size attributes follow.
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.module.weight.device)
        module = self.module
        with torch.no_grad():
            weight = module.weight.detach()
            kept = weight[:, idx] if self.transposed else weight[idx]
            module.weight = nn.Parameter(kept.clone(), requires_grad=module.weight.requires_grad)
            if getattr(module, "bias", None) is not None:
                module.bias = nn.Parameter(
                    module.bias.detach()[idx].clone(), requires_grad=module.bias.requires_grad
                )
        self._sync_sizes()

    def keep_columns(self, idx: torch.Tensor) -> None:
        """Keep only input features `idx` (in that order): W columns; the bias is untouched."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.module.weight.device)
        module = self.module
        with torch.no_grad():
            weight = module.weight.detach()
            kept = weight[idx] if self.transposed else weight[:, idx]
            module.weight = nn.Parameter(kept.clone(), requires_grad=module.weight.requires_grad)
        self._sync_sizes()

    def _sync_sizes(self) -> None:
        module = self.module
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = self.out_features, self.in_features
        if hasattr(module, "nf"):  # transformers' Conv1D
            module.nf = self.out_features
        if hasattr(module, "nx"):
            module.nx = self.in_features


@dataclass
class FfnUnits:
    """The FFN neurons of one block: neuron j is row j of every producer and column j of the consumer."""

    producers: dict[str, LinearView]  # gate_proj + up_proj | fc1 | c_fc | dense_h_to_4h
    consumer_name: str
    consumer: LinearView  # down_proj | fc2 | c_proj | dense_4h_to_h
    width: int


@dataclass
class HeadUnits:
    """The attention of one block in KV groups: one KV head and the query heads that read it."""

    num_groups: int
    producer_rows: dict[str, list[torch.Tensor]]  # layer name -> per group, LongTensor of its output rows
    producers: dict[str, LinearView]
    consumer_name: str  # o_proj / out_proj / dense / c_proj
    consumer: LinearView
    consumer_columns: list[torch.Tensor]  # per group, LongTensor of the consumer's input columns
    params_per_group: int  # weights (+ biases) removed with one group


@dataclass(frozen=True)
class BlockShape:
    ffn_width: int
    num_heads: int
    num_kv_heads: int


class Adapter:
    """Base class; one subclass per decoder family, registered for its `model_type`s."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- layout -----------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The module whose forward(input_ids=..., use_cache=False) runs embeddings, all blocks
        and the final norm (not the LM head). The engine calls it to capture block inputs."""
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        raise NotImplementedError

    def set_blocks(self, blocks: nn.ModuleList) -> None:
        """Replace the decoder block list (the engine truncates it while capturing inputs)."""
        raise NotImplementedError

    def linears(self, block: nn.Module) -> dict[str, LinearView]:
        """Every prunable linear of one block, keyed by its name relative to the block
        (e.g. "self_attn.q_proj"), in execution order."""
        raise NotImplementedError

    def geometry(self) -> Geometry:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        """The longest sequence the model can take, for families with a learned table of absolute
        positions (a longer input is an index error); None where positions are computed (rotary)."""
        return None

    def layer_role(self, name: str) -> str:
        """The role (ROLE_NORMED or ROLE_OUT) of linear `name` of a block; see those constants.
        The engine hands it to the methods that ask for it (`secateur.methods.base.LayerInfo`)."""
        raise NotImplementedError

    # --- biases -----------------------------------------------------------------
    # Only the layers that receive a compensation get a bias (a zero bias elsewhere would count
    # as a kept parameter and is dead weight). A checkpoint keeps them either way: a config flag
    # that creates biases (Llama's attention_bias, ...) is on exactly when every layer it governs
    # has one (`bias_flag_values`), and `secateur.structured.finalize_config` records any other
    # biased layer per module, as it records sliced shapes.
    def can_hold_bias(self, block: nn.Module, name: str) -> bool:
        """Whether linear `name` of `block` has a bias or `ensure_bias` could give it one (no change)."""
        return False

    def ensure_bias(self, block: nn.Module, name: str) -> bool:
        """Give linear `name` of `block` a (zero) bias if it has none, and that layer only.
        Returns False when the architecture cannot hold a bias there."""
        raise NotImplementedError

    def bias_flag_values(self) -> dict[str, bool]:
        """The value each of the family's bias config flags must have for the stock model to
        build the biases the blocks have now where it can: True exactly when every layer the
        flag governs, in every block, has a bias."""
        return {}

    # --- structured pruning (models physically shrink) ---------------------------------
    def _structured_unsupported(self, what: str) -> SecateurError:
        family = getattr(self.config, "model_type", type(self).__name__)
        return SecateurError(f"structured pruning of {family} is not supported: {what}")

    def ffn_units(self, block: nn.Module) -> FfnUnits:
        raise self._structured_unsupported("no FFN neuron layout")

    def head_units(self, block: nn.Module) -> HeadUnits:
        raise self._structured_unsupported("no attention head layout")

    def output_norm(self, block: nn.Module, unit: str) -> nn.Module | None:
        """The normalisation the output of `unit` ("ffn": the down projection; "heads": the
        attention output projection) goes through before it is added to the residual stream
        (Gemma's sandwich norms), or None where the output is added as it is (most families)."""
        return None

    def keep_ffn(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep FFN neurons `keep` (in that order) of `block`, physically."""
        raise self._structured_unsupported("cannot slice the FFN")

    def keep_head_groups(self, block: nn.Module, keep: list[int]) -> None:
        """Keep KV groups `keep` (in that order) of `block`, physically."""
        raise self._structured_unsupported("cannot slice attention heads")

    def remove_blocks(self, indices: list[int]) -> None:
        """Delete decoder blocks; the rest are renumbered and the config follows."""
        raise self._structured_unsupported("cannot remove blocks")

    def block_shapes(self) -> list[BlockShape]:
        raise self._structured_unsupported("no block shapes")

    def count_block_params(self) -> int:
        """Parameters (weights, biases, norms) of all decoder blocks."""
        seen: set[int] = set()
        total = 0
        for param in self.blocks().parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
        return total

    # --- checkpoints of structured models (used by secateur.structured) -------------
    def uniform_config(self, shape: BlockShape) -> dict[str, object] | None:
        """Config fields that make the stock model build every block at `shape`, or None
        when the family's config cannot express it (then shapes are recorded per module)."""
        return None

    def shape_attributes(self, block: nn.Module) -> dict[str, dict[str, object]]:
        """Module attributes (relative to the block) that store a width or head count and
        that the forward reads, with their current values."""
        return {}


ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def get_adapter(model: nn.Module) -> Adapter:
    from secateur.models import adapters as _all  # noqa: F401  (registers every family)

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise SecateurError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)
