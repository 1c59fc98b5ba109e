"""Capture what the first decoder block receives, and how every block is called.

Each decoder block is called by the model's own forward with the hidden states plus
whatever the current transformers computes for it (position embeddings, a causal or
sliding-window mask, position ids, ...). Rather than re-implementing that per family
and per transformers release, we let the model compute it: every block is swapped for
a `_CallRecorder` that writes down its arguments and hands the hidden states straight
through. One forward of the base model per calibration window then costs only the
embeddings and the final norm, no block is run, and no exception is thrown to stop
the model early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateur.models.base import Adapter

# Arguments that only make sense for generation with a KV cache; blocks are run without one.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "use_cache")


@dataclass
class BlockCall:
    """The extra arguments one block receives besides the hidden states (same for every window,
    since all windows have the same length and no padding)."""

    args: tuple
    kwargs: dict


class _CallRecorder(nn.Module):
    """Stands in for one block: records its call and returns the hidden states unchanged.

    Attribute reads fall through to the real block, because some model loops read block
    attributes (e.g. `attention_type` to choose a sliding-window mask).
    """

    def __init__(self, block: nn.Module, sink: list):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: must not move with .to()
        object.__setattr__(self, "_sink", sink)

    def forward(self, hidden_states, *args, **kwargs):
        self._sink.append((hidden_states, args, kwargs))
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@torch.inference_mode()
def capture_block_inputs(
    adapter: Adapter, input_ids: torch.Tensor, device: torch.device | str, storage: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Run the model's embeddings on every window.

    Returns the inputs of the first block (one (1, seqlen, hidden) tensor per window, on
    `storage`) and, per block, the other arguments it is called with (on `device`).
    """
    blocks = adapter.blocks()
    records: list[list] = [[] for _ in blocks]
    adapter.set_blocks(nn.ModuleList(_CallRecorder(block, records[i]) for i, block in enumerate(blocks)))
    base = adapter.base_model()
    try:
        base.to(device)  # the blocks are hidden behind recorders: only embeddings and norms move
        inputs = []
        for window in input_ids:
            for sink in records:
                sink.clear()
            base(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            inputs.append(records[0][0][0].to(storage))
        calls = []
        for sink in records:
            _, args, kwargs = sink[0]
            kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
            calls.append(BlockCall(args, kwargs))
    finally:
        adapter.set_blocks(blocks)
        if off_cpu(device):
            base.to("cpu")
    # Positional arguments after the hidden states can hold a cache object (GPT-2 passes
    # past_key_values positionally); with use_cache=False it is None, which is what we want.
    return inputs, calls


def capture_one_by_one(adapter: Adapter, input_ids: torch.Tensor, device: torch.device | str,
                       hidden) -> list[BlockCall] | None:
    """`capture_block_inputs` one window at a time, appending each window's first-block input to
    `hidden` (a list, or a list on disk: `secateur.models.streaming.DiskActivations`) as soon as it
    is computed; returns the blocks' calls (None without windows). Same values as capturing all
    windows at once."""
    calls = None
    for window in input_ids:
        inputs, calls = capture_block_inputs(adapter, window.unsqueeze(0), device)
        hidden.append(inputs[0])
    return calls


def off_cpu(device: torch.device | str) -> bool:
    """Whether `device` is an accelerator, so that what was moved there is parked on the CPU after use."""
    return torch.device(device).type != "cpu"


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """Run one block on one window and return its output hidden states."""
    output = block(hidden, *call.args, **call.kwargs)
    return output[0] if isinstance(output, tuple) else output
