"""STADE's split variant, `layers=out` (issue 10, bug 6): STADE's score and bias compensation on
the layers that write into the residual stream (o_proj/down_proj and their kin), exactly
Wanda on the layers fed by a normalisation, which get no bias."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import TINY_ARCHS, build_tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import secateur
from secateur.errors import SecateurError
from secateur.export import save_checkpoint
from secateur.methods import get_method
from secateur.methods.base import LayerInfo, SparsityTarget
from secateur.methods.stade import Stade
from secateur.models import get_adapter, load_model
from secateur.models.base import ROLE_NORMED, ROLE_OUT
from secateur.recipe import Recipe
from secateur.stats import LinearStats

# The layers each family's adapter must call "out"; every other prunable linear is "normed".
OUT_LAYERS = {
    "llama": {"self_attn.o_proj", "mlp.down_proj"},
    "mistral": {"self_attn.o_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.o_proj", "mlp.down_proj"},
    "qwen3": {"self_attn.o_proj", "mlp.down_proj"},
    "gemma3_text": {"self_attn.o_proj", "mlp.down_proj"},
    "opt": {"self_attn.out_proj", "fc2"},
    "gpt2": {"attn.c_proj", "mlp.c_proj"},
    "gpt_neox": {"attention.dense", "mlp.dense_4h_to_h"},
}
FAMILIES = ["llama", "gpt2", "gpt_neox", "opt"]  # plain, Conv1D (transposed), fused qkv, biased by default
HALF = SparsityTarget.unstructured(0.5)


def calibration_ids(model, nsamples=4, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def layer_stats(x: torch.Tensor) -> LinearStats:
    stats = LinearStats(x.shape[-1], Stade.needs)
    stats.update(x)
    return stats


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapters_name_the_out_layers(arch):
    adapter = get_adapter(build_tiny_model(arch))
    roles = {name: adapter.layer_role(name) for name in adapter.linears(adapter.blocks()[0])}
    assert {name for name, role in roles.items() if role == ROLE_OUT} == OUT_LAYERS[arch]
    assert {name for name, role in roles.items() if role != ROLE_OUT} == set(roles) - OUT_LAYERS[arch]
    assert set(roles.values()) == {ROLE_NORMED, ROLE_OUT}


def test_layers_out_is_wanda_on_normed_layers_and_stade_on_out_layers():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    bias = torch.randn(8, generator=generator)
    x = torch.randn(64, 16, generator=generator) + 3.0 * torch.rand(16, generator=generator)  # non-zero means
    stats = layer_stats(x)
    split = get_method("stade", layers="out")
    wanda = get_method("wanda").prune(weight, bias, stats, HALF)
    everywhere = get_method("stade").prune(weight, bias, stats, HALF)
    assert not torch.equal(wanda.weight, everywhere.weight)  # the two masks differ here

    normed = split.prune(weight, bias, stats, HALF, layer=LayerInfo(role=ROLE_NORMED))
    assert torch.equal(normed.weight, wanda.weight) and normed.bias is None
    out = split.prune(weight, bias, stats, HALF, layer=LayerInfo(role=ROLE_OUT))
    assert torch.equal(out.weight, everywhere.weight) and torch.equal(out.bias, everywhere.bias)
    # layers=all (the default) ignores the role.
    default = get_method("stade").prune(weight, bias, stats, HALF, layer=LayerInfo(role=ROLE_NORMED))
    assert torch.equal(default.weight, everywhere.weight) and torch.equal(default.bias, everywhere.bias)


def test_layers_option_is_checked():
    with pytest.raises(SecateurError, match="layers 'in'.*all, out"):
        get_method("stade", layers="in")
    with pytest.raises(SecateurError, match="must be a str"):
        get_method("stade", layers=1)
    with pytest.raises(SecateurError, match="role"):
        get_method("stade", layers="out").prune(torch.ones(2, 4), None, layer_stats(torch.ones(3, 4)), HALF)


@pytest.mark.parametrize("arch", FAMILIES)
def test_layers_out_in_the_engine(arch, monkeypatch):
    dense = build_tiny_model(arch)
    ids = calibration_ids(dense)
    runs = {name: copy.deepcopy(dense) for name in ("split", "wanda", "stade")}
    for name in ("wanda", "stade"):
        secateur.prune(runs[name], Recipe(method=name, sparsity=0.5), ids, progress=False)

    calls, original = [], Stade.prune

    def spy(self, weight, bias, stats, target, layer=None):  # what the engine hands STADE, layer by layer
        result = original(self, weight, bias, stats, target, layer=layer)
        calls.append((weight.clone(), None if bias is None else bias.clone(), stats, target, layer, result))
        return result

    monkeypatch.setattr(Stade, "prune", spy)
    _, split_report = secateur.prune(runs["split"], Recipe(method="stade", sparsity=0.5,
                                                           method_options={"layers": "out"}), ids, progress=False)
    monkeypatch.undo()

    adapters = {name: get_adapter(model) for name, model in runs.items()}
    dense_adapter = get_adapter(dense)
    order = [(index, name) for index, block in enumerate(dense_adapter.blocks())
             for name in dense_adapter.linears(block)]
    assert len(calls) == len(order)
    for (index, name), (weight, bias, stats, target, layer, result) in zip(order, calls, strict=True):
        out = name in OUT_LAYERS[arch]
        assert layer == LayerInfo(role=ROLE_OUT if out else ROLE_NORMED), name
        # Per layer, on the statistics the engine gathered: exactly Wanda's or STADE's result.
        reference = get_method("stade" if out else "wanda").prune(weight, bias, stats, target)
        assert torch.equal(result.weight, reference.weight), name
        assert (result.bias is None) == (reference.bias is None) and (
            result.bias is None or torch.equal(result.bias, reference.bias)), name
        # ... and that is what the model holds: out layers compensated, normed ones' bias untouched.
        view = adapters["split"].linears(adapters["split"].blocks()[index])[name]
        dense_view = dense_adapter.linears(dense_adapter.blocks()[index])[name]
        assert torch.equal(view.get_weight(), result.weight), name
        if out:
            torch.testing.assert_close(view.get_bias(), result.bias, rtol=0, atol=0)
        elif dense_view.get_bias() is None:
            assert view.get_bias() is None, name
        else:
            assert torch.equal(view.get_bias(), dense_view.get_bias()), name
        # Block 0 sees the dense model's inputs in every run: the same masks as plain Wanda / STADE.
        if index == 0:
            plain = adapters["stade" if out else "wanda"]
            other = plain.linears(plain.blocks()[0])
            assert torch.equal(view.get_weight(), other[name].get_weight()), name
            if out:
                assert torch.equal(view.get_bias(), other[name].get_bias()), name
    updated = [layer["name"] for layer in split_report.layers if layer.get("bias_updated")]
    assert sorted(updated) == sorted(full for full, _ in runs["split"].named_modules()
                                     if any(full.endswith("." + n) for n in OUT_LAYERS[arch]))


def test_layers_out_checkpoint_reloads_with_biases_on_out_layers_only(tmp_path):
    model = build_tiny_model("llama")
    secateur.prune(model, Recipe(method="stade", sparsity=0.5, method_options={"layers": "out"}),
                   calibration_ids(model), progress=False)
    biased = {name.removesuffix(".bias") for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert biased == {f"model.layers.{i}.{name}" for i in range(2) for name in OUT_LAYERS["llama"]}
    assert not model.config.attention_bias and not model.config.mlp_bias
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "split", recipe_yaml="method: stade\n", results={},
                          overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert {path for path, shape in config["secateur_linear_shapes"].items() if shape[2]} == biased
    ids = calibration_ids(model, 2, 24, seed=7)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for reloaded in (load_model(str(out)).model, AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        reloaded.set_attn_implementation("eager")
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)
