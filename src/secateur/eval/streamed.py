"""Perplexity of a model streamed block by block (`secateur.models.streaming.StreamedModel`).

The windows, protocol and NLL sum are those of `secateur.eval.perplexity`, which hands a
streamed model here. What differs is the order of work, so that one block's weights are in
memory at a time: the embeddings run on every window first (the front of the model
materialized, the blocks' call arguments recorded as the pruning engine records them), then
each block in turn is materialized, run over every window's hidden states and released, and
last the model's own forward turns each window's final hidden states into logits (the blocks
stood in for by a module that hands back those states, the LM head materialized, the input
embeddings not: the forward is fed `inputs_embeds`). Every block therefore computes exactly
what it computes inside the full forward; logits go through the family's own final norm,
head and any soft-capping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateur.engine.capture import capture_one_by_one, run_block


class _Replay(nn.Module):
    """Stands in for a block while logits are computed: returns the stored output of the real
    last block (or, for every other block, its input unchanged). Attribute reads fall through to
    the real block, which some model loops read (e.g. `attention_type`)."""

    def __init__(self, block: nn.Module, holder: dict | None):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not registered: it stays on the meta device
        object.__setattr__(self, "_holder", holder)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self._holder is None else self._holder["hidden"].to(hidden_states.device)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def score_streamed(stream, windows: torch.Tensor, device, progress: bool) -> tuple[float, int]:
    """Summed next-token NLL (float32 logits, float64 sum) of `stream` over `windows`, block by block."""
    from tqdm.auto import tqdm

    adapter, model = stream.adapter, stream.model
    blocks = adapter.blocks()
    with stream.activation_store() as hidden:
        with stream.materialized(stream.front()):
            calls = capture_one_by_one(adapter, windows, device, hidden)  # so `hidden` may live on disk
        for index, block in enumerate(tqdm(blocks, desc="perplexity blocks", unit="block", disable=not progress)):
            with stream.materialized(block):
                block.to(device)
                with torch.inference_mode():
                    for position in range(len(hidden)):
                        hidden[position] = run_block(block, hidden[position].to(device), calls[index]).to("cpu")
        return _score_final_states(stream, model, adapter, blocks, hidden, windows, device)


def _score_final_states(stream, model, adapter, blocks, hidden, windows, device) -> tuple[float, int]:
    holder: dict = {}
    adapter.set_blocks(nn.ModuleList(_Replay(block, holder if i == len(blocks) - 1 else None)
                                     for i, block in enumerate(blocks)))
    embedding = model.get_input_embeddings()
    total, scored = 0.0, 0
    try:
        with stream.materialized(stream.back()):
            _move_real_tensors(model, device)
            with torch.inference_mode():
                for row in range(windows.shape[0]):
                    holder["hidden"] = hidden[row]
                    placeholder = torch.zeros(1, windows.shape[1], embedding.embedding_dim, dtype=stream.dtype,
                                              device=device)
                    logits = model(inputs_embeds=placeholder, use_cache=False).logits[0, :-1].float()
                    targets = windows[row, 1:].to(device)
                    total += F.cross_entropy(logits, targets, reduction="sum").item()
                    scored += targets.numel()
    finally:
        adapter.set_blocks(blocks)
        _move_real_tensors(model, "cpu")
    return total, scored


def _move_real_tensors(model: nn.Module, device) -> None:
    # `Module.to` fails on the meta tensors of the modules not materialized (the input embeddings).
    model._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(device))
