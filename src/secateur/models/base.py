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

    # --- biases -----------------------------------------------------------------
    def ensure_bias(self, block: nn.Module, name: str) -> bool:
        """Make sure linear `name` of `block` has a bias that a saved checkpoint keeps
        (turning on the config flag that creates it, with zero biases for the other layers
        the flag governs). Returns False when the architecture cannot hold one there."""
        raise NotImplementedError


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
