"""Perplexity under the published protocol, with the protocol recorded next to the number.

The evaluation split's documents are joined into one text, tokenized once (with the
tokenizer's default special tokens, as the reference code calls `tokenizer(text)`:
a Llama tokenizer puts one BOS at the head of the stream), cut into non-overlapping
windows of `seqlen` (the remainder is dropped), and scored one window at a time.
perplexity = exp(sum of next-token NLL / number of predicted tokens), NLL in float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from secateur.data.sources import load_documents
from secateur.data.windows import encode, special_tokens_added
from secateur.errors import SecateurError
from secateur.models.streaming import StreamedModel

# How each dataset's documents become one text: C4 documents are joined with a space
# (the reference joins validation documents that way); others with a blank line.
JOIN = {"c4": " "}
DEFAULT_JOIN = "\n\n"
# The papers score C4 on its first 256 windows only.
WINDOW_CAP = {"c4": 256}


def perplexity(
    model,
    tokenizer,
    dataset: str,
    *,
    seqlen: int,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """{"perplexity": float, "protocol": {...}} of `model` on the evaluation split of `dataset`.

    The model must already sit on `device`; each window's input ids are sent there. A
    `StreamedModel` is scored block by block, each block brought to `device` in turn.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise SecateurError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise SecateurError(f"max_windows must be None or an integer >= 1, got {max_windows!r}")
    documents = load_documents(dataset, split="evaluation", data_dir=data_dir)
    join = JOIN.get(dataset, DEFAULT_JOIN)
    ids = encode(tokenizer, [join.join(documents.texts)], add_special_tokens=True)[0]
    available = len(ids) // seqlen
    if available == 0:
        raise SecateurError(
            f"dataset '{dataset}' has {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
            "lower seqlen or give more text"
        )
    used = min(available, WINDOW_CAP.get(dataset, available), max_windows or available)
    windows = torch.tensor(ids[: used * seqlen], dtype=torch.long).view(used, seqlen)

    if isinstance(model, StreamedModel):  # one block in memory at a time (secateur.eval.streamed)
        from secateur.eval.streamed import score_streamed

        total_nll, scored = score_streamed(model, windows, device, progress)
    else:
        total_nll, scored = _score(model, windows, device, progress)
    if not math.isfinite(total_nll):
        raise SecateurError(
            f"perplexity on '{dataset}' is not finite (summed NLL = {total_nll}): the model produced "
            "NaN/Inf logits; check the model's weights and dtype"
        )
    source = documents.provenance
    protocol = {
        "dataset": dataset,
        "path": source.get("path"),
        "sha256": source.get("sha256"),
        "normalisation": source.get("normalisation"),
        "documents": source.get("documents"),
        "join": join,
        "seqlen": seqlen,
        "windows_used": used,
        "windows_available": available,
        "window_cap": WINDOW_CAP.get(dataset),
        "max_windows": max_windows,
        "tokens_total": len(ids),
        "tokens_scored": scored,
        "add_special_tokens": True,
        **special_tokens_added(tokenizer),
        "nll_mean": total_nll / scored,
    }
    return {"perplexity": math.exp(total_nll / scored), "protocol": protocol}


def _score(model, windows: torch.Tensor, device, progress: bool) -> tuple[float, int]:
    """Summed next-token NLL (float32 logits, float64 sum) over windows, one at a time."""
    was_training = model.training
    model.eval()
    rows = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="perplexity", unit="window")
    total, scored = 0.0, 0
    try:
        with torch.inference_mode():
            for row in rows:
                input_ids = windows[row : row + 1].to(device)
                logits = model(input_ids, use_cache=False).logits[0, :-1].float()
                targets = input_ids[0, 1:]
                total += F.cross_entropy(logits, targets, reduction="sum").item()
                scored += targets.numel()
    finally:
        model.train(was_training)
    return total, scored
