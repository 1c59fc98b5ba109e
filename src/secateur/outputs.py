"""Where secateur writes, and the rules that keep a user's data safe.

Rules, decided here and checked before any model is loaded:
- an output is never an input: an output directory that is, contains or lies inside the
  model, the calibration or evaluation data, a recipe, a sweep or any other input of the
  command is refused, and so is one that is or contains the current directory;
- `--overwrite` replaces only a directory that secateur wrote (it holds a manifest,
  `.secateur-manifest.json`, listing every file secateur put there), of the same kind (a
  checkpoint replaces a checkpoint, a report a report) and that holds nothing else; an empty
  directory is free to use; anything else is refused;
- a JSON output (`--json`) replaces only a JSON file that secateur wrote, of the same kind (its
  `"format"` field: `prune --json` replaces `secateur-results/…`, never a sweep's `sweep.json`);
- nothing is written inside a directory secateur manages (a checkpoint, a report, a sweep):
  a file added there would change what that directory is, or keep it from being replaced;
- every output location is probed for writability up front (a read-only file system is
  found in a second, not after an hour of pruning), and its name must fit the file system
  with the staging suffix (`.NAME.secateur-staging-XXXXXXXXXXXX`) and be valid UTF-8 (the
  tokenizer and safetensors libraries cannot write other names).

Directories are written into a hidden staging directory beside the destination
(`.NAME.secateur-staging-XXXX`, same file system, so renames are atomic) and swapped into
place at the end. With Linux's `renameat2(RENAME_EXCHANGE)` the swap is one atomic step;
elsewhere it is two renames (old aside as `.NAME.secateur-old-XXXX`, new in). After a crash
at any instant `NAME` is therefore the old or the new complete directory, except in the
two-rename fallback's window, where only the old one exists under its hidden name: the next
run for the same destination puts it back. The next run also removes every leftover staging
or old directory of that destination whose owner is gone (each live run holds a lock on its
staging directory), so a killed run costs no disk space for long. Leftovers of secateur 0.1
(`.NAME.partial-*`/`.NAME.old-*` checkpoints, `.tmp-NAME-*` reports) are handled the same way:
an old copy is put back when `NAME` is missing and the copy is complete, else removed.
The swap re-checks `NAME` first: a file the user added to it while the run worked keeps it
from being replaced, and without `--overwrite` a `NAME` that appeared meanwhile is refused.

`prune --out NAME` keeps its progress in `.NAME.secateur-resume` beside it (`resume_dir`; the
format is secateur.engine.workdir's) until the checkpoint is in place. Leftover cleanup never
touches it: it is the only copy of a killed run's work, which `--resume` continues.
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
STAGING_MARK, _OLD = "secateur-staging-", "secateur-old-"
_RESUME = "secateur-resume"


# --------------------------------------------------------------------------- checks


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: str | Path, inputs: dict[str, str | Path | None], flag: str) -> Path:
    """Refuse an output that is, contains or lies inside an input (or the current directory).

    `inputs` maps a description ("the model", "the calibration file") to a path; None and
    names that are not paths on this machine (hub ids, dataset names) are skipped."""
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise SecateurError(f"{flag} {str(out)!r} is not valid UTF-8 (a byte shown as \\udcXX); the tokenizer "
                            "and safetensors libraries cannot write such names: choose a UTF-8 path") from None
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


def _is_sweep_dir(directory: Path) -> bool:
    try:
        value = json.loads((directory / "sweep.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and str(value.get("format", "")).startswith("secateur-sweep/")


def check_not_managed(target: Path, flag: str, shown: str, *, within: Path | None = None) -> None:
    """Refuse an output inside a directory secateur manages (a checkpoint, a report, a sweep),
    other than `within` (a sweep writes its own checkpoints into itself)."""
    for ancestor in target.parents:
        if within is not None and ancestor == within:
            return
        manifest = read_manifest(ancestor)
        what = f"a secateur {manifest.get('kind', 'output')}" if manifest is not None else \
            ("a secateur sweep" if _is_sweep_dir(ancestor) else None)
        if what:
            raise SecateurError(f"{flag} {shown!r} lies inside {ancestor}, which is {what}; secateur adds nothing "
                                "to a directory it wrote: give a path outside it")


def _check_name(target: Path, flag: str, shown: str, staging_suffix: int) -> None:
    """Every part of the path, and the hidden staging name beside it, fits the file system."""
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor if ancestor.is_dir() else ancestor.parent, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor if ancestor.is_dir() else ancestor.parent, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    name_max, path_max = name_max or 255, path_max or 4096
    for part in target.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise SecateurError(f"{flag} {shown!r}: the name {part[:24]!r}… is {len(os.fsencode(part))} bytes, "
                                f"longer than this file system's {name_max}; choose a shorter name")
    staged = len(os.fsencode(target.name)) + staging_suffix
    if staged > name_max:
        raise SecateurError(f"{flag} {shown!r}: the name is {len(os.fsencode(target.name))} bytes; secateur "
                            f"writes it first under a hidden name {staging_suffix} bytes longer, which must fit "
                            f"this file system's {name_max}: use at most {name_max - staging_suffix} bytes")
    if len(os.fsencode(str(target))) + staging_suffix >= path_max:
        raise SecateurError(f"{flag} {shown!r} is longer than this file system's {path_max}-byte path limit "
                            "allows; choose a shorter path")


_DIR_SUFFIX = len(f"..{STAGING_MARK}") + 12  # .NAME.secateur-staging-XXXXXXXXXXXX
_FILE_SUFFIX = len(f"..{STAGING_MARK}") + 8  # .NAME.secateur-staging-XXXXXXXX


def probe_writable(path: Path, flag: str, shown: str) -> None:
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


def check_output_dir(out: str | Path, *, overwrite: bool, inputs: dict | None = None, flag: str = "--out",
                     kind: str = "checkpoint", within: Path | None = None) -> Path:
    """Everything about an output directory that can be known before the work starts.

    `kind` is what will be written ("checkpoint", "report"): --overwrite replaces only that kind;
    `within`: a managed directory the output may lie inside (a sweep's own checkpoints)."""
    shown = str(out)
    target = check_not_input(out, inputs or {}, flag)
    check_not_managed(target, flag, shown, within=within)
    _check_name(target, flag, shown, _DIR_SUFFIX)
    recover(target)  # an earlier killed run's leftovers first: they decide what is at `out`
    if target.exists() or Path(out).is_symlink():
        if not target.is_dir():
            raise SecateurError(f"{flag} {shown!r} exists and is not a directory; give a directory path")
        if any(target.iterdir()):
            if not overwrite:
                raise SecateurError(f"{flag} {shown!r} already exists; pass --overwrite to replace it (secateur "
                                    "replaces only directories it wrote)")
            _check_replaceable(target, flag, shown, kind)
        probe_writable(target.parent, flag, shown)
    else:
        probe_writable(target, flag, shown)
    return target


def resume_dir(out: str | Path) -> Path:
    """Where a `prune --out` run keeps its progress until its checkpoint is in place."""
    target = _resolved(out)
    return target.parent / f".{target.name}.{_RESUME}"


def check_resumable_dir(out: str | Path, *, inputs: dict | None = None, flag: str = "--out") -> Path:
    """A directory a command adds to across reruns (a sweep): not an input, a directory if it
    exists, and writable. What it may already hold is the command's own business."""
    shown = str(out)
    target = check_not_input(out, inputs or {}, flag)
    check_not_managed(target, flag, shown)
    _check_name(target, flag, shown, 0)
    if target.exists() and not target.is_dir():
        raise SecateurError(f"{flag} {shown!r} exists and is not a directory; give a directory path")
    probe_writable(target, flag, shown)
    return target


def _check_replaceable(target: Path, flag: str, shown: str, kind: str) -> None:
    manifest = read_manifest(target)
    if manifest is None:
        raise SecateurError(f"{flag} {shown!r} was not written by secateur (no {MANIFEST}); secateur replaces "
                            "only directories it wrote: delete it yourself or choose another path")
    if manifest.get("kind") != kind:
        raise SecateurError(f"{flag} {shown!r} holds a secateur {manifest.get('kind')!s}, not a {kind}; --overwrite "
                            f"replaces only a {kind}: delete it yourself or choose another path")
    strangers = sorted(_files_below(target) - set(manifest.get("files", [])) - {MANIFEST})
    if strangers:
        listed = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise SecateurError(f"{flag} {shown!r} holds files secateur did not write ({listed}); it is not "
                            "replaced: move them out or choose another path")


def secateur_json_format(path: Path) -> str | None:
    """The `"format"` of a JSON file secateur wrote (`secateur-…`), or None."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    found = value.get("format") if isinstance(value, dict) else None
    return found if isinstance(found, str) and found.startswith("secateur-") else None


def is_secateur_json(path: Path) -> bool:
    return secateur_json_format(path) is not None


def _family(fmt: str) -> str:
    return fmt.partition("/")[0]


def check_file_location(path: str | Path, inputs: dict | None, inside: Path | None, flag: str,
                         example: str) -> Path:
    """What every single-file output must satisfy, whatever its content: not an input, not
    inside the output directory or any directory secateur manages, its directory exists, its
    name fits."""
    shown = str(path)
    if not shown or shown.endswith(os.sep):
        raise SecateurError(f"{flag} {shown!r} is not a file path; give a file such as {example}")
    target = check_not_input(path, inputs or {}, flag)
    if inside is not None and _within(target, inside):
        raise SecateurError(f"{flag} {shown!r} lies inside --out, which secateur writes as a whole; "
                            "give a path outside it")
    if target.is_dir():
        raise SecateurError(f"{flag} {shown!r} is a directory; give a file such as {example}")
    if not target.parent.is_dir():
        raise SecateurError(f"{flag} {shown!r}: its directory {target.parent} does not exist; create it first")
    check_not_managed(target, flag, shown)
    _check_name(target, flag, shown, _FILE_SUFFIX)
    return target


def check_output_file(path: str | Path, *, inputs: dict | None = None, inside: Path | None = None,
                      flag: str = "--json", fmt: str | None = None) -> Path:
    """A JSON output: not an input, not inside the output directory or any directory secateur
    manages, its directory exists and is writable, and an existing file there is one secateur
    wrote, of the same kind (`fmt`, e.g. "secateur-results/1")."""
    shown = str(path)
    target = check_file_location(path, inputs, inside, flag, "results.json")
    if target.exists() or target.is_symlink():
        found = secateur_json_format(target) if target.is_file() else None
        if found is None:
            raise SecateurError(f"{flag} {shown!r} exists and was not written by secateur; it is not replaced: "
                                "choose another file")
        if fmt is not None and _family(found) != _family(fmt):
            raise SecateurError(f"{flag} {shown!r} holds {found} data, not {_family(fmt)}; it is not replaced: "
                                "choose another file")
    probe_writable(target.parent, flag, shown)
    return target


def starts_with_line(path: Path, header: str) -> bool:
    """Whether a text file's first line begins with `header` (how secateur marks a text output)."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            return handle.readline().startswith(header)
    except (OSError, UnicodeDecodeError):
        return False


def check_output_text(path: str | Path, *, header: str, inputs: dict | None = None, inside: Path | None = None,
                      flag: str, example: str) -> Path:
    """A text output (e.g. an exported recipe) with the rules of a JSON output; an existing file
    there is replaced only if its first line is secateur's `header`."""
    shown = str(path)
    target = check_file_location(path, inputs, inside, flag, example)
    if (target.exists() or target.is_symlink()) and not (target.is_file() and starts_with_line(target, header)):
        raise SecateurError(f"{flag} {shown!r} exists and was not written by secateur; it is not replaced: "
                            "choose another file")
    probe_writable(target.parent, flag, shown)
    return target


# --------------------------------------------------------------------------- writing


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON through a temporary file beside `path`, renamed over it when complete."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file beside `path`, renamed over it when complete."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SecateurError(f"cannot write {str(path)!r}: its directory does not exist")
    tmp = path.with_name(f".{path.name}.{STAGING_MARK}{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
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

    def __init__(self, out: str | Path, *, kind: str, overwrite: bool = False):
        self.out = _resolved(out)
        self.kind = kind
        self.overwrite = overwrite
        self.path: Path | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: runs/name on a fresh checkout
        recover(self.out)
        self.path = self.out.parent / f".{self.out.name}.{STAGING_MARK}{secrets.token_hex(6)}"
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
            if exc_type is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                return
            try:
                self._write_manifest(complete=True)
                _test_stall("staged")
                self._swap()
            except BaseException:  # refused or failed at the swap: `out` is as it was, the staging goes
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _swap(self) -> None:
        if not self.out.exists() or (self.out.is_dir() and not self.out.is_symlink() and not any(self.out.iterdir())):
            # An empty directory that is already there is replaced by the rename itself.
            self.path.rename(self.out)
            return
        # Checked again now, not only before the work: the directory may have changed meanwhile.
        if not self.overwrite:
            raise SecateurError(f"{self.out} appeared while this run was working (another run?); it was not "
                                "replaced and nothing was written: rerun with --overwrite or another path")
        _check_replaceable(self.out, "--out", str(self.out), self.kind)
        if _exchange(self.path, self.out):
            shutil.rmtree(self.path, ignore_errors=True)  # now the old directory, under the staging name
            return
        retired = self.out.parent / f".{self.out.name}.{_OLD}{secrets.token_hex(6)}"
        self.out.rename(retired)
        _test_stall("swapping")
        try:
            self.path.rename(self.out)
        except BaseException:
            retired.rename(self.out)  # the old directory goes straight back
            raise
        # Manifest first: a removal cut short must never look like a complete old copy to recover().
        (retired / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(retired, ignore_errors=True)


def recover(out: Path) -> list[str]:
    """Repair and clean what killed runs left for destination `out`; returns what was done."""
    done = []
    if not out.parent.is_dir():
        return done
    prefix, legacy_prefix = f".{out.name}.", f".tmp-{out.name}-"
    leftovers, olds = [], []
    for path in out.parent.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        rest = path.name[len(prefix):] if path.name.startswith(prefix) else None
        report_rest = path.name[len(legacy_prefix):] if path.name.startswith(legacy_prefix) else None
        if rest is not None and rest.startswith((STAGING_MARK, _OLD)):
            leftovers.append(path)
            if rest.startswith(_OLD):
                olds.append(path)
        # secateur 0.1: checkpoints staged as .NAME.partial-XXXXXXXX and retired as .NAME.old-XXXXXXXX
        # (tempfile's 8 characters), reports as .tmp-NAME-XXXXXXXXXXXX and .tmp-NAME-old-XXXXXXXXXXXX.
        elif rest is not None and re.fullmatch(r"(partial|old)-[a-z0-9_]{8}", rest):
            leftovers.append(path)
            if rest.startswith("old-"):
                olds.append(path)
        elif report_rest is not None and re.fullmatch(r"(old-)?[0-9a-f]{12}", report_rest):
            if report_rest.startswith("old-"):
                leftovers.append(path)
                olds.append(path)
            elif not (out.name.endswith("-old") and not (out.parent / out.name[:-4]).exists()):
                leftovers.append(path)  # (.tmp-X-old-… may be the only copy of X, not a staging of X-old)
    if not out.exists():
        complete = [p for p in olds if _complete_old_copy(p)]
        if complete:  # killed between the two renames: the old directory goes back
            complete[0].rename(out)
            leftovers.remove(complete[0])
            done.append(f"restored {out} from {complete[0].name} (a run was killed while replacing it)")
    for path in leftovers:
        if owner_alive(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed {path.name}, left by a killed run")
    for line in done:
        print(f"note: {line}", file=sys.stderr)
    return done


def _complete_old_copy(path: Path) -> bool:
    """Whether a retired directory is a whole copy worth restoring: a complete manifest, or for
    secateur 0.1 (no manifest) every file a checkpoint or a report has."""
    manifest = read_manifest(path)
    if manifest is not None:
        return bool(manifest.get("complete"))
    if (path / "report.md").is_file() and (path / "report.html").is_file():
        return True
    if not all((path / name).is_file() for name in ("config.json", "recipe.yaml", "results.json")):
        return False
    if (path / "model.safetensors").is_file():
        return True
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
        return all((path / shard).is_file() for shard in set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return False


def owner_alive(path: Path) -> bool:
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
