"""Uneven structured checkpoints state their per-block shapes in transformers' own
`per_layer_config` field, and still load: with trust_remote_code=True and with secateur.load."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import build_tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

import secateur
from secateur.export import save_checkpoint
from secateur.models import load_model
from secateur.recipe import Recipe


def _ids(vocab: int, nsamples: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (nsamples, 32), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def flap_checkpoint(tmp_path_factory):
    """FLAP at 60 % on a tiny Llama: blocks end with different FFN widths and head counts."""
    model = build_tiny_model("llama")
    _, report = secateur.prune(model, Recipe(method="flap", sparsity=0.6), _ids(model.config.vocab_size),
                               progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path_factory.mktemp("flap") / "ckpt",
                          recipe_yaml="method: flap\n", results={}, overwrite=False)
    return model, report.structure["blocks"], out


def test_flap_checkpoint_states_per_block_shapes_in_transformers_field(flap_checkpoint):
    _, blocks, out = flap_checkpoint
    config = json.loads((out / "config.json").read_text())
    stated = config["per_layer_config"]
    assert config["allow_global_per_layer_attribute_access"] is True
    expected = {}
    for index, shape in enumerate(blocks):  # only what differs from the global (stock) values is stated
        changed = {key: value for key, value in (("intermediate_size", shape["ffn_width"]),
                                                 ("num_attention_heads", shape["num_heads"]),
                                                 ("num_key_value_heads", shape["num_kv_heads"]))
                   if value != config[key]}
        if changed:
            expected[str(index)] = changed
    assert stated == expected and len(stated) == len(blocks)
    assert len({shape["ffn_width"] for shape in blocks}) > 1 or len({s["num_kv_heads"] for s in blocks}) > 1
    # secateur's own records stay for the bundled modeling file.
    assert config["secateur_linear_shapes"] and (out / "modeling_secateur.py").is_file()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_secateur.SecateurForCausalLM"


def test_flap_checkpoint_loads_with_remote_code_and_with_secateur(flap_checkpoint):
    model, blocks, out = flap_checkpoint
    ids = _ids(model.config.vocab_size, 1, seed=7)
    expected = _logits(model, ids)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__name__ == "SecateurForCausalLM"
    torch.testing.assert_close(_logits(remote, ids), expected, rtol=0, atol=1e-5)
    # transformers itself reads the per-block shapes from the field.
    assert remote.config.is_heterogeneous
    assert [remote.config.per_layer_config[i].intermediate_size for i in range(len(blocks))] == \
        [shape["ffn_width"] for shape in blocks]
    assert [remote.config.per_layer_config[i].num_key_value_heads for i in range(len(blocks))] == \
        [shape["num_kv_heads"] for shape in blocks]
    loaded = load_model(str(out)).model
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)
    generated = remote.generate(ids[:, :8], max_new_tokens=3, do_sample=False, cache_implementation="static",
                                pad_token_id=0)
    assert generated.shape == (1, 11)


def test_secateur_loads_it_without_transformers_warnings(flap_checkpoint):
    """Local loads stay silent (a refusal right after loading must be the only line on stderr)."""
    _, _, out = flap_checkpoint
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    logger = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # as in a fresh process (an earlier --quiet run raised transformers' level)
    try:
        logging.Logger.warning_once.cache_clear()  # transformers warns once per process
        AutoConfig.from_pretrained(out)  # plain transformers does warn: the check below can fail
        assert any("Reading global config value" in message for message in heard)
        heard.clear()
        logging.Logger.warning_once.cache_clear()
        load_model(str(out))
        assert heard == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_reloaded_uneven_checkpoint_saves_and_loads_again(flap_checkpoint, tmp_path):
    model, _, out = flap_checkpoint
    loaded = load_model(str(out))
    again = save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "again", recipe_yaml="method: flap\n",
                            results={}, overwrite=False)
    assert json.loads((again / "config.json").read_text())["per_layer_config"] == \
        json.loads((out / "config.json").read_text())["per_layer_config"]
    ids = _ids(model.config.vocab_size, 1, seed=3)
    torch.testing.assert_close(_logits(load_model(str(again)).model, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_families_whose_config_cannot_state_a_block_get_no_field(tmp_path):
    """GPT-2 derives its head size from the head count: a per-block head count would be a lie."""
    model = build_tiny_model("gpt2")
    _, report = secateur.prune(model, Recipe(method="flap", sparsity=0.4), _ids(model.config.vocab_size),
                               progress=False)
    assert any(shape["num_heads"] != model.config.n_head for shape in report.structure["blocks"])
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "gpt2", recipe_yaml="method: flap\n", results={},
                          overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config and "allow_global_per_layer_attribute_access" not in config
    ids = _ids(model.config.vocab_size, 1, seed=5)
    torch.testing.assert_close(_logits(load_model(str(out)).model, ids), _logits(model, ids), rtol=0, atol=1e-5)


def test_even_checkpoints_stay_stock(tmp_path):
    model = build_tiny_model("llama")
    secateur.prune(model, Recipe(method="block-drop", sparsity=0.5), _ids(model.config.vocab_size), progress=False)
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "even", recipe_yaml="method: block-drop\n",
                          results={}, overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert not {"per_layer_config", "auto_map", "secateur_linear_shapes"} & set(config)
