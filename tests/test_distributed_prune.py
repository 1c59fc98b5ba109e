"""`secateur prune` under torchrun (2 processes, gloo) gives the checkpoint one process gives.

The ranks share the calibration windows and add their statistics (engine/distributed.py,
engine/session.py); what must come out is the model of a single-process run: the same masks,
the same weights to float64 rounding, and a results.json that says two processes did it.
Each launch starts two Python processes that import torch, so only a few methods are run, the
ones whose distributed paths differ: a sum of small statistics (wanda), Gram matrices and an
N:M pattern (sparsegpt), a different statistic set (stade), structured methods that also need
a median over all tokens (putri), a summed reconstruction error (putri's global allocation), a
loss over windows shared by the ranks (putri's perplexity search) and summed cosines
(block-drop).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_text
from safetensors.torch import load_file
from torchrun_launch import torchrun

from secateur.cli import main
from secateur.engine.regional import FIT_UNDONE

LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return tiny_model_and_text(tmp_path_factory.mktemp("inputs"))


def _args(inputs: Path, out: Path, recipe: list[str]) -> list[str]:
    return ["prune", "--model", str(inputs / "model"), "--calib", str(inputs / "calib.txt"), "--nsamples", "5",
            "--seqlen", "32", "--quiet", "--out", str(out), *recipe]


def _one_process(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a BLAS may round differently with another thread count
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("recipe", [
    ["--method", "wanda", "--sparsity", "0.5"],
    ["--method", "sparsegpt", "--sparsity", "0.5"],
    ["--method", "sparsegpt", "--sparsity-type", "2:4"],
    ["--method", "stade", "--sparsity", "0.5"],
    ["--method", "putri", "--sparsity", "0.3"],
    ["--method", "putri", "--sparsity", "0.3", "--method-option", "allocation=global"],
    ["--method", "putri", "--sparsity", "0.3", "--method-option", "head_score=perplexity",
     "--method-option", "search_windows=3"],
    ["--method", "block-drop", "--sparsity", "0.5"],
    ["--method", "wanda", "--sparsity", "0.5", "--stream"],  # every rank streams; rank 0 writes
    ["--method", "putri", "--sparsity", "0.3", "--stream"],
    # rank 0 fits each block on every rank's windows and broadcasts the fitted weights
    ["--method", "sparsegpt", "--sparsity", "0.5", "--method-option", "block_fit=1",
     "--method-option", "block_fit_windows=3", "--method-option", "block_fit_lr=3e-4"],
], ids=["wanda", "sparsegpt", "sparsegpt-2:4", "stade", "putri", "putri-global", "putri-search", "block-drop",
        "wanda-stream", "putri-stream", "sparsegpt-block-fit"])
def test_two_processes_save_the_checkpoint_of_one(inputs, tmp_path, recipe):
    _one_process(_args(inputs, tmp_path / "one", [flag for flag in recipe if flag != "--stream"]))
    torchrun(2, ["-m", "secateur", *_args(inputs, tmp_path / "two", recipe)], LAUNCH_TIMEOUT_S)

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(one) == sorted(two)
    for name, expected in one.items():
        got = two[name]
        assert got.shape == expected.shape, name
        assert torch.equal(got == 0, expected == 0), f"{name}: the masks differ"
        difference = float((got.double() - expected.double()).norm())
        assert difference <= 1e-6 * float(expected.double().norm()), f"{name}: differs by {difference}"

    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2
    if "block_fit=1" in recipe:  # the fit ran and was kept: a checkpoint without it would compare equal too
        assert results["timings_s"]["regional_optimization"] > 0
        assert not [w for w in results["warnings"] if FIT_UNDONE in w], results["warnings"]
    assert json.loads((tmp_path / "one" / "results.json").read_text())["world_size"] == 1
    traffic = results["traffic_bytes"]
    assert sum(step["total"] for step in traffic.values()) > 0  # a step may exchange nothing (a block left whole)
    if recipe[1] == "wanda":  # one entry per block, each with its statistics' sums
        assert list(traffic) == [f"prune/{i}" for i in range(len(traffic))]
        assert all(step["reduce"] > 0 for step in traffic.values())


def test_resume_under_torchrun_is_refused_in_one_line(inputs, tmp_path, monkeypatch, capsys):
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    assert main(_args(inputs, tmp_path / "out", ["--method", "wanda", "--resume"])) == 2
    err = capsys.readouterr().err
    assert "--resume is not supported under torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
