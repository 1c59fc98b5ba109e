"""`block_fit=K` on any per-layer method: the pruned block's kept weights fitted to the dense block."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from test_engine import assert_untouched, calibration_ids, targeted_weights
from test_methods import correlated_inputs, stats_for
from tiny_models import build_tiny_model

import secateur
from secateur.engine.regional import RegionalPlan
from secateur.errors import SecateurError
from secateur.methods import SparsityTarget, get_method, method_option_names
from secateur.methods.base import BLOCK_FIT_DEFAULTS, BlockFitMethod, LayerInfo, prune_layer
from secateur.recipe import Recipe
from secateur.roles import ROLE_NORMED

# The tiny models' weights (std 0.15) are far larger than a trained model's: a larger step moves them.
# (1e-3 overshoots on Qwen3 at 2:4: the fit is undone there.)
QUICK = {"block_fit": 2, "block_fit_windows": 2, "block_fit_lr": 3e-4}


def test_options_wrap_the_method_and_are_checked():
    method = get_method("sparsegpt", block_fit=3)
    assert isinstance(method, BlockFitMethod) and method.name == "sparsegpt"
    assert (method.rounds, method.windows, method.lr) == (3, BLOCK_FIT_DEFAULTS["block_fit_windows"],
                                                          BLOCK_FIT_DEFAULTS["block_fit_lr"])
    plan = RegionalPlan.of(method)
    assert plan == RegionalPlan(rounds=3, samples=method.windows, lr=method.lr, gradients=False,
                                lr_option="block_fit_lr")
    assert RegionalPlan.of(get_method("wanda++")).gradients  # Wanda++ keeps its regional gradients
    assert not isinstance(get_method("sparsegpt", block_fit=0), BlockFitMethod)
    assert isinstance(get_method("ria", refine="dsnot", block_fit=1).method.refiner, str)  # fit around refine
    for name in ("magnitude", "wanda", "alps", "ria", "stade", "dsnot"):
        assert {"block_fit", "block_fit_lr", "block_fit_windows"} <= method_option_names(name)
    assert "block_fit" not in method_option_names("putri")  # structured methods refit their own way


@pytest.mark.parametrize("options", [
    {"block_fit": -1}, {"block_fit": True}, {"block_fit": 1.5}, {"block_fit": 1, "block_fit_lr": 0},
    {"block_fit": 1, "block_fit_lr": float("nan")}, {"block_fit": 1, "block_fit_lr": float("inf")},
    {"block_fit": 1, "block_fit_windows": 0}, {"block_fit_lr": 1e-4}, {"block_fit_windows": 4},
])
def test_bad_block_fit_options_are_refused_in_one_message(options):
    with pytest.raises(SecateurError, match="block_fit"):
        get_method("sparsegpt", **options)


def test_wanda_pp_has_its_own_fit():
    with pytest.raises(SecateurError, match="fits its blocks itself"):
        get_method("wanda++", block_fit=1)


def test_each_layer_is_pruned_exactly_as_by_the_method_alone():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    stats = stats_for(get_method("sparsegpt"), correlated_inputs(256, 32))
    target = SparsityTarget.n_m(2, 4)
    layer = LayerInfo(role=ROLE_NORMED)
    alone = prune_layer(get_method("sparsegpt"), weight, None, stats, target, layer)
    wrapped = prune_layer(get_method("sparsegpt", block_fit=2), weight, None, stats, target, layer)
    assert torch.equal(alone.weight, wrapped.weight)


def test_trim_may_rank_by_the_inner_methods_first_scores():
    assert hasattr(get_method("alps", block_fit=1), "trim_scores")
    assert not hasattr(get_method("sparsegpt", block_fit=1), "trim_scores")  # SparseGPT offers none


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_tiny_models_keep_the_methods_mask_and_change_the_kept_weights(arch, pattern):
    """Block 0 sees the same inputs with and without the fit, so it gets SparseGPT's mask either
    way; the fit moves its kept weights and never a pruned one."""
    dense = build_tiny_model(arch)
    ids = calibration_ids(dense, nsamples=2, seqlen=16)
    pruned = {}
    for label, options in (("alone", {}), ("fit", QUICK)):
        model = copy.deepcopy(dense)
        recipe = Recipe(method="sparsegpt", sparsity=0.5, sparsity_type=pattern, method_options=options)
        _, report = secateur.prune(model, recipe, ids, progress=False)
        assert report.sparsity_achieved == pytest.approx(0.5)
        pruned[label] = targeted_weights(model)
        if label == "fit":
            assert not report.warnings  # no fit undone
            assert report.timings_s["regional_optimization"] > 0
            assert "regional_gradients" not in report.timings_s  # the fit alone: no gradient pass
            assert_untouched(dense, model)
    block0 = [name for name in pruned["alone"] if name.startswith("0.")]
    assert block0
    moved = 0
    for name in block0:
        alone, fit = pruned["alone"][name], pruned["fit"][name]
        assert torch.equal(alone == 0, fit == 0), name
        moved += int(not torch.equal(alone, fit))
    assert moved == len(block0)


def test_the_fit_brings_the_model_closer_to_the_dense_one():
    """Same mask method, same windows: the last hidden states with the block fit are closer to the
    dense model's than SparseGPT's alone (its layer-wise update does not see the block's output)."""
    dense = build_tiny_model("llama")
    ids = calibration_ids(dense, nsamples=4, seqlen=16)
    with torch.no_grad():
        reference = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for label, options in (("alone", {}), ("fit", {"block_fit": 2, "block_fit_windows": 4, "block_fit_lr": 1e-3})):
        model = copy.deepcopy(dense)
        secateur.prune(model, Recipe(method="sparsegpt", sparsity=0.7, method_options=options), ids, progress=False)
        with torch.no_grad():
            errors[label] = float((model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
                                   - reference).square().mean())
    assert errors["fit"] < errors["alone"], errors


def test_an_undone_fit_names_the_option_to_lower():
    """Too large a step (1e-3 on tiny Qwen3 at 2:4) raises the block's error: the fit is undone,
    the block keeps SparseGPT's weights, and the warning names block_fit_lr (not Wanda++'s ro_lr)."""
    dense = build_tiny_model("qwen3")
    ids = calibration_ids(dense, nsamples=2, seqlen=16)
    alone, fit = copy.deepcopy(dense), copy.deepcopy(dense)
    secateur.prune(alone, Recipe(method="sparsegpt", sparsity=0.5, sparsity_type="2:4"), ids, progress=False)
    options = {"block_fit": 2, "block_fit_windows": 2, "block_fit_lr": 1e-3}
    _, report = secateur.prune(fit, Recipe(method="sparsegpt", sparsity=0.5, sparsity_type="2:4",
                                           method_options=options), ids, progress=False)
    assert report.warnings and all("lower block_fit_lr" in warning for warning in report.warnings)
    assert any(w.startswith("block 0:") for w in report.warnings)
    block0 = {name: w for name, w in targeted_weights(alone).items() if name.startswith("0.")}
    fitted = targeted_weights(fit)
    assert all(torch.equal(weight, fitted[name]) for name, weight in block0.items())


def test_the_cli_takes_block_fit_and_records_it(tmp_path, capsys):
    from test_cli import prune_args, run_cli
    from tiny_models import save_tiny

    model_dir = save_tiny("llama", tmp_path / "tiny-llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, *prune_args(model_dir, calib, "--method", "sparsegpt", "--method-option",
                                               "block_fit=1", "--method-option", "block_fit_lr=3e-4", "--out", out))
    assert code == 0, err
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method_options"] == {"block_fit": 1, "block_fit_lr": 3e-4}
    results = json.loads((out / "results.json").read_text())
    assert results["timings_s"]["regional_optimization"] > 0


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1E5", 1e5), ("-2.5e-3", -2.5e-3), ("3.0e-7", 3e-7),
                                         ("12", 12), ("e5", "e5"), ("3e", "3e"), ("'3e-4'", "3e-4")])
def test_recipes_read_exponent_numbers_as_numbers(text, value):
    """PyYAML (YAML 1.1) reads 3e-4 as a string; learning rates are written that way."""
    from secateur.recipe import load_yaml

    loaded = load_yaml(f"lr: {text}")["lr"]
    assert loaded == value and type(loaded) is type(value)


def test_a_streamed_prune_with_block_fit_saves_what_the_in_memory_prune_saves(tmp_path):
    """`prune --stream` with the fit: one block in memory at a time gives the in-memory checkpoint."""
    from test_stream_prune import prune_tiny_both

    recipe = {"method": "sparsegpt", "sparsity": 0.5, "method_options": QUICK}
    left, right, _, report = prune_tiny_both("llama", recipe, tmp_path)
    assert left.keys() == right.keys()
    assert all(torch.allclose(left[name], right[name], atol=1e-6, rtol=0) for name in left)
    assert report.timings_s["regional_optimization"] > 0
