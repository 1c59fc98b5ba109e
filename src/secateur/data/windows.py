"""Calibration windows: the token sequences a pruning method sees.

The rule is the published one (SparseGPT / Wanda): `random.Random(seed)`; for each
window pick a random document with more than `seqlen` tokens (retrying shorter ones),
then a random offset inside it. Corpora where no document is that long, and corpora
of short passages whose source asks for it (wiki-passages), use one stream instead:
all documents joined with "\\n\\n", random offsets in it.

BOS handling: documents are tokenized with `add_special_tokens=False`, so a window is
a plain slice of text tokens; no BOS is inserted (most windows start mid-document
anyway, and the slice never carries a stray BOS/EOS a template tokenizer adds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from secateur.data.sources import load_documents
from secateur.errors import SecateurError

STREAM_JOIN = "\n\n"
TOKENIZE_BATCH = 64  # documents per tokenizer call when scanning in order


@dataclass
class CalibrationData:
    """`input_ids` of shape (nsamples, seqlen) and the protocol that drew them."""

    input_ids: torch.Tensor
    protocol: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    # verbose=False: long documents would otherwise warn about model_max_length,
    # which does not apply since we cut windows ourselves.
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def special_tokens_added(tokenizer) -> dict:
    """Which special tokens `add_special_tokens=True` puts around a text, by probing."""
    plain = encode(tokenizer, ["a"], add_special_tokens=False)[0]
    special = encode(tokenizer, ["a"], add_special_tokens=True)[0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    grew = len(special) > len(plain)
    return {
        "bos_prepended": bool(grew and bos is not None and special[0] == bos and plain[:1] != [bos]),
        "eos_appended": bool(grew and eos is not None and special[-1] == eos and plain[-1:] != [eos]),
    }


class _DocumentTokens:
    """Token ids of documents, tokenized on first use and cached."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts
        self.cache: dict[int, list[int]] = {}
        self.scanned = 0  # documents [0, scanned) are all cached

    def __getitem__(self, index: int) -> list[int]:
        if index not in self.cache:
            self.cache[index] = encode(self.tokenizer, [self.texts[index]], add_special_tokens=False)[0]
        return self.cache[index]

    def scan(self, stop_when) -> bool:
        """Tokenize documents in order until `stop_when(ids)` holds for one; False if none."""
        for index in range(self.scanned):
            if stop_when(self.cache[index]):
                return True
        while self.scanned < len(self.texts):
            start, stop = self.scanned, min(self.scanned + TOKENIZE_BATCH, len(self.texts))
            missing = [i for i in range(start, stop) if i not in self.cache]
            for i, ids in zip(
                missing, encode(self.tokenizer, [self.texts[i] for i in missing], add_special_tokens=False)
            ):
                self.cache[i] = ids
            self.scanned = stop
            if any(stop_when(self.cache[i]) for i in range(start, stop)):
                return True
        return False


def calibration_windows(
    tokenizer,
    source: str,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> CalibrationData:
    """`nsamples` random windows of `seqlen` tokens from the calibration split of `source`."""
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise SecateurError(f"nsamples must be an integer >= 1, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise SecateurError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    documents = load_documents(source, split="calibration", data_dir=data_dir)
    needed = nsamples * seqlen
    tokens = _DocumentTokens(tokenizer, documents.texts)

    # Enough text? Tokenize in order only until the count is reached: never the whole
    # of a huge corpus.
    total = 0

    def reached(ids: list[int]) -> bool:
        nonlocal total
        total += len(ids)
        return total >= needed

    if not tokens.scan(reached):
        _too_little(source, total, len(documents), nsamples, seqlen)

    protocol = {
        "source": documents.provenance,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "add_special_tokens": False,
        "bos": "none: windows are plain text-token slices (documents tokenized with add_special_tokens=False)",
    }
    rng = random.Random(seed)
    streamed = documents.provenance.get("sampling") == "stream"
    if not streamed and tokens.scan(lambda ids: len(ids) > seqlen):
        rows, drawn = _from_documents(tokens, len(documents), seqlen, nsamples, rng)
        first = documents.provenance.get("documents", [0])[0]
        protocol["sampling"] = "documents"
        protocol["rule"] = (
            "random.Random(seed); per window: document = randint(0, n_docs - 1) until it has more than "
            "seqlen tokens, then offset = randint(0, len - seqlen - 1)"
        )
        protocol["windows"] = [{"document": first + doc, "offset": offset} for doc, offset in drawn]
        # Few long documents make repetitive windows under this rule: make that visible.
        protocol["distinct_documents"] = len({doc for doc, _ in drawn})
    else:
        stream = encode(tokenizer, [STREAM_JOIN.join(documents.texts)], add_special_tokens=False)[0]
        if len(stream) < needed:
            _too_little(source, len(stream), len(documents), nsamples, seqlen)
        offsets = [rng.randint(0, len(stream) - seqlen) for _ in range(nsamples)]
        rows = [stream[offset : offset + seqlen] for offset in offsets]
        protocol["sampling"] = "stream"
        protocol["rule"] = (
            f"{'passages' if streamed else 'no document has more than seqlen tokens'}: all documents joined with {STREAM_JOIN!r} into one "
            "stream; random.Random(seed); per window: offset = randint(0, len - seqlen)"
        )
        protocol["stream_tokens"] = len(stream)
        protocol["windows"] = [{"document": None, "offset": offset} for offset in offsets]
    return CalibrationData(torch.tensor(rows, dtype=torch.long), protocol)


def _from_documents(tokens: _DocumentTokens, count: int, seqlen: int, nsamples: int, rng: random.Random):
    rows, drawn = [], []
    for _ in range(nsamples):
        while True:  # terminates: at least one document is long enough (checked by the caller)
            doc = rng.randint(0, count - 1)
            ids = tokens[doc]
            if len(ids) > seqlen:
                break
        offset = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[offset : offset + seqlen])
        drawn.append((doc, offset))
    return rows, drawn


def _too_little(source: str, total: int, documents: int, nsamples: int, seqlen: int):
    raise SecateurError(
        f"calibration source '{source}' has {total} tokens in {documents} documents, but "
        f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen} tokens are needed; "
        "lower nsamples or seqlen, or give more text"
    )
