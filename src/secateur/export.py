"""Save a pruned model as a standard Hugging Face checkpoint, atomically.

Everything is written into a temporary directory beside the destination and renamed
into place only when complete, so a failed or interrupted run leaves nothing behind
and an existing directory is replaced only with `overwrite=True` (and only at the end).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from secateur.errors import SecateurError


def check_destination(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory up front, before any work is done."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SecateurError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise SecateurError(f"output path {str(out)!r} exists and is not a directory")
    if out.parent.exists() and not out.parent.is_dir():
        raise SecateurError(f"the parent of {str(out)!r} is not a directory")
    return out


def save_checkpoint(model, tokenizer, out: str | Path, *, recipe_yaml: str, results: dict, overwrite: bool) -> Path:
    out = check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: runs/name works on a fresh checkout
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        from secateur.structured import prepare_checkpoint, write_extra_files

        # Structurally pruned blocks: a standard config when every block has the same shape,
        # otherwise recorded shapes plus a small modeling file (trust_remote_code=True).
        prepare_checkpoint(model)
        model.save_pretrained(staging, safe_serialization=True)
        write_extra_files(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(recipe_yaml)
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if out.exists():
            # Move the old directory aside first so the swap never leaves the user with neither.
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            retired.rmdir()
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    if not path.parent.exists():
        raise SecateurError(f"cannot write {str(path)!r}: its directory does not exist")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
