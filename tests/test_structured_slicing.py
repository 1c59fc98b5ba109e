"""Structured slicing (FFN neurons, KV groups, blocks) and structured checkpoints, on tiny models.

A physically sliced model must compute exactly what the unsliced model computes with the
removed structures zeroed (producers' rows and biases, consumer's columns).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import TINY_ARCHS, build_tiny_model, model_from_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur.errors import SecateurError
from secateur.models import get_adapter, load_model
from secateur.structured import finalize_config, save_structured

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
ATOL = 1e-4


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `arch`; Llama-like families get 8 query heads over 4 KV heads
    (4 groups of 2), the others keep 4 heads (4 groups of 1)."""
    model = build_tiny_model(arch, seed)
    if arch not in LLAMA_LIKE:
        return model
    config = copy.deepcopy(model.config)
    config.num_attention_heads, config.num_key_value_heads = 8, 4
    if arch in ("llama", "mistral"):
        config.head_dim = config.hidden_size // 8
    return model_from_config(config, seed)


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model, input_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids if input_ids is not None else ids(), use_cache=False).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def zero_rows(view, rows: torch.Tensor) -> None:
    weight = view.get_weight().clone()
    weight[rows] = 0
    view.set_weight(weight)
    bias = view.get_bias()
    if bias is not None:
        bias = bias.clone()
        bias[rows] = 0
        view.set_bias(bias)


def zero_columns(view, columns: torch.Tensor) -> None:
    weight = view.get_weight().clone()
    weight[:, columns] = 0
    view.set_weight(weight)


def removed(width: int, keep) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[torch.as_tensor(keep)] = False
    return mask.nonzero().flatten()


def slice_ffn_randomly(adapter, sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Keep `sizes[i]` random neurons (in random order) of block i; returns what was kept."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for block, size in zip(adapter.blocks(), sizes):
        keep = torch.randperm(adapter.ffn_units(block).width, generator=generator)[:size]
        adapter.keep_ffn(block, keep)
        kept.append(keep)
    return kept


# --- FFN --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ffn_slicing_equals_zeroing(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    reference = copy.deepcopy(model)
    ref_adapter = get_adapter(reference)
    before, before_blocks = n_params(model), adapter.count_block_params()

    sizes = [100, 37, 64][: len(adapter.blocks())]
    kept = slice_ffn_randomly(adapter, sizes)

    expected_removed = 0
    for ref_block, keep in zip(ref_adapter.blocks(), kept):
        units = ref_adapter.ffn_units(ref_block)
        gone = removed(units.width, keep)
        for view in units.producers.values():
            zero_rows(view, gone)
            expected_removed += len(gone) * (view.in_features + (view.get_bias() is not None))
        zero_columns(units.consumer, gone)
        expected_removed += len(gone) * units.consumer.out_features

    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)
    assert n_params(model) == before - expected_removed
    assert adapter.count_block_params() == before_blocks - expected_removed
    assert [s.ffn_width for s in adapter.block_shapes()] == sizes
    for block, size in zip(adapter.blocks(), sizes):
        units = adapter.ffn_units(block)
        assert units.width == size
        assert all(view.out_features == size for view in units.producers.values())


# --- heads ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_head_group_slicing_equals_zeroing(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    assert adapter.head_units(adapter.blocks()[0]).num_groups == 4
    reference = copy.deepcopy(model)
    ref_adapter = get_adapter(reference)
    before, before_blocks = n_params(model), adapter.count_block_params()
    # Block 0 keeps groups 0 and 2: each remaining query head must still read its own KV head.
    keeps = [[0, 2], [3, 1, 2], [1]][: len(adapter.blocks())]
    per_group = [adapter.head_units(block).params_per_group for block in adapter.blocks()]

    for block, keep in zip(adapter.blocks(), keeps):
        adapter.keep_head_groups(block, keep)

    expected_removed = 0
    for ref_block, keep, params in zip(ref_adapter.blocks(), keeps, per_group):
        units = ref_adapter.head_units(ref_block)
        for g in removed(units.num_groups, keep).tolist():
            for name, rows in units.producer_rows.items():
                zero_rows(units.producers[name], rows[g])
            zero_columns(units.consumer, units.consumer_columns[g])
            expected_removed += params

    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)
    assert n_params(model) == before - expected_removed
    assert adapter.count_block_params() == before_blocks - expected_removed
    queries = 2 if arch in LLAMA_LIKE else 1
    for shape, keep in zip(adapter.block_shapes(), keeps):
        assert (shape.num_kv_heads, shape.num_heads) == (len(keep), len(keep) * queries)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_removing_everything_is_refused(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    with pytest.raises(SecateurError, match="cannot remove every KV group of block 1"):
        adapter.keep_head_groups(adapter.blocks()[1], [])
    with pytest.raises(SecateurError, match="cannot remove every FFN neuron of block 0"):
        adapter.keep_ffn(adapter.blocks()[0], torch.tensor([], dtype=torch.long))
    with pytest.raises(SecateurError, match="must not repeat"):
        adapter.keep_ffn(adapter.blocks()[0], torch.tensor([1, 1]))
    with pytest.raises(SecateurError, match="cannot remove all"):
        adapter.remove_blocks(list(range(len(adapter.blocks()))))


# --- blocks -----------------------------------------------------------------------------


def _skip_block(block):
    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    return block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_removal_equals_skipping(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    reference = copy.deepcopy(model)
    drop = [1] if arch == "gemma3_text" else [0]  # gemma3: the full-attention block, between two sliding ones
    for index in drop:
        _skip_block(get_adapter(reference).blocks()[index])
    removed_params = sum(p.numel() for i in drop for p in adapter.blocks()[i].parameters())
    before, total = adapter.count_block_params(), len(adapter.blocks())

    adapter.remove_blocks(drop)

    assert len(adapter.blocks()) == total - len(drop) == model.config.num_hidden_layers
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == model.config.num_hidden_layers
    assert adapter.count_block_params() == before - removed_params
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)


# --- generation with a KV cache ---------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generation_with_cache_after_head_and_block_removal(arch):
    model = make_model(arch)
    adapter = get_adapter(model)
    adapter.keep_head_groups(adapter.blocks()[-1], [2, 1])
    adapter.keep_ffn(adapter.blocks()[-1], torch.arange(0, 128, 3))
    adapter.remove_blocks([0])  # the remaining blocks must be renumbered for the cache
    prompt = ids(1, 10)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (1, 16)
    assert torch.equal(cached, uncached)


# --- checkpoints ------------------------------------------------------------------------


def _assert_reloads(model, directory, *, remote: bool):
    expected = logits(model)
    config = json.loads((directory / "config.json").read_text())
    if remote:
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_secateur.SecateurForCausalLM"
        assert (directory / "modeling_secateur.py").is_file()
        source = (directory / "modeling_secateur.py").read_text()
        assert "secateur." not in source.replace("modeling_secateur", "")
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, trust_remote_code=True, attn_implementation="eager"
        )
        torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-5, rtol=0)
    else:
        assert "auto_map" not in config and not any(key.startswith("secateur_") for key in config)
        assert not (directory / "modeling_secateur.py").exists()
        loaded = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
        torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-5, rtol=0)
        assert get_adapter(loaded).block_shapes() == get_adapter(model).block_shapes()
    ours = load_model(str(directory)).model
    ours.set_attn_implementation("eager")
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)
    assert get_adapter(ours).block_shapes() == get_adapter(model).block_shapes()
    return ours


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_heterogeneous_checkpoint_reloads(arch, tmp_path):
    model = make_model(arch)
    adapter = get_adapter(model)
    slice_ffn_randomly(adapter, [96, 40, 72][: len(adapter.blocks())])
    adapter.keep_head_groups(adapter.blocks()[0], [3, 0])
    save_structured(model, tiny_tokenizer(), tmp_path)
    ours = _assert_reloads(model, tmp_path, remote=True)
    # Saving what was loaded again gives the same records.
    again = tmp_path / "again"
    save_structured(ours, tiny_tokenizer(), again)
    first, second = (json.loads((d / "config.json").read_text()) for d in (tmp_path, again))
    assert first["secateur_linear_shapes"] == second["secateur_linear_shapes"]
    assert first["secateur_module_attrs"] == second["secateur_module_attrs"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_uniform_checkpoint_needs_no_remote_code(arch, tmp_path):
    model = make_model(arch)
    adapter = get_adapter(model)
    slice_ffn_randomly(adapter, [48] * len(adapter.blocks()))
    if arch in LLAMA_LIKE:  # their configs can say "fewer heads, same head_dim"
        for block in adapter.blocks():
            adapter.keep_head_groups(block, [2, 0])
    adapter.remove_blocks([0])
    head_dim = getattr(adapter.blocks()[0].get_submodule(adapter.attention_name), "head_dim", None)
    save_structured(model, tiny_tokenizer(), tmp_path)
    _assert_reloads(model, tmp_path, remote=False)
    if arch in LLAMA_LIKE:
        config = json.loads((tmp_path / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
        assert config["head_dim"] == head_dim


@pytest.mark.parametrize("arch", ["opt", "gpt2", "gpt_neox"])
def test_uniform_heads_of_derived_head_dim_families_use_records(arch, tmp_path):
    # Their head size is hidden/heads, so fewer heads cannot be said in the standard fields.
    model = make_model(arch)
    adapter = get_adapter(model)
    for block in adapter.blocks():
        adapter.keep_head_groups(block, [1, 3])
    assert finalize_config(model, adapter) is False
    save_structured(model, tiny_tokenizer(), tmp_path)
    _assert_reloads(model, tmp_path, remote=True)


def test_uniform_shape_the_config_class_rejects_uses_records(tmp_path):
    # LlamaConfig insists on hidden % heads == 0 even with an explicit head_dim: 64 % 6 != 0.
    model = make_model("llama")
    adapter = get_adapter(model)
    for block in adapter.blocks():
        adapter.keep_head_groups(block, [2, 0, 3])
    assert finalize_config(model, adapter) is False
    save_structured(model, tiny_tokenizer(), tmp_path)
    _assert_reloads(model, tmp_path, remote=True)


def test_finalize_after_reslicing_drops_stale_records(tmp_path):
    model = make_model("llama")
    adapter = get_adapter(model)
    slice_ffn_randomly(adapter, [96, 40])
    assert finalize_config(model, adapter) is False
    adapter.keep_ffn(adapter.blocks()[0], torch.arange(40))
    assert finalize_config(model, adapter) is True
    assert not hasattr(model.config, "auto_map")
    assert not hasattr(model.config, "secateur_linear_shapes")
    assert model.config.intermediate_size == 40
