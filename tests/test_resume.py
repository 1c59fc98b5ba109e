"""Resume after a crash: `prune --out DIR --resume`.

A run killed right after any completed step, resumed, must end with exactly the weights of an
uninterrupted run (the same safetensors bytes), having skipped the work it had done; a resume
with a different setting, and a new run over an interrupted one's progress, are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_text
from tiny_models import build_tiny_model

import secateur
from secateur.cli import main
from secateur.engine import session as session_module
from secateur.engine import workdir
from secateur.engine.regional import FIT_UNDONE
from secateur.engine.session import BlockSession
from secateur.engine.workdir import WorkDir
from secateur.models import get_adapter
from secateur.outputs import recover, resume_dir


class Killed(Exception):
    """Stands in for the test hook's SIGKILL when the run is in this process."""


def calibration_ids(model, nsamples=4, seqlen=32):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=generator)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].shape == right[name].shape and torch.equal(left[name], right[name]), name


@pytest.fixture
def block_runs(monkeypatch) -> list[int]:
    """Every block run of the session (gathers and advances), counted."""
    runs = []
    real = session_module.run_block

    def counted(block, hidden, call):
        runs.append(1)
        return real(block, hidden, call)

    monkeypatch.setattr(session_module, "run_block", counted)
    return runs


# (architecture, recipe, the step after which the first run dies)
CASES = [
    ("llama", {"method": "wanda", "sparsity": 0.5}, "prune/0"),
    ("llama", {"method": "wanda", "sparsity": 0.6, "allocation": "owl", "owl_threshold": 2.0}, "owl/0"),
    ("gpt2", {"method": "stade", "sparsity": 0.5}, "prune/0"),  # transposed weights, new biases
    ("llama", {"method": "putri", "sparsity": 0.5}, "putri-heads/0"),  # after the whole FFN pass
    ("llama", {"method": "putri", "sparsity": 0.3, "method_options": {"allocation": "global"}}, "putri-plan/1"),
    ("llama", {"method": "flap", "sparsity": 0.3}, "flap-stats/0"),
    ("llama", {"method": "wanda-sp", "sparsity": 0.3}, "wanda-sp/0"),
    ("gemma3_text", {"method": "block-drop", "sparsity": 0.34}, "block-influence/1"),
    # The block fit draws its windows at random: the resumed run must draw what the killed one would have.
    ("llama", {"method": "sparsegpt", "sparsity": 0.5,
               "method_options": {"block_fit": 2, "block_fit_windows": 2, "block_fit_lr": 3e-4}}, "prune/0"),
]


@pytest.mark.parametrize(("arch", "recipe", "step"), CASES, ids=[f"{r['method']}-{s}" for _, r, s in CASES])
def test_a_run_killed_after_a_step_resumes_to_the_same_weights(arch, recipe, step, tmp_path, monkeypatch,
                                                                block_runs):
    ids = calibration_ids(build_tiny_model(arch))
    uninterrupted = build_tiny_model(arch)
    _, expected = secateur.prune(uninterrupted, recipe, ids, progress=False)
    runs_uninterrupted = len(block_runs)

    def die():
        raise Killed(step)

    monkeypatch.setattr(workdir, "_kill_self", die)
    monkeypatch.setenv(workdir.KILL_AFTER_STEP, step)
    path = tmp_path / "work"
    settings = {"case": step}
    work = WorkDir.open(path, settings, resume=False)
    with pytest.raises(Killed):
        secateur.prune(build_tiny_model(arch), recipe, ids, progress=False, work_dir=work)
    work.close()
    monkeypatch.delenv(workdir.KILL_AFTER_STEP)
    steps_done = [record["name"] for record in json.loads((path / "progress.json").read_text())["steps"]]
    assert steps_done[-1] == step

    block_runs.clear()
    work = WorkDir.open(path, settings, resume=True)
    assert work.resumed_steps == len(steps_done)
    resumed = build_tiny_model(arch)
    _, report = secateur.prune(resumed, recipe, ids, progress=False, work_dir=work)
    work.discard()
    _same_state(resumed, uninterrupted)
    assert len(block_runs) < runs_uninterrupted  # the completed steps were taken up, not redone
    assert report.layers == expected.layers and report.block_sparsity == expected.block_sparsity
    assert report.owl_outlier_ratios == expected.owl_outlier_ratios
    assert report.structure == expected.structure and report.warnings == expected.warnings
    if recipe.get("method_options", {}).get("block_fit"):  # the fits were kept, so a resumed fit is compared
        assert not [w for w in expected.warnings if FIT_UNDONE in w], expected.warnings


def test_replaying_a_different_flow_is_refused(tmp_path):
    path = tmp_path / "work"
    model = build_tiny_model("llama")
    ids = calibration_ids(model)
    work = WorkDir.open(path, {}, resume=False)
    secateur.prune(model, {"method": "wanda"}, ids, progress=False, work_dir=work)
    work.close()
    with pytest.raises(secateur.SecateurError, match="reached step 'putri-ffn/0' where the interrupted run recorded"):
        secateur.prune(build_tiny_model("llama"), {"method": "putri", "sparsity": 0.3}, ids, progress=False,
                       work_dir=WorkDir.open(path, {}, resume=True))


def test_a_resumed_run_draws_the_random_numbers_the_interrupted_one_would_have(tmp_path):
    model = build_tiny_model("llama")
    work = WorkDir.open(tmp_path / "work", {}, resume=False)
    torch.manual_seed(1)
    torch.rand(3)
    BlockSession(model, get_adapter(model), None, work_dir=work).complete("draw/0")
    expected = torch.rand(3)
    work.close()
    torch.manual_seed(2)
    resumed = BlockSession(model, get_adapter(model), None, work_dir=WorkDir.open(tmp_path / "work", {}, resume=True))
    assert resumed.replay("draw/0").tensors == {}
    assert torch.equal(torch.rand(3), expected)


def test_writes_cut_short_are_removed_on_resume(tmp_path):
    path = tmp_path / "work"
    work = WorkDir.open(path, {"a": 1}, resume=False)
    work.complete("s/0", {"w": torch.ones(2)}, {"x": 0.1}, inputs=work.save_inputs([torch.zeros(1, 2, 4)]),
                  warnings=[])
    work.close()
    (path / "inputs-0001.safetensors").write_bytes(b"cut")  # killed while writing the next step
    (path / ".progress.json.tmp").write_text("{")
    work = WorkDir.open(path, {"a": 1}, resume=True)
    assert sorted(p.name for p in path.iterdir()) == ["inputs-0000.safetensors", "progress.json", "settings.json",
                                                      "step-0000.safetensors"]
    record = work.replay("s/0")
    assert record.meta == {"x": 0.1} and torch.equal(record.tensors["w"], torch.ones(2))
    assert torch.equal(work.load_inputs(record.inputs)[0], torch.zeros(1, 2, 4))
    assert work.replay("s/1") is None
    work.discard()
    assert not path.exists()


def test_a_second_live_run_on_the_same_work_dir_is_refused(tmp_path):
    work = WorkDir.open(tmp_path / "work", {}, resume=False)
    with pytest.raises(secateur.SecateurError, match="another secateur run is working on"):
        WorkDir.open(tmp_path / "work", {}, resume=True)
    work.discard()


def test_leftover_cleanup_keeps_a_killed_runs_progress(tmp_path):
    out = tmp_path / "pruned"
    progress = resume_dir(out)
    staging = tmp_path / ".pruned.secateur-staging-0123456789ab"
    for path in (progress, staging):
        path.mkdir()
        (path / "settings.json").write_text("{}")
    recover(out)
    assert progress.name == ".pruned.secateur-resume"
    assert sorted(p.name for p in tmp_path.iterdir()) == [progress.name]


# --- the command line, killed for real ------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return tiny_model_and_text(tmp_path_factory.mktemp("inputs"))


def _args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(inputs / "model"), "--calib", str(inputs / "calib.txt"), "--nsamples", "4",
            "--seqlen", "32", "--quiet", "--out", str(out), *extra]


def _killed_run(args: list[str], step: str) -> None:
    """The CLI in a child process that SIGKILLs itself after `step` (with this process's thread
    count, so that its arithmetic is this process's to the bit)."""
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from secateur.cli import main; sys.exit(main(sys.argv[1:]))")
    env = os.environ | {workdir.KILL_AFTER_STEP: step}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == -9, proc.stderr


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("method", "step"), [("wanda", "prune/0"), ("putri", "putri-ffn/0")])
def test_killed_command_resumes_to_a_byte_identical_checkpoint(inputs, tmp_path, capsys, method, step):
    recipe = ["--method", method, "--sparsity", "0.3"]
    assert main(_args(inputs, tmp_path / "uninterrupted", *recipe)) == 0

    out = tmp_path / "runs" / "pruned"
    _killed_run(_args(inputs, out, *recipe), step)
    progress = resume_dir(out)
    assert not out.exists() and progress.is_dir()
    capsys.readouterr()

    if method == "wanda":  # the refusals, once
        # A new run over the interrupted one's progress is refused; so is a resume with another setting.
        assert main(_args(inputs, out, *recipe)) == 2
        assert "pass --resume to continue it" in capsys.readouterr().err
        assert main(_args(inputs, out, "--method", method, "--sparsity", "0.4", "--resume")) == 2
        assert "the interrupted run used recipe sparsity 0.3, this one 0.4" in capsys.readouterr().err
        assert progress.is_dir() and not out.exists()

    assert main(_args(inputs, out, *recipe, "--resume")) == 0
    assert "taking up" in capsys.readouterr().err
    assert _sha256(out / "model.safetensors") == _sha256(tmp_path / "uninterrupted" / "model.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned"]  # the progress went with the swap


def test_resume_needs_out(inputs, capsys):
    assert main(["prune", "--model", str(inputs / "model"), "--method", "magnitude", "--resume"]) == 2
    assert "--resume continues an interrupted `prune --out DIR`" in capsys.readouterr().err


def test_a_failed_run_leaves_no_progress_behind(inputs, tmp_path, capsys):
    """A refusal during the pruning (here: FLAP cannot remove that much) would fail again on resume."""
    out = tmp_path / "pruned"
    assert main(_args(inputs, out, "--method", "flap", "--sparsity", "0.99")) == 2
    assert "flap cannot remove" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
