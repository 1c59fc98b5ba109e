"""Wanda++: the regional gradient score on hand-made layers, the engine's regional gradients
against plain autograd through the model's own forward, regional optimisation's guarantees, and
whole tiny models (sparsity, other families, resume, two processes, streaming)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model_and_text
from safetensors.torch import load_file
from test_distributed_prune import _args, _one_process
from test_engine import assert_untouched, calibration_ids, targeted_weights
from test_methods import correlated_inputs, stats_for
from test_stream_prune import prune_tiny_both
from tiny_models import build_tiny_model
from torchrun_launch import torchrun

import secateur
from secateur.engine import workdir
from secateur.engine.regional import (
    RegionalPlan,
    block_outputs,
    fit_schedule,
    regional_gradients,
    regional_optimize,
)
from secateur.engine.session import BlockSession
from secateur.engine.workdir import WorkDir
from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods import SparsityTarget, get_method, method_option_names
from secateur.methods.base import LayerInfo
from secateur.methods.wanda_pp import rgs_scores
from secateur.models import get_adapter
from secateur.recipe import Recipe
from secateur.roles import ROLE_NORMED
from secateur.stats import LinearStats

HALF = SparsityTarget.unstructured(0.5)
TWO_FOUR = SparsityTarget.n_m(2, 4)
# Few, short steps: the tiny models' weights (std 0.15) are ~7x a trained 7B model's, and the paper's
# 3e-7 would not move them measurably in the few steps a test can afford.
QUICK = {"iterations": 1, "ro_samples": 2, "ro_lr": 1e-3}


def session_on(model, ids) -> BlockSession:
    session = BlockSession(model, get_adapter(model), ids, progress=False)
    session.start_pass()
    return session


def regional_layer(grad: torch.Tensor) -> LayerInfo:
    return LayerInfo(role=ROLE_NORMED, regional_grad=grad)


# --- the score --------------------------------------------------------------------------------------

def test_rgs_hand_example_prefers_weights_the_block_output_depends_on():
    # One row of equal weights; activation norms 4, 3, 2, 1; regional gradients 0, 0, .03, .05.
    # α = 100: scores (0 + 4)·1, (0 + 3)·1, (3 + 2)·1, (5 + 1)·1 = 4, 3, 5, 6 → columns 1 and 0 go;
    # Wanda (α = 0) removes the two quietest inputs, columns 3 and 2, instead.
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    stats = LinearStats(4, frozenset({"sumsq"}), count=1, sumsq=torch.tensor([16.0, 9.0, 4.0, 1.0],
                                                                                dtype=torch.float64))
    grad = torch.tensor([[0.0, 0.0, 0.03, 0.05]])
    assert rgs_scores(w, grad, stats, 100.0)[0].tolist() == pytest.approx([4.0, 3.0, 5.0, 6.0])
    pruned = get_method("wanda++").prune(w, None, stats, HALF, layer=regional_layer(grad)).weight
    assert pruned.tolist() == [[0.0, 0.0, 1.0, -1.0]]
    wanda_like = get_method("wanda++", alpha=0.0).prune(w, None, stats, HALF, layer=regional_layer(grad)).weight
    assert wanda_like.tolist() == [[1.0, -1.0, 0.0, 0.0]]


def test_rgs_score_is_the_papers_formula_element_by_element():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 8, generator=gen)
    grad = torch.rand(6, 8, generator=gen) * 0.01
    x = correlated_inputs(50, 8, seed=5)
    scores = rgs_scores(w, grad, stats_for(get_method("wanda++"), x), 100.0)
    for i in range(6):
        for j in range(8):
            norm = sum(float(x[t, j]) ** 2 for t in range(50)) ** 0.5
            expected = (100.0 * float(grad[i, j]) + norm) * abs(float(w[i, j]))
            assert float(scores[i, j]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("target", [HALF, TWO_FOUR, SparsityTarget.unstructured(0.5, scope="layer")],
                         ids=["row", "2:4", "layer"])
def test_alpha_zero_is_wanda_exactly(target):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 32, generator=gen)
    stats = stats_for(get_method("wanda"), correlated_inputs(64, 32, seed=7))
    grad = torch.rand(16, 32, generator=gen)  # ignored with α = 0, whatever it is
    ours = get_method("wanda++", alpha=0.0).prune(w, None, stats, target, layer=regional_layer(grad)).weight
    assert torch.equal(ours, get_method("wanda").prune(w, None, stats, target).weight)


def test_a_lone_layer_without_regional_gradients_is_refused():
    w = torch.randn(4, 8)
    stats = stats_for(get_method("wanda++"), correlated_inputs(20, 8))
    with pytest.raises(SecateurError, match="regional gradients"):
        get_method("wanda++").prune(w, None, stats, HALF)
    with pytest.raises(SecateurError, match="shape"):
        get_method("wanda++").prune(w, None, stats, HALF, layer=regional_layer(torch.ones(8, 4)))


def test_options_have_the_papers_defaults_and_are_checked():
    method = get_method("wanda++")
    assert (method.alpha, method.iterations, method.ro_samples, method.ro_lr) == (100.0, 5, 32, 3e-7)
    assert {"alpha", "iterations", "ro_samples", "ro_lr", "refine"} <= method_option_names("wanda++")
    assert RegionalPlan.of(method) == RegionalPlan(rounds=5, samples=32, lr=3e-7)
    assert RegionalPlan.of(get_method("wanda")) is None
    assert RegionalPlan.of(get_method("wanda++", refine="dsnot")) == RegionalPlan(rounds=5, samples=32, lr=3e-7)
    for bad in ({"iterations": -1}, {"ro_samples": 0}, {"ro_lr": 0.0}, {"alpha": -1.0}, {"iterations": 1.5}):
        with pytest.raises(SecateurError):
            get_method("wanda++", **bad)


def test_fit_schedule_draws_distinct_windows_per_round_reproducibly():
    schedule = fit_schedule(10, 4, 3, seed=2)
    rounds = [schedule[i:i + 4] for i in range(0, 12, 4)]
    assert len(schedule) == 12 and all(len(set(r)) == 4 and set(r) <= set(range(10)) for r in rounds)
    assert fit_schedule(10, 4, 3, seed=2) == schedule != fit_schedule(10, 4, 3, seed=3)
    assert sorted(fit_schedule(3, 32, 1, seed=0)) == [0, 1, 2]  # more samples than windows: each once
    assert fit_schedule(10, 4, 0, seed=0) == []


# --- regional gradients ---------------------------------------------------------------------------

def _autograd_reference(model, ids, index: int) -> dict[str, torch.Tensor]:
    """sqrt(mean over windows of (∂‖block_index output‖₂/∂W)²) through the model's own forward
    (its own masks and rotary embeddings, no captured call), as (out, in) matrices."""
    adapter = get_adapter(model)
    block = adapter.blocks()[index]
    views = adapter.linears(block)
    weights = [view.module.weight for view in views.values()]
    squares = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    outputs = []
    handle = block.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        for window in ids:
            outputs.clear()
            with torch.enable_grad():
                model(input_ids=window.unsqueeze(0), use_cache=False)
                grads = torch.autograd.grad(outputs[0].norm(), weights)
            for total, grad in zip(squares, grads, strict=True):
                total += grad.double().square()
    finally:
        handle.remove()
    return {name: (total / len(ids)).sqrt().float().T if view.transposed else (total / len(ids)).sqrt().float()
            for (name, view), total in zip(views.items(), squares, strict=True)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regional_gradients_equal_autograd_through_the_model(arch):
    model = build_tiny_model(arch)
    ids = calibration_ids(model, nsamples=3, seqlen=16)
    expected = {index: _autograd_reference(model, ids, index) for index in (0, 1)}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    session = session_on(model, ids)
    for index in (0, 1):
        with session.block(index) as block:
            views = session.adapter.linears(block)
            got = regional_gradients(session, index, block, views)
            for name, view in views.items():
                assert got[name].shape == (view.out_features, view.in_features) and got[name].dtype == torch.float32
                torch.testing.assert_close(got[name], expected[index][name], rtol=1e-4, atol=1e-9)
                assert bool((got[name] > 0).any())
        session.advance(index)  # the next block's inputs, from the (dense) block
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


# --- regional optimisation ---------------------------------------------------------------------------

def _prune_block_by_magnitude(views) -> dict[str, torch.Tensor]:
    kept = {}
    for name, view in views.items():
        weight = view.get_weight().float()
        mask = prune_mask(weight.abs(), HALF)
        view.set_weight(weight.masked_fill(mask, 0.0))
        kept[name] = ~mask
    return kept


def _fit_block0(model, ids, lr: float, rounds: int = 2):
    session = session_on(model, ids)
    with session.block(0) as block:
        views = session.adapter.linears(block)
        positions = list(range(len(ids)))
        targets = block_outputs(session, 0, block, positions)
        kept = _prune_block_by_magnitude(views)
        pruned = {name: view.get_weight().clone() for name, view in views.items()}
        schedule = fit_schedule(len(ids), len(ids), rounds, seed=0)
        fit = regional_optimize(session, 0, block, views, positions, targets, kept, schedule, lr)
        after = block_outputs(session, 0, block, positions)
        error = sum(float((a - t).double().square().sum()) for a, t in zip(after, targets, strict=True))
        weights = {name: view.get_weight().clone() for name, view in views.items()}
    return fit, error, kept, pruned, weights


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_regional_optimization_lowers_the_block_error_and_keeps_the_mask(arch):
    dense = build_tiny_model(arch)
    ids = calibration_ids(dense, nsamples=3, seqlen=16)
    model = copy.deepcopy(dense)
    fit, error, kept, pruned, weights = _fit_block0(model, ids, lr=1e-3)
    assert not fit.reverted and fit.steps == 6
    assert fit.error_after < fit.error_before
    assert error == pytest.approx(fit.error_after, rel=1e-6)  # the error it reports is the block's
    for name, weight in weights.items():
        assert torch.equal(weight != 0, kept[name]), name  # zeros stay zero, kept weights stay (sparsity exact)
        assert not torch.equal(weight, pruned[name]), name  # and the kept ones did move
    # Deterministic: the same fit from the same start gives the same bits.
    _, _, _, _, again = _fit_block0(copy.deepcopy(dense), ids, lr=1e-3)
    assert all(torch.equal(again[name], weights[name]) for name in weights)
    assert_untouched(dense, model)  # norms and embeddings are not fitted


def test_a_fit_that_raises_the_error_is_undone():
    model = build_tiny_model("llama")
    ids = calibration_ids(model, nsamples=3, seqlen=16)
    fit, error, _, pruned, weights = _fit_block0(model, ids, lr=10.0, rounds=1)  # steps of ~100 per weight
    assert fit.reverted and not fit.error_after <= fit.error_before
    assert all(torch.equal(weights[name], pruned[name]) for name in weights)
    assert error == pytest.approx(fit.error_before, rel=1e-6)


# --- whole models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_tiny_models_reach_the_target_sparsity(arch, pattern):
    dense = build_tiny_model(arch)
    model = copy.deepcopy(dense)
    ids = calibration_ids(model, nsamples=2, seqlen=16)
    recipe = Recipe(method="wanda++", sparsity=0.5, sparsity_type=pattern, method_options=QUICK)
    _, report = secateur.prune(model, recipe, ids, progress=False)
    assert report.sparsity_achieved == pytest.approx(0.5)
    for name, weight in targeted_weights(model).items():
        zeros = weight == 0
        if pattern == "2:4":
            assert (zeros.reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert (zeros.sum(1) == weight.shape[1] // 2).all(), name
    assert report.timings_s["regional_gradients"] > 0 and report.timings_s["regional_optimization"] > 0
    assert_untouched(dense, model)


def test_refine_dsnot_runs_on_wanda_pp_masks():
    model = build_tiny_model("llama")
    ids = calibration_ids(model, nsamples=2, seqlen=16)
    recipe = Recipe(method="wanda++", sparsity=0.5, method_options={**QUICK, "refine": "dsnot"})
    _, report = secateur.prune(model, recipe, ids, progress=False)
    assert report.sparsity_achieved == pytest.approx(0.5)


def test_ignored_layers_and_blocks_stay_dense():
    dense = build_tiny_model("llama")
    model = copy.deepcopy(dense)
    ids = calibration_ids(model, nsamples=2, seqlen=16)
    recipe = Recipe(method="wanda++", sparsity=0.5, ignore=("blocks.0.*", "*.mlp.down_proj"), method_options=QUICK)
    secateur.prune(model, recipe, ids, progress=False)
    before, after = targeted_weights(dense), targeted_weights(model)
    for name, weight in after.items():
        ignored = name.startswith("0.") or name.endswith("down_proj")
        assert torch.equal(weight, before[name]) == ignored, name


def test_wanda_pp_reconstructs_the_dense_model_better_than_wanda():
    """Same sparsity, same calibration windows: the last hidden states of Wanda++ (RGS + RO) must be
    closer to the dense model's than Wanda's, and closer than RGS alone."""
    dense = build_tiny_model("llama")
    ids = calibration_ids(dense, nsamples=4, seqlen=16)
    errors = {}
    with torch.no_grad():
        reference = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    for label, method, options in [("wanda", "wanda", {}), ("rgs", "wanda++", {"iterations": 0}),
                                   ("wanda++", "wanda++", {"iterations": 2, "ro_samples": 4, "ro_lr": 1e-3})]:
        model = copy.deepcopy(dense)
        secateur.prune(model, Recipe(method=method, sparsity=0.5, method_options=options), ids, progress=False)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        errors[label] = float((hidden - reference).square().mean())
    assert errors["wanda++"] < errors["wanda"] and errors["wanda++"] < errors["rgs"], errors


def test_a_run_killed_after_a_block_resumes_to_the_same_weights(tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    ids = calibration_ids(build_tiny_model("llama"), nsamples=2, seqlen=16)
    recipe = {"method": "wanda++", "sparsity": 0.5, "method_options": QUICK}
    uninterrupted = build_tiny_model("llama")
    _, expected = secateur.prune(uninterrupted, recipe, ids, progress=False)

    def die():
        raise Killed()

    monkeypatch.setattr(workdir, "_kill_self", die)
    monkeypatch.setenv(workdir.KILL_AFTER_STEP, "prune/0")
    settings = {"case": "wanda++"}
    work = WorkDir.open(tmp_path / "work", settings, resume=False)
    with pytest.raises(Killed):
        secateur.prune(build_tiny_model("llama"), recipe, ids, progress=False, work_dir=work)
    work.close()
    monkeypatch.delenv(workdir.KILL_AFTER_STEP)
    work = WorkDir.open(tmp_path / "work", settings, resume=True)
    assert work.resumed_steps == 1
    resumed = build_tiny_model("llama")
    _, report = secateur.prune(resumed, recipe, ids, progress=False, work_dir=work)
    work.discard()
    left, right = resumed.state_dict(), uninterrupted.state_dict()
    assert all(torch.equal(left[name], right[name]) for name in right)
    assert report.layers == expected.layers


def test_two_processes_save_the_checkpoint_of_one(tmp_path):
    """Under torchrun the gradients are summed over the ranks' windows and rank 0 fits the block
    on every rank's windows: the checkpoint is one process's."""
    inputs = tiny_model_and_text(tmp_path / "inputs")
    recipe = ["--method", "wanda++", "--sparsity", "0.5", "--method-option", "iterations=1",
              "--method-option", "ro_samples=3", "--method-option", "ro_lr=0.001"]
    _one_process(_args(inputs, tmp_path / "one", recipe))
    torchrun(2, ["-m", "secateur", *_args(inputs, tmp_path / "two", recipe)], 240)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(one) == sorted(two)
    for name, expected in one.items():
        assert torch.equal(two[name] == 0, expected == 0), f"{name}: the masks differ"
        difference = float((two[name].double() - expected.double()).norm())
        assert difference <= 1e-6 * float(expected.double().norm()), f"{name}: differs by {difference}"
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2


def test_a_streamed_prune_saves_what_the_in_memory_prune_saves(tmp_path):
    """`prune --stream`: gradients, fit and advance all happen while the session holds the block,
    so one block in memory at a time gives the in-memory checkpoint, bit for bit."""
    recipe = {"method": "wanda++", "sparsity": 0.5, "method_options": QUICK}
    left, right, expected, report = prune_tiny_both("llama", recipe, tmp_path)
    assert left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)
    assert report.layers == expected.layers
