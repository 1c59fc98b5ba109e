"""Every checkpoint secateur saves carries a model card (README.md) in the Hub's format."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_and_text
from huggingface_hub import ModelCard
from tiny_models import build_tiny_model, tiny_tokenizer

import secateur
from secateur.cli import main
from secateur.export import save_checkpoint
from secateur.model_card import render_model_card
from secateur.models.loading import base_model_name
from secateur.recipe import Recipe


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tiny_model_and_text(tmp_path_factory.mktemp("cards"))


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_cli_checkpoint_has_a_card_with_metadata_recipe_command_and_results(method, pattern, world, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(world)
    out = f"ck-{method}"
    argv = ["prune", "--model", "model", "--method", method, "--sparsity-type", pattern, "--calib", "calib.txt",
            "--nsamples", "4", "--seqlen", "32", "--eval", "calib.txt", "--max-windows", "2", "--quiet",
            "--out", out]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((world / out / "results.json").read_text())
    card = ModelCard.load(world / out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == str(world / "model")  # a local model stays a path
    assert data["library_name"] == "transformers"
    assert {"pruned", "secateur", method, pattern} <= set(data["tags"])
    (entry,) = data["model-index"][0]["results"]
    assert entry["dataset"]["name"] == "calib.txt"
    (metric,) = entry["metrics"]
    assert metric["type"] == "perplexity" and metric["value"] == pytest.approx(results["perplexity"]["pruned"]
                                                                               ["calib.txt"], abs=1e-3)
    assert metric["args"]["seqlen"] == 32 and metric["args"]["windows_used"] == 2
    text = card.text
    assert shlex.join(["secateur", *argv]) in text  # the exact command line
    assert (world / out / "recipe.yaml").read_text().strip() in text
    assert f"{results['sparsity_achieved']:.2%}" in text
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in text and "trust_remote_code" not in text
    assert f"lm_eval --model hf --model_args pretrained={out} --tasks" in text
    assert f"secateur {secateur.__version__}" in text
    manifest = json.loads((world / out / ".secateur-manifest.json").read_text())
    assert "README.md" in manifest["files"]  # --overwrite may replace it later, like every file secateur wrote
    # Unstructured and N:M checkpoints stay dense tensors with zeros, not a compressed-tensors format.
    config = json.loads((world / out / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config
    assert "per_layer_config" not in config and "auto_map" not in config


def test_structured_uneven_checkpoint_card_says_how_to_load_it(tmp_path):
    model = build_tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method="flap", sparsity=0.6)
    _, report = secateur.prune(model, recipe, ids, progress=False)
    results = {"model": "smollm2-135m (SmolLM2-135M-Instruct.Q4_1.gguf)", "method": "flap",
               "sparsity_type": "unstructured", "sparsity_target": 0.6, "sparsity_achieved": 0.6,
               "structure": report.structure, "recipe": recipe.to_dict()}
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "flap", recipe_yaml=recipe.to_yaml(), results=results,
                          overwrite=False)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias, resolved
    assert {"pruned", "secateur", "flap", "structured"} <= set(data["tags"]) and "unstructured" not in data["tags"]
    assert "model-index" not in data  # nothing was evaluated
    text = card.text
    structure = report.structure
    assert f"{structure['params_before']:,} → {structure['params_after']:,}" in text
    for index, shape in enumerate(structure["blocks"]):
        assert f"| {index} | {shape['ffn_width']} | {shape['num_heads']} | {shape['num_kv_heads']} |" in text
    location = str(tmp_path / "flap")
    assert f'AutoModelForCausalLM.from_pretrained("{location}", trust_remote_code=True)' in text
    assert f'secateur.load("{location}")' in text and "per_layer_config" in text
    assert f"--model_args pretrained={location},trust_remote_code=True" in text
    assert "Saved through secateur's Python API" in text


def test_zero_shot_results_go_to_the_model_index():
    results = {"model": "hub:Qwen/Qwen3-0.6B", "method": "wanda", "sparsity_type": "2:4",
               "zero_shot": {"dense": {"tasks": {"piqa": {"acc": 0.7}}, "mean_acc": 0.7},
                             "pruned": {"tasks": {"piqa": {"acc": 0.61, "acc_norm": 0.63, "lm_eval_task": "piqa",
                                                           "split": "validation"}},
                                        "mean_acc": 0.61, "protocol": {"harness": "lm-eval 0.4.13",
                                                                       "num_fewshot": 0, "limit": 50}}}}
    card = ModelCard(render_model_card(results, "method: wanda\n", location="runs/x", command="secateur prune",
                                       remote_code=False, per_layer_config=False))
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen3-0.6B"
    metrics = {m["type"]: m for entry in data["model-index"][0]["results"] for m in entry["metrics"]}
    assert metrics["acc"]["value"] == 0.61 and metrics["acc_norm"]["value"] == 0.63
    assert metrics["acc"]["args"]["limit"] == 50
    assert "--tasks piqa " in card.text and "| pruned | 0.6100 | 0.6100 |" in card.text


def test_a_card_needs_no_results():
    card = ModelCard(render_model_card({}, "method: magnitude\n", location="out", command=None, remote_code=False,
                                       per_layer_config=False))
    assert card.data.to_dict()["tags"] == ["pruned", "secateur", "unstructured"]
    assert "base_model" not in card.data.to_dict()


@pytest.mark.parametrize(("source", "name"), [
    ("smollm2-135m (SmolLM2-135M-Instruct.Q4_1.gguf)", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("gemma3-270m (gemma-3-270m-q4_k_m.gguf)", "google/gemma-3-270m"),
    ("hub:Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
    ("/data/models/my-llama", "/data/models/my-llama"),
])
def test_base_model_names(source, name):
    assert base_model_name(source) == name
