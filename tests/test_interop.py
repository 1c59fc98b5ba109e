"""llm-compressor recipes in and out: the field-by-field mapping, the exact round trip, and a
table of refusals that each exit 2 with one line naming the field, on a tiny model."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SAMPLE_TEXT
from tiny_models import build_tiny_model, save_tiny

import secateur
from secateur.cli import main
from secateur.errors import SecateurError
from secateur.interop import EXPORT_HEADER, BlockLayout, check_exportable, to_llm_compressor
from secateur.recipe import Recipe, load_yaml

# The shape of llm-compressor's documented examples (SparseGPTModifier's docstring; the OWL fields
# of SparsityModifierBase).
SPARSEGPT_24 = """\
oneshot_stage:
  obcq_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      dampening_frac: 0.001
      block_size: 128
      targets: ['Linear']
      ignore: ['re:.*lm_head']
"""
WANDA_OWL = """\
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier:
      sparsity: 0.5
      sparsity_profile: owl
      owl_m: 5
      owl_lmbda: 0.08
      mask_structure: "0:0"
      targets: ['Linear']
      ignore: ['re:.*lm_head']
"""


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sparsegpt_2_4_example_maps_field_by_field(tmp_path):
    recipe = Recipe.from_yaml(_write(tmp_path, SPARSEGPT_24))
    assert (recipe.method, recipe.sparsity, recipe.sparsity_type, recipe.allocation) == \
        ("sparsegpt", 0.5, "2:4", "uniform")
    assert recipe.method_options == {"blocksize": 128, "damp": 0.001}  # N:M: no mask scope
    assert recipe.ignore == ()  # the LM head is never pruned by secateur


def test_wanda_owl_example_maps_to_owl_allocation(tmp_path):
    recipe = Recipe.from_yaml(_write(tmp_path, WANDA_OWL))
    assert (recipe.method, recipe.sparsity, recipe.sparsity_type) == ("wanda", 0.5, "unstructured")
    assert (recipe.allocation, recipe.owl_threshold, recipe.owl_lambda) == ("owl", 5.0, 0.08)
    assert recipe.method_options == {}


def test_unstructured_sparsegpt_takes_llm_compressors_block_mask():
    recipe = Recipe.from_dict({"s_stage": {"m_modifiers": {"SparseGPTModifier": {
        "sparsity": 0.6, "ignore": ["lm_head"], "sequential_update": True, "offload_hessians": True}}}})
    assert recipe.sparsity_type == "unstructured" and recipe.method_options == {"mask_scope": "block"}


def test_decoder_layer_targets_need_no_lm_head_ignore():
    recipe = Recipe.from_dict({"test_stage": {"obcq_modifiers": {"SparseGPTModifier": {
        "sparsity": 0.5, "mask_structure": "2:4", "targets": [r"re:model.layers.\d*$"]}}}})
    assert recipe.sparsity_type == "2:4"


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")


@pytest.mark.parametrize("pattern", [
    r"re:model.layers.0.*", r"re:.*mlp\.down_proj$", r"re:.*down_proj", r"re:model\.layers\.1[0-2]\..*",
    r"re:^model\.layers\.\d+\.self_attn\.[qk]_proj$", r"re:.*\.[o]_proj$",
    "model.layers.3.self_attn.q_proj", r"re:model.layers.[^0-4]\..*",
])
def test_ignore_patterns_select_the_same_linears(pattern):
    """Each translated glob keeps exactly the linears that llm-compressor's re.match would skip."""
    recipe = Recipe.from_dict({"s_stage": {"m_modifiers": {"WandaPruningModifier": {
        "sparsity": 0.5, "ignore": ["re:.*lm_head", pattern]}}}})
    (glob,) = recipe.ignore
    regex = pattern[3:] if pattern.startswith("re:") else re.escape(pattern) + "$"
    for index in range(16):
        for linear in LLAMA_LINEARS:
            theirs = bool(re.match(regex, f"model.layers.{index}.{linear}"))
            ours = fnmatch.fnmatchcase(f"blocks.{index}.{linear}", glob)
            assert theirs == ours, (pattern, glob, index, linear)


def test_magnitude_targets_become_the_kinds_kept_dense():
    kinds = [k for k in LLAMA_LINEARS if k != "mlp.down_proj"]
    recipe = Recipe.from_dict({"pruning_stage": {"pruning_modifiers": {"MagnitudePruningModifier": {
        "init_sparsity": 0.4, "final_sparsity": 0.4, "start": 0, "mask_structure": "unstructured",
        "targets": [f"re:.*{k}.weight" for k in kinds]}}}})
    assert (recipe.method, recipe.sparsity, recipe.ignore) == ("magnitude", 0.4, ("*.mlp.down_proj",))


@pytest.fixture(scope="module")
def llama_layout() -> BlockLayout:
    layout = BlockLayout.of(build_tiny_model("llama"))
    assert layout.path == "model.layers" and layout.linears == LLAMA_LINEARS
    return layout


ROUND_TRIP = [
    Recipe(method="sparsegpt", sparsity_type="2:4", method_options={"blocksize": 64, "damp": 0.02},
           ignore=("*.mlp.down_proj", "blocks.0.*", "blocks.[12].self_attn.?_proj")),
    Recipe(method="sparsegpt", sparsity=0.6, method_options={"mask_scope": "block"}),
    Recipe(method="wanda", sparsity=0.55, allocation="owl", owl_threshold=7, owl_lambda=0.05, calib="c4",
           nsamples=64, seqlen=512, seed=3),
    Recipe(method="wanda", sparsity_type="4:8", ignore=("blocks.1.*",)),
    Recipe(method="magnitude", sparsity=0.3),
    Recipe(method="magnitude", sparsity=0.7, ignore=("*.self_attn.v_proj", "*.mlp.down_proj")),  # block order
]


@pytest.mark.parametrize("index", range(len(ROUND_TRIP)))
def test_round_trip_gives_an_equal_recipe(index, llama_layout):
    recipe = ROUND_TRIP[index]
    text = to_llm_compressor(recipe, llama_layout)
    assert text.startswith(EXPORT_HEADER)
    data = load_yaml(text)
    (modifier,) = data["sparsity_stage"]["sparsity_modifiers"]
    assert modifier == {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier",
                        "magnitude": "MagnitudePruningModifier"}[recipe.method]
    assert Recipe.from_dict(data) == recipe


def test_exported_fields_are_llm_compressors(llama_layout):
    recipe = Recipe(method="sparsegpt", sparsity_type="2:4", method_options={"blocksize": 64},
                    ignore=("blocks.0.*",))
    fields = load_yaml(to_llm_compressor(recipe, llama_layout))["sparsity_stage"]["sparsity_modifiers"][
        "SparseGPTModifier"]
    assert fields == {"sparsity": 0.5, "mask_structure": "2:4", "block_size": 64, "targets": ["Linear"],
                      "ignore": ["re:.*lm_head", r"re:model\.layers\.0\..*$"]}
    owl = Recipe(method="wanda", allocation="owl")
    fields = load_yaml(to_llm_compressor(owl, llama_layout))["sparsity_stage"]["sparsity_modifiers"][
        "WandaPruningModifier"]
    assert (fields["sparsity_profile"], fields["owl_m"], fields["owl_lmbda"], fields["mask_structure"]) == \
        ("owl", 5, 0.08, "0:0")


@pytest.mark.parametrize(("recipe", "phrase"), [
    (Recipe(method="putri", sparsity=0.2), "no putri"),
    (Recipe(method="flap", sparsity=0.2), "no flap"),
    (Recipe(method="stade"), "no stade"),
    (Recipe(method="wanda-sp", sparsity=0.2), "no wanda-sp"),
    (Recipe(method="block-drop", sparsity=0.2), "no block-drop"),
    (Recipe(method="sparsegpt"), "mask_scope=row"),
    (Recipe(method="magnitude", sparsity_type="2:4"), "unstructured masks only"),
    (Recipe(method="magnitude", method_options={"scope": "row"}), "scope"),
    (Recipe(method="wanda", allocation="owl", owl_threshold=5.5), "owl_threshold"),
    (Recipe(method="wanda", ignore=("b*",)), "ignore pattern"),
])
def test_export_refusals(recipe, phrase):
    with pytest.raises(SecateurError, match=re.escape(phrase)):
        check_exportable(recipe)


def test_prune_api_takes_an_llm_compressor_recipe(tmp_path):
    model = build_tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = {"s_stage": {"m_modifiers": {"WandaPruningModifier": {"sparsity": 0.5, "mask_structure": "2:4",
                                                                   "ignore": ["re:.*lm_head",
                                                                              r"re:.*down_proj$"]}}}}
    secateur.prune(model, recipe, ids, progress=False)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q.view(q.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # 2:4 in every group
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()  # ignored: dense
    model = build_tiny_model("llama")
    secateur.prune(model, _write(tmp_path, WANDA_OWL), ids, progress=False)
    assert (model.model.layers[0].self_attn.q_proj.weight == 0).float().mean() > 0.3


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interop")
    save_tiny("llama", root / "model")
    (root / "calib.txt").write_text(SAMPLE_TEXT * 40)
    (root / "foreign.yaml").write_text("my notes\n")
    recipes = {
        "sgpt24": SPARSEGPT_24, "wanda-owl": WANDA_OWL,
        "gptq": "s_stage:\n  q_modifiers:\n    GPTQModifier: {scheme: W4A16, targets: Linear}\n",
        "two": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head]}\n"
               "t_stage:\n  m_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, ignore: [lm_head]}\n",
        "targets-attn": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, targets: ['re:.*self_attn.*']}\n",
        "no-lm-head": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, targets: [Linear]}\n",
        "unknown-key": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head], foo: 1}\n",
        "sparsity-list": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: [0.5, 0.6], ignore: [lm_head]}\n",
        "preserve": "s_stage:\n  m_modifiers:\n    SparseGPTModifier: {sparsity: 0.5, ignore: [lm_head], "
                    "preserve_sparsity_mask: true}\n",
        "owl-partial": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head], "
                       "sparsity_profile: owl}\n",
        "unquoted-nm": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head], "
                       "mask_structure: 2:4}\n",
        "alternation": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, "
                       "ignore: [lm_head, 're:.*(q|k)_proj']}\n",
        "magnitude-gradual": "s_stage:\n  m_modifiers:\n    MagnitudePruningModifier: {init_sparsity: 0.1, "
                             "final_sparsity: 0.5, targets: ['re:.*q_proj.weight']}\n",
        "magnitude-global": "s_stage:\n  m_modifiers:\n    MagnitudePruningModifier: {init_sparsity: 0.5, "
                            "final_sparsity: 0.5, apply_globally: true, targets: ['re:.*q_proj.weight']}\n",
        "magnitude-norms": "s_stage:\n  m_modifiers:\n    MagnitudePruningModifier: {init_sparsity: 0.5, "
                           "final_sparsity: 0.5, targets: ['re:.*weight']}\n",
        "top-level": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head]}\n"
                     "dataset: open_platypus\n",
        "wanda-blocksize": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, ignore: [lm_head], "
                           "block_size: 128}\n",
        "ignore-outside": "s_stage:\n  m_modifiers:\n    WandaPruningModifier: {sparsity: 0.5, "
                          "ignore: [lm_head, model.embed_tokens]}\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


PRUNE = ["prune", "--model", "model", "--calib", "calib.txt", "--nsamples", "4", "--seqlen", "32", "--quiet"]
EXPORT = ["--export-recipe", "llm-compressor"]

# name: (argv, a phrase the one line must contain: the field it refuses)
REFUSALS = {
    "another modifier": ([*PRUNE, "--recipe", "gptq.yaml"], "GPTQModifier"),
    "two modifiers": ([*PRUNE, "--recipe", "two.yaml"], "exactly one pruning modifier"),
    "targets other than linear": ([*PRUNE, "--recipe", "targets-attn.yaml"], ".targets"),
    "linear targets with lm head pruned": ([*PRUNE, "--recipe", "no-lm-head.yaml"], "lm_head"),
    "unknown key": ([*PRUNE, "--recipe", "unknown-key.yaml"], "WandaPruningModifier.foo"),
    "per-layer sparsity list": ([*PRUNE, "--recipe", "sparsity-list.yaml"], ".sparsity"),
    "preserve sparsity mask": ([*PRUNE, "--recipe", "preserve.yaml"], ".preserve_sparsity_mask"),
    "owl without its numbers": ([*PRUNE, "--recipe", "owl-partial.yaml"], ".sparsity_profile"),
    "unquoted mask structure": ([*PRUNE, "--recipe", "unquoted-nm.yaml"], ".mask_structure"),
    "regex alternation": ([*PRUNE, "--recipe", "alternation.yaml"], ".ignore"),
    "gradual magnitude": ([*PRUNE, "--recipe", "magnitude-gradual.yaml"], ".init_sparsity"),
    "global magnitude": ([*PRUNE, "--recipe", "magnitude-global.yaml"], ".apply_globally"),
    "magnitude of norms": ([*PRUNE, "--recipe", "magnitude-norms.yaml"], ".targets"),
    "unknown top-level key": ([*PRUNE, "--recipe", "top-level.yaml"], "'dataset'"),
    "sparsegpt field on wanda": ([*PRUNE, "--recipe", "wanda-blocksize.yaml"], ".block_size"),
    "ignore outside the blocks": ([*PRUNE, "--recipe", "ignore-outside.yaml"], "model.embed_tokens"),
    "export putri": ([*PRUNE, "--method", "putri", "--sparsity", "0.2", *EXPORT, "r.yaml"], "no putri"),
    "export flap": ([*PRUNE, "--method", "flap", "--sparsity", "0.2", *EXPORT, "r.yaml"], "no flap"),
    "export stade": ([*PRUNE, "--method", "stade", *EXPORT, "r.yaml"], "no stade"),
    "export default sparsegpt": ([*PRUNE, "--method", "sparsegpt", *EXPORT, "r.yaml"], "mask_scope"),
    "export unknown format": ([*PRUNE, "--export-recipe", "onnx", "r.yaml"], "unknown format 'onnx'"),
    "export over the recipe": ([*PRUNE, "--recipe", "sgpt24.yaml", *EXPORT, "sgpt24.yaml"], "is the recipe"),
    "export over a foreign file": ([*PRUNE, *EXPORT, "foreign.yaml"], "not written by secateur"),
    "export inside out": ([*PRUNE, "--out", "ck", *EXPORT, "ck/r.yaml"], "inside --out"),
    "export is the json": ([*PRUNE, "--json", "r.json", *EXPORT, "r.json"], "also the --json"),
    "export block ignore for magnitude": ([*PRUNE, "--method", "magnitude", "--ignore", "blocks.0.*", *EXPORT,
                                           "r.yaml"], "some blocks only"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_is_one_line_exit_2_and_writes_nothing(case, world, monkeypatch, capsys):
    argv, phrase = REFUSALS[case]
    monkeypatch.chdir(world)
    before = _snapshot(world)
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("secateur: error:"), lines
    assert phrase in lines[0], lines[0]
    assert _snapshot(world) == before
    print(lines[0])  # shown with pytest -rP: the messages are meant to be read


def test_cli_prunes_with_an_llm_compressor_recipe_and_exports_it_back(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(world)
    out, exported = tmp_path / "ck", tmp_path / "back.yaml"
    assert main([*PRUNE, "--recipe", "sgpt24.yaml", "--out", str(out), *EXPORT, str(exported)]) == 0, \
        capsys.readouterr().err
    recipe = Recipe.from_dict(json.loads((out / "results.json").read_text())["recipe"])
    assert (recipe.method, recipe.sparsity_type, recipe.method_options) == \
        ("sparsegpt", "2:4", {"blocksize": 128, "damp": 0.001})
    assert Recipe.from_yaml(exported) == recipe  # the exported file reads back as the recipe that ran
    again = yaml.safe_load(exported.read_text())["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert again["ignore"] == ["re:.*lm_head"] and again["mask_structure"] == "2:4"
    # A file secateur exported may be replaced by the next export.
    before = exported.read_text()
    assert main([*PRUNE, "--recipe", "wanda-owl.yaml", *EXPORT, str(exported)]) == 0
    assert exported.read_text() != before and "WandaPruningModifier" in exported.read_text()
    assert sorted(os.listdir(tmp_path)) == ["back.yaml", "ck"]  # no staging file left beside it
