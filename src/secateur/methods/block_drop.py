"""Whole-block removal (ShortGPT): the tensor math.

Block influence BI_l = 1 − mean_t cos(h_in_t, h_out_t), the mean over calibration tokens t of
the cosine between a block's input and output hidden states (docs/algorithms.md, "Whole-block
removal"). A block that barely turns the hidden state (BI near 0) is the cheapest to drop; the
blocks with the lowest BI go. Cosine sums are kept as float64 sums so that batches (and shards)
add up exactly: BI = block_influence(Σ cosine_sum(batch), Σ tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from secateur.errors import SecateurError
from secateur.methods.base import StructuredMethod, register

COSINE_EPS = 1e-12  # a zero hidden state has cosine 0 with anything


def cosine_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Σ over tokens of cos(h_in_t, h_out_t), in float64; inputs (..., hidden) of equal shape."""
    if h_in.shape != h_out.shape or h_in.dim() == 0:
        raise SecateurError(
            f"block_drop: h_in and h_out must have the same (..., hidden) shape, got "
            f"{tuple(h_in.shape)} and {tuple(h_out.shape)}"
        )
    hidden = h_in.shape[-1]
    a = h_in.detach().to(torch.float64).reshape(-1, hidden)
    b = h_out.detach().to(torch.float64).reshape(-1, hidden)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=COSINE_EPS)
    return float(cos.sum())


def block_influence(cos_sum: float, count: int) -> float:
    """BI = 1 − cos_sum / count (count = number of tokens summed)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SecateurError(f"block_drop: token count must be a positive integer, got {count!r}")
    return 1.0 - float(cos_sum) / count


def blocks_to_drop(influences: list[float], n: int) -> list[int]:
    """Indices (ascending) of the n blocks with the lowest BI; ties go to the lower index."""
    total = len(influences)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < total:
        raise SecateurError(
            f"block_drop: can drop between 0 and {total - 1} of the {total} blocks (at least one must "
            f"stay), got {n!r}"
        )
    if any(math.isnan(float(v)) for v in influences):
        raise SecateurError("block_drop: a block influence is NaN; check the calibration data")
    order = sorted(range(total), key=lambda i: (float(influences[i]), i))
    return sorted(order[:n])


# --- the method: plumbing around the math above ---------------------------------------


@register
@dataclass
class BlockDrop(StructuredMethod):
    """ShortGPT: drop the blocks that change the hidden state least (lowest block influence,
    1 − mean cosine similarity of a block's input and output on calibration tokens, measured
    on the dense model in one pass). `--sparsity` s removes round(s · blocks) blocks."""

    name: ClassVar[str] = "block-drop"


    def prune_model(self, session, sparsity: float) -> dict:
        adapter = session.adapter
        blocks = adapter.blocks()
        count = round(sparsity * len(blocks))
        if count >= len(blocks):
            raise SecateurError(f"block-drop would remove all {len(blocks)} blocks at sparsity {sparsity}; lower it")
        session.start_pass()
        influences = []
        for index in tqdm(range(len(blocks)), desc="block influence", disable=not session.progress):
            step = f"block-influence/{index}"  # one resumable step per block: its influence
            saved = session.replay(step)
            if saved is not None:
                influences.append(saved.meta["influence"])
                continue
            total = {"cos": 0.0, "tokens": 0}

            def observe(h_in, h_out, total=total):
                total["cos"] += cosine_sum(h_in, h_out)
                total["tokens"] += h_in.numel() // h_in.shape[-1]

            session.advance(index, observe)
            influences.append(block_influence(*session.reduce_loss(total["cos"], total["tokens"])))
            session.complete(step, meta={"influence": influences[-1]})
        dropped = blocks_to_drop(influences, count) if count else []
        if dropped:
            adapter.remove_blocks(dropped)
        return {"block_influence": [round(x, 6) for x in influences], "removed_blocks": dropped}
