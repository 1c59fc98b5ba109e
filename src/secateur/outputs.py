"""Where secateur writes, and the rules that keep a user's data safe.

Rules, decided here and checked before any model is loaded:
- an output is never an input: an output directory that is, contains or lies inside the
  model, the calibration or evaluation data, a recipe, a sweep or any other input of the
  command is refused, and so is one that is or contains the current directory;
- `--overwrite` replaces only a directory that secateur wrote (it holds a manifest,
  `.secateur-manifest.json`, listing every file secateur put there) and that holds nothing
  else; an empty directory is free to use; anything else is refused;
- a JSON output (`--json`) replaces only a JSON file that secateur wrote (a `"format"`
  field that starts with `secateur-`);
- every output location is probed for writability up front (a read-only file system is
  found in a second, not after an hour of pruning).

Directories are written into a hidden staging directory beside the destination
(`.NAME.secateur-staging-XXXX`, same file system, so renames are atomic) and swapped into
place at the end. With Linux's `renameat2(RENAME_EXCHANGE)` the swap is one atomic step;
elsewhere it is two renames (old aside as `.NAME.secateur-old-XXXX`, new in). After a crash
at any instant `NAME` is therefore the old or the new complete directory, except in the
two-rename fallback's window, where only the old one exists under its hidden name: the next
run for the same destination puts it back. The next run also removes every leftover staging
or old directory of that destination whose owner is gone (each live run holds a lock on its
staging directory), so a killed run costs no disk space for long.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

from secateur.errors import SecateurError

MANIFEST = ".secateur-manifest.json"
MANIFEST_FORMAT = "secateur-output/1"
_STAGING, _OLD = "secateur-staging-", "secateur-old-"


# --------------------------------------------------------------------------- checks


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: str | Path, inputs: dict[str, str | Path | None], flag: str) -> Path:
    """Refuse an output that is, contains or lies inside an input (or the current directory).

    `inputs` maps a description ("the model", "the calibration file") to a path; None and
    names that are not paths on this machine (hub ids, dataset names) are skipped."""
    target = _resolved(out)
    for what, location in inputs.items():
        if location is None or not Path(location).expanduser().exists():
            continue
        source = _resolved(location)
        if target == source:
            relation = "is"
        elif _within(source, target):
            relation = "contains"
        elif _within(target, source):
            relation = "lies inside"
        else:
            continue
        raise SecateurError(f"{flag} {str(out)!r} {relation} {what} ({source}); an output may not overlap an "
                            "input of the command: choose a path outside every input")
    if _within(Path.cwd().resolve(), target):
        raise SecateurError(f"{flag} {str(out)!r} is or contains the current directory; give a new directory "
                            "such as runs/NAME")
    return target


def _probe_writable(path: Path, flag: str, shown: str) -> None:
    """Create and remove a directory in the deepest existing ancestor of `path`."""
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SecateurError(f"{flag} {shown!r}: {ancestor} is a file, so nothing can be created below it")
    probe = ancestor / f".secateur-probe-{secrets.token_hex(6)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise SecateurError(f"{flag} {shown!r} is not writable: cannot create anything in {ancestor} "
                            f"({error.strerror or error})") from None


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a directory secateur wrote, or None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def _files_below(directory: Path) -> set[str]:
    found = set()
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            found.add((Path(root) / name).relative_to(directory).as_posix())
    return found


def check_output_dir(out: str | Path, *, overwrite: bool, inputs: dict | None = None, flag: str = "--out") -> Path:
    """Everything about an output directory that can be known before the work starts."""
    shown = str(out)
    target = check_not_input(out, inputs or {}, flag)
    recover(target)  # an earlier killed run's leftovers first: they decide what is at `out`
    if target.exists() or Path(out).is_symlink():
        if not target.is_dir():
            raise SecateurError(f"{flag} {shown!r} exists and is not a directory; give a directory path")
        if any(target.iterdir()):
            if not overwrite:
                raise SecateurError(f"{flag} {shown!r} already exists; pass --overwrite to replace it (secateur "
                                    "replaces only directories it wrote)")
            _check_replaceable(target, flag, shown)
        _probe_writable(target.parent, flag, shown)
    else:
        _probe_writable(target, flag, shown)
    return target


def check_resumable_dir(out: str | Path, *, inputs: dict | None = None, flag: str = "--out") -> Path:
    """A directory a command adds to across reruns (a sweep): not an input, a directory if it
    exists, and writable. What it may already hold is the command's own business."""
    shown = str(out)
    target = check_not_input(out, inputs or {}, flag)
    if target.exists() and not target.is_dir():
        raise SecateurError(f"{flag} {shown!r} exists and is not a directory; give a directory path")
    _probe_writable(target, flag, shown)
    return target


def _check_replaceable(target: Path, flag: str, shown: str) -> None:
    manifest = read_manifest(target)
    if manifest is None:
        raise SecateurError(f"{flag} {shown!r} was not written by secateur (no {MANIFEST}); secateur replaces "
                            "only directories it wrote: delete it yourself or choose another path")
    strangers = sorted(_files_below(target) - set(manifest.get("files", [])) - {MANIFEST})
    if strangers:
        listed = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise SecateurError(f"{flag} {shown!r} holds files secateur did not write ({listed}); it is not "
                            "replaced: move them out or choose another path")


def is_secateur_json(path: Path) -> bool:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and str(value.get("format", "")).startswith("secateur-")


def check_output_file(path: str | Path, *, inputs: dict | None = None, inside: Path | None = None,
                      flag: str = "--json") -> Path:
    """A JSON output: not an input, not inside the output directory, its directory exists and
    is writable, and an existing file there is one secateur wrote."""
    shown = str(path)
    if not shown or shown.endswith(os.sep):
        raise SecateurError(f"{flag} {shown!r} is not a file path; give a file such as results.json")
    target = check_not_input(path, inputs or {}, flag)
    if inside is not None and _within(target, inside):
        raise SecateurError(f"{flag} {shown!r} lies inside --out, which already holds results.json; "
                            "give a path outside it")
    if target.is_dir():
        raise SecateurError(f"{flag} {shown!r} is a directory; give a file such as results.json")
    if not target.parent.is_dir():
        raise SecateurError(f"{flag} {shown!r}: its directory {target.parent} does not exist; create it first")
    if target.exists() and not is_secateur_json(target):
        raise SecateurError(f"{flag} {shown!r} exists and was not written by secateur; it is not replaced: "
                            "choose another file")
    _probe_writable(target.parent, flag, shown)
    return target


# --------------------------------------------------------------------------- writing


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file beside `path`, renamed over it when complete."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SecateurError(f"cannot write {str(path)!r}: its directory does not exist")
    tmp = path.with_name(f".{path.name}.{_STAGING}{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StagedDirectory:
    """Build an output directory beside its destination, then swap it into place.

        with StagedDirectory(out, kind="checkpoint") as staging:
            ...write files into staging...
        # now `out` is the new directory; on an exception nothing was changed

    Leftovers of earlier killed runs for the same destination are repaired or removed on entry.
    """

    def __init__(self, out: str | Path, *, kind: str):
        self.out = _resolved(out)
        self.kind = kind
        self.path: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: runs/name on a fresh checkout
        recover(self.out)
        self.path = self.out.parent / f".{self.out.name}.{_STAGING}{secrets.token_hex(6)}"
        self.path.mkdir()
        self._lock_fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # tells a concurrent recover() that this run is alive
        self._write_manifest(complete=False)
        return self.path

    def _write_manifest(self, *, complete: bool) -> None:
        files = sorted(_files_below(self.path) - {MANIFEST}) if complete else []
        manifest = {"format": MANIFEST_FORMAT, "kind": self.kind, "complete": complete, "files": files,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._write_manifest(complete=True)
                _test_stall("staged")
                self._swap()
            else:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _swap(self) -> None:
        if not self.out.exists():
            # An empty directory that is already there is replaced by the rename itself.
            self.path.rename(self.out)
            return
        if _exchange(self.path, self.out):
            shutil.rmtree(self.path, ignore_errors=True)  # now the old directory, under the staging name
            return
        retired = self.out.parent / f".{self.out.name}.{_OLD}{secrets.token_hex(6)}"
        self.out.rename(retired)
        _test_stall("swapping")
        self.path.rename(self.out)
        # Manifest first: a removal cut short must never look like a complete old copy to recover().
        (retired / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(retired, ignore_errors=True)


def recover(out: Path) -> list[str]:
    """Repair and clean what killed runs left for destination `out`; returns what was done."""
    done = []
    if not out.parent.is_dir():
        return done
    prefix = f".{out.name}."
    # secateur ≤ 0.1 staged as .NAME.partial-XXXXXXXX and retired as .NAME.old-XXXXXXXX (tempfile's
    # 8 characters); those are cleaned too, never restored (they carry no manifest).
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()
                 and (p.name[len(prefix):].startswith((_STAGING, _OLD))
                      or re.fullmatch(r"(partial|old)-[a-z0-9_]{8}", p.name[len(prefix):]))]
    olds = [p for p in leftovers if p.name[len(prefix):].startswith(_OLD)]
    if not out.exists():
        complete = [p for p in olds if (read_manifest(p) or {}).get("complete")]
        if complete:  # killed between the two renames: the old directory goes back
            complete[0].rename(out)
            leftovers.remove(complete[0])
            done.append(f"restored {out} from {complete[0].name} (a run was killed while replacing it)")
    for path in leftovers:
        if _owner_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by a killed run")
    for line in done:
        print(f"note: {line}", file=sys.stderr)
    return done


def _owner_alive(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if os.environ.get("SECATEUR_NO_EXCHANGE") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False  # this file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def _test_stall(stage: str) -> None:
    """Test hook: with SECATEUR_TEST_STALL=stage:FILE the process writes FILE and waits at
    `stage`, so a test can SIGKILL it at exactly that point of a save."""
    spec = os.environ.get("SECATEUR_TEST_STALL", "")
    name, _, signal_file = spec.partition(":")
    if name == stage and signal_file:
        Path(signal_file).write_text(stage)
        time.sleep(600)
