"""A prune killed (SIGKILL) while saving, then run again, leaves exactly one complete --out and
no leftovers; outputs on a read-only file system are refused before the model is loaded; random
recipes either load or are refused in one line (property-based)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_model_and_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secateur.cli import main
from secateur.errors import SecateurError
from secateur.outputs import MANIFEST
from secateur.recipe import Recipe


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return tiny_model_and_text(tmp_path_factory.mktemp("inputs"))


def _prune_command(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "secateur.cli", "prune", "--model", str(inputs / "model"), "--calib",
            str(inputs / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--quiet", "--out", str(out), *extra]


def _kill_at(stage: str, command: list[str], tmp_path: Path, **env: str) -> None:
    """Run `command` until it reaches save stage `stage`, then SIGKILL it."""
    signal_file = tmp_path / f"reached-{stage}"
    environment = os.environ | {"SECATEUR_TEST_STALL": f"{stage}:{signal_file}"} | env
    proc = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not signal_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {stage}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {stage} in 120 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _complete(out: Path) -> dict:
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"]
    for name in manifest["files"]:
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text())


def test_kill_after_staging_then_rerun_leaves_one_complete_output(inputs, tmp_path):
    parent = tmp_path / "runs"
    out = parent / "pruned"
    command = _prune_command(inputs, out, "--method", "magnitude")
    _kill_at("staged", command, tmp_path)
    assert not out.exists()
    progress, staging = sorted(p.name for p in parent.iterdir())  # the killed run's
    assert progress == ".pruned.secateur-resume" and staging.startswith(".pruned.secateur-staging-")

    rerun = subprocess.run([*command, "--resume"], capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed .pruned.secateur-staging-" in rerun.stderr  # it says what it cleaned
    assert [p.name for p in parent.iterdir()] == ["pruned"]
    assert _complete(out)["method"] == "magnitude"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_kill_while_replacing_keeps_old_or_new_and_rerun_repairs(inputs, tmp_path, exchange):
    parent = tmp_path / "runs"
    out = parent / "pruned"
    env = {} if exchange else {"SECATEUR_NO_EXCHANGE": "1"}
    first = subprocess.run(_prune_command(inputs, out, "--method", "magnitude", "--sparsity", "0.3"),
                           capture_output=True, text=True, check=False, env=os.environ | env)
    assert first.returncode == 0, first.stderr
    old_results = (out / "results.json").read_text()

    replace = _prune_command(inputs, out, "--method", "wanda", "--overwrite")
    # Killed with the new copy complete but before the swap: the old one is still at --out.
    _kill_at("staged", replace, tmp_path, **env)
    assert (out / "results.json").read_text() == old_results
    replace.append("--resume")  # the killed run's progress is kept for it
    if not exchange:
        # Killed between the two renames: --out is missing for that instant; the old copy is
        # complete under its hidden name, and the next run puts it back before anything else.
        _kill_at("swapping", replace, tmp_path, **env)
        assert not out.exists()
        hidden = [p for p in parent.iterdir() if ".secateur-old-" in p.name]
        assert len(hidden) == 1 and (hidden[0] / "results.json").read_text() == old_results
        again = subprocess.run(_prune_command(inputs, out, "--method", "wanda"), capture_output=True,
                               text=True, check=False, env=os.environ | env)
        assert again.returncode == 2 and "--overwrite" in again.stderr  # the old copy is back, so it exists
        assert "restored" in again.stderr and (out / "results.json").read_text() == old_results

    rerun = subprocess.run(replace, capture_output=True, text=True, check=False, env=os.environ | env)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in parent.iterdir()] == ["pruned"]
    assert _complete(out)["method"] == "wanda"


def test_output_on_a_read_only_file_system_is_refused_up_front(inputs, tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode:
        pytest.skip("needs `unshare -m` (a private mount namespace) to mount a read-only file system")
    mount = tmp_path / "ro"
    mount.mkdir()
    for flag, path in (("--out", mount / "pruned"), ("--json", mount / "r.json")):
        script = (f"mount -t tmpfs -o ro tmpfs {mount} && exec " +
                  " ".join(f"'{a}'" for a in _prune_command(inputs, tmp_path / "elsewhere", flag, str(path))))
        proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, check=False)
        if "mount:" in proc.stderr:
            pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"secateur: error: {flag}") and "Read-only file system" in lines[0]
    assert not (tmp_path / "elsewhere").exists()


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.text(max_size=5), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_FIELDS = st.sampled_from([*Recipe.__dataclass_fields__, "bogus"])
_GOOD = {"method": st.sampled_from(["wanda", "magnitude", "sparsegpt", "putri", "snip"]),
         "sparsity": st.floats(-0.5, 1.5), "sparsity_type": st.sampled_from(["unstructured", "2:4", "4:4", "x"]),
         "allocation": st.sampled_from(["uniform", "owl", "random"]), "nsamples": st.integers(-2, 300),
         "seqlen": st.integers(-2, 4096), "owl_lambda": st.floats(-0.1, 0.5)}


@st.composite
def recipe_dicts(draw) -> dict:
    keys = draw(st.lists(_FIELDS, max_size=6, unique=True))
    return {key: draw(_GOOD[key] if key in _GOOD and draw(st.booleans()) else _VALUES) for key in keys}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=recipe_dicts())
def test_random_recipes_load_or_are_refused_in_one_line(data, tmp_path_factory, capsys):
    try:
        recipe = Recipe.from_dict(data)
    except SecateurError as error:
        assert "\n" not in str(error) and str(error)
        # The same recipe through the CLI: exit 2, one line, nothing written.
        root = tmp_path_factory.mktemp("recipe")
        path = root / "recipe.yaml"
        path.write_text(json.dumps(data))  # JSON is YAML, and keeps every value's type
        code = main(["prune", "--model", "no-model-needed-before-the-recipe-is-checked", "--recipe", str(path),
                     "--out", str(root / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("secateur: error:"), err
        assert sorted(p.name for p in root.iterdir()) == ["recipe.yaml"]
    else:  # accepted: it round-trips through its YAML form unchanged
        assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recover_removes_dead_leftovers_but_not_a_live_runs_staging(tmp_path, capsys):
    import fcntl

    from secateur.outputs import recover

    legacy = tmp_path / ".pruned.partial-k2j_x9ab"  # what secateur 0.1 left when killed
    dead = tmp_path / ".pruned.secateur-staging-0123456789ab"
    live = tmp_path / ".pruned.secateur-staging-ba9876543210"
    unrelated = tmp_path / ".pruned-notes"
    for path in (legacy, dead, live, unrelated):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 100)
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running prune holds its staging directory
    try:
        done = recover(tmp_path / "pruned")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name])
    assert len(done) == 2 and all("left by a killed run" in line for line in done)
    assert capsys.readouterr().err.count("note: removed") == 2


def test_recover_puts_back_a_legacy_old_copy_when_out_is_missing(tmp_path, capsys):
    """secateur 0.1, killed between its two renames, left the only copy as .NAME.old-XXXXXXXX;
    deleting it as a leftover would lose the user's checkpoint."""
    from secateur.outputs import recover

    old = tmp_path / ".pruned.old-k2j_x9ab"
    old.mkdir()
    for name in ("config.json", "recipe.yaml", "results.json", "model.safetensors"):
        (old / name).write_text(name)
    staging = tmp_path / ".pruned.partial-a1b2c3d4"
    staging.mkdir()
    done = recover(tmp_path / "pruned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    assert (tmp_path / "pruned" / "results.json").read_text() == "results.json"
    assert any("restored" in line for line in done) and "restored" in capsys.readouterr().err

    # The same for a 0.1 report (.tmp-NAME-old-XXXXXXXXXXXX); an incomplete old copy is removed.
    report = tmp_path / ".tmp-rep-old-0123456789ab"
    report.mkdir()
    (report / "report.md").write_text("md")
    (report / "report.html").write_text("html")
    cut = tmp_path / ".ckpt.old-zzzzzzzz"
    cut.mkdir()
    (cut / "config.json").write_text("{}")  # a removal cut short: no weights, no results
    recover(tmp_path / "rep")
    recover(tmp_path / "ckpt")
    assert (tmp_path / "rep" / "report.md").read_text() == "md"
    assert not (tmp_path / "ckpt").exists() and not cut.exists()


def test_swap_rechecks_the_destination_at_the_end(tmp_path):
    """The destination is checked again just before the swap: a file the user put into it while
    the run worked keeps it from being replaced, and without overwrite a destination that
    appeared meanwhile is refused; nothing is left beside it either way."""
    from secateur.outputs import StagedDirectory

    out = tmp_path / "pruned"
    with StagedDirectory(out, kind="checkpoint") as staging:
        (staging / "results.json").write_text("old")
    with pytest.raises(SecateurError, match="did not write"), \
            StagedDirectory(out, kind="checkpoint", overwrite=True) as staging:
        (staging / "results.json").write_text("new")
        (out / "notes.md").write_text("written by the user meanwhile")
    assert (out / "results.json").read_text() == "old" and (out / "notes.md").is_file()

    other = tmp_path / "other"
    with pytest.raises(SecateurError, match="appeared while this run was working"), \
            StagedDirectory(other, kind="checkpoint") as staging:
        (staging / "results.json").write_text("mine")
        other.mkdir()
        (other / "theirs.txt").write_text("another run's")
    assert [p.name for p in other.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "pruned"]
