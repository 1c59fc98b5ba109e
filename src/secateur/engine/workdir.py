"""Where a `prune --out DIR` run keeps its progress, so that a killed run can be resumed.

The work directory (`.DIR.secateur-resume` beside DIR: `secateur.outputs.resume_dir`) holds
- settings.json: what the run computes from (model files, recipe, calibration windows, dtype,
  device, versions). A resume with any of them different is refused, naming it: the result
  would silently mix two runs;
- progress.json: the completed steps in order (see `BlockSession.complete`), each with its JSON
  values, the file of its tensors, the file of the pass's inputs after it and the warnings so far;
- step-NNNN.safetensors: one step's tensors (a pruned block's weights, a structured method's
  decisions), exactly as they were in memory: a resumed run ends bit for bit where an
  uninterrupted one does;
- inputs-NNNN.safetensors: the next block's inputs after the latest step that changed them
  (only the latest is kept: a resume starts from the last completed step).

Each file is written under a temporary name, flushed to disk (fsync) and renamed before
progress.json names it, and progress.json is replaced the same way, so after SIGKILL at any
instant the directory describes exactly the steps that completed; a file no step names (a write
cut short) is removed when the run resumes. A live run holds a lock on the directory, so a second
run for the same --out is refused while the first works. The directory goes once the checkpoint
is in place; a run that fails on bad input removes it too (resuming would fail the same way).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from secateur.errors import SecateurError

WORKDIR_FORMAT = "secateur-resume/1"
SETTINGS = "settings.json"
PROGRESS = "progress.json"
# Test hook: with SECATEUR_TEST_KILL_AFTER_STEP=NAME the process SIGKILLs itself right after
# step NAME (e.g. "prune/1", "putri-ffn/0") is on disk, so a test can resume from there.
KILL_AFTER_STEP = "SECATEUR_TEST_KILL_AFTER_STEP"


@dataclass
class StepRecord:
    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict
    inputs: str | None  # file of the pass's inputs after this step; None: as the pass captured them
    warnings: list[str]


def check_work_dir(path: Path, *, resume: bool) -> None:
    """Before any work: an interrupted run's progress is never reused or deleted unasked."""
    if _holds_progress(path) and not resume:
        raise SecateurError(f"{path} holds the progress of an interrupted run for this --out; pass --resume to "
                            "continue it, or delete that directory to start over")


def _holds_progress(path: Path) -> bool:
    return (path / SETTINGS).is_file()


class WorkDir:
    """The work directory of one live run; `open` it, hand it to the session, `discard` it at the end."""

    def __init__(self, path: Path, lock_fd: int, records: list[dict], created_parents: list[Path]):
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._created_parents = created_parents  # deepest first: removed again with the directory if empty
        self._records = records
        self._cursor = 0  # records replayed so far
        self.resumed_steps = len(records)

    @classmethod
    def open(cls, path: str | Path, settings: dict, *, resume: bool) -> WorkDir:
        """Create the work directory, or with `resume` take over the one an interrupted run left,
        refusing it when `settings` differ from that run's (the first difference is named)."""
        path = Path(path)
        check_work_dir(path, resume=resume)
        created_parents = [parent for parent in path.parents if not parent.exists()]
        path.mkdir(parents=True, exist_ok=True)  # --out's parents, as the checkpoint's staging makes them
        lock_fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SecateurError(f"another secateur run is working on {path} (the same --out); wait for it to "
                                "finish or choose another --out") from None
        try:
            records = cls._take_over(path, settings) if _holds_progress(path) else cls._start(path, settings)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, lock_fd, records, created_parents)

    @staticmethod
    def _start(path: Path, settings: dict) -> list[dict]:
        _remove_unlisted(path, keep=set())  # a run killed before its settings were written left nothing of use
        _write_durably(path / SETTINGS, json.dumps({"format": WORKDIR_FORMAT} | settings, indent=1).encode())
        return []

    @staticmethod
    def _take_over(path: Path, settings: dict) -> list[dict]:
        saved = _read_json(path / SETTINGS)
        if saved is None or saved.get("format") != WORKDIR_FORMAT:
            raise SecateurError(f"{path} is not a secateur {WORKDIR_FORMAT} work directory (written by another "
                                "version?); delete it to start over")
        difference = first_difference(saved, {"format": WORKDIR_FORMAT} | settings)
        if difference is not None:
            key, then, now = difference
            raise SecateurError(f"--resume: the interrupted run used {key} {_shown(then)}, this one {_shown(now)}; "
                                f"resume with the same settings, or delete {path} to start over")
        progress = _read_json(path / PROGRESS) or {"steps": []}
        records = progress["steps"]
        keep = {SETTINGS, PROGRESS} | {r["tensors"] for r in records if r["tensors"]}
        if records and records[-1]["inputs"]:
            keep.add(records[-1]["inputs"])
        _remove_unlisted(path, keep)
        return records

    # --- steps ---------------------------------------------------------------------------
    def replay(self, step: str) -> StepRecord | None:
        """The next recorded step, which must be `step`; None once every recorded step was replayed."""
        if self._cursor == len(self._records):
            return None
        record = self._records[self._cursor]
        if record["name"] != step:
            raise SecateurError(f"--resume: this run reached step {step!r} where the interrupted run recorded "
                                f"{record['name']!r}; {self.path} is not this run's progress: delete it to start over")
        self._cursor += 1
        tensors = load_file(self.path / record["tensors"]) if record["tensors"] else {}
        return StepRecord(record["name"], tensors, record["meta"], record["inputs"], list(record["warnings"]))

    def complete(self, step: str, tensors: dict[str, torch.Tensor], meta: dict, *, inputs: str | None,
                 warnings: list[str]) -> None:
        """Record `step` durably (its tensors first, then progress.json)."""
        if self._cursor != len(self._records):
            raise RuntimeError(f"step {step!r} completed before the recorded step "
                               f"{self._records[self._cursor]['name']!r} was replayed")
        if any(record["name"] == step for record in self._records):
            raise RuntimeError(f"step name {step!r} used twice in one run")
        tensors_file = None
        if tensors:
            tensors_file = f"step-{len(self._records):04d}.safetensors"
            _save_tensors(self.path / tensors_file, tensors)
        self._records.append({"name": step, "tensors": tensors_file, "meta": meta, "inputs": inputs,
                              "warnings": list(warnings)})
        self._cursor += 1
        _write_durably(self.path / PROGRESS, json.dumps({"format": WORKDIR_FORMAT, "steps": self._records},
                                                        indent=1).encode())
        for stale in self.path.glob("inputs-*.safetensors"):  # only the latest inputs are ever read back
            if stale.name != inputs:
                stale.unlink()
        if os.environ.get(KILL_AFTER_STEP) == step:
            _kill_self()

    def save_inputs(self, hidden: list[torch.Tensor]) -> str:
        """Write the pass's current inputs; returns the file name to record with the next step."""
        name = f"inputs-{len(self._records):04d}.safetensors"
        _save_tensors(self.path / name, {str(position): x for position, x in enumerate(hidden)})
        return name

    def load_inputs(self, name: str) -> list[torch.Tensor]:
        tensors = load_file(self.path / name)
        return [tensors[str(position)] for position in range(len(tensors))]

    # --- the end ---------------------------------------------------------------------------
    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """The run is over (its checkpoint is in place, or it failed on bad input): remove the directory."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self._created_parents:
            try:
                parent.rmdir()
            except OSError:  # not empty: the checkpoint, or something else, is there now
                break


def _kill_self() -> None:
    """The test hook's SIGKILL (a test running in-process replaces it with an exception)."""
    os.kill(os.getpid(), signal.SIGKILL)


def first_difference(saved: dict, current: dict) -> tuple[str, object, object] | None:
    """(setting, saved value, current value) of the first setting that differs, nested keys
    joined by spaces ("recipe sparsity"); None when they all agree."""
    then, now = _flatten(saved), _flatten(current)
    for key in list(now) + [k for k in then if k not in now]:
        if then.get(key, _MISSING) != now.get(key, _MISSING):
            return key, then.get(key, _MISSING), now.get(key, _MISSING)
    return None


_MISSING = "(none)"


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + " ")
        else:
            flat[name] = json.loads(json.dumps(value))  # as it reads back from settings.json (tuples -> lists)
    return flat


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _remove_unlisted(path: Path, keep: set[str]) -> None:
    """Remove what secateur wrote into the work directory that no record names (writes cut short)."""
    for child in path.iterdir():
        if child.name in keep or not child.is_file():
            continue
        if child.name.startswith(("step-", "inputs-", ".")) or child.name in (SETTINGS, PROGRESS):
            child.unlink()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # Own contiguous CPU copies: safetensors refuses views that share memory.
    save_file({key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}, tmp)
    _replace_durably(tmp, path)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    _replace_durably(tmp, path)


def _replace_durably(tmp: Path, path: Path) -> None:
    """fsync the new file, rename it over `path`, fsync the directory: after a crash `path` is
    the old or the new file, complete."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
