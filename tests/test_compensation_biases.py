"""Only the layers that receive a compensation carry a bias (issue 10, bug 5).

FLAP compensates o_proj and down_proj; turning on Llama's `attention_bias`/`mlp_bias` gave
zero biases to q/k/v/gate/up too, which then counted as kept parameters (19.9 % removed for a
20 % target). The compensated layers alone must have a bias, in memory and in the checkpoint,
and the checkpoint must still reload to the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import _config, model_from_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

import secateur
from secateur.export import save_checkpoint
from secateur.models import get_adapter, load_model
from secateur.recipe import Recipe

HIDDEN, HEADS, KV_GROUPS, HEAD_DIM = 96, 6, 3, 16
FFN_CHANNEL = 3 * HIDDEN  # gate row + up row + down column
NORMED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def flap_llama(weak_group: bool) -> torch.nn.Module:
    """Two blocks, 3 KV groups; block 1's activations are 8× block 0's. With `weak_group`, KV
    group 0 of block 0 barely reaches o_proj, so FLAP removes it and compensates o_proj."""
    config = _config("llama")
    config.hidden_size, config.num_attention_heads = HIDDEN, HEADS
    config.num_key_value_heads, config.head_dim = KV_GROUPS, HEAD_DIM
    model = model_from_config(config)
    blocks = get_adapter(model).blocks()
    with torch.no_grad():
        blocks[1].input_layernorm.weight.mul_(8.0)
        blocks[1].post_attention_layernorm.weight.mul_(8.0)
        if weak_group:  # o_proj columns of group 0's two query heads
            blocks[0].self_attn.o_proj.weight[:, : 2 * HEAD_DIM].mul_(0.01)
    return model


def ids(model, nsamples=4, seqlen=32, seed=0):
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def biases(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if name.endswith(".bias")}


@pytest.mark.parametrize(("sparsity", "weak_group"), [(0.2, False), (0.3, True)])
def test_flap_biases_only_where_compensated_count_and_reload(sparsity, weak_group, tmp_path):
    model = flap_llama(weak_group)
    adapter = get_adapter(model)
    _, report = secateur.prune(model, Recipe(method="flap", sparsity=sparsity), ids(model), progress=False)

    shapes = report.structure["blocks"]
    before, after = report.structure["params_before"], report.structure["params_after"]
    assert abs((before - after) - sparsity * before) <= FFN_CHANNEL, report.structure
    assert report.sparsity_achieved == pytest.approx(sparsity, abs=FFN_CHANNEL / before)

    # A bias exactly on the consumers that lost units (the compensated ones), nowhere else.
    for block, shape in zip(adapter.blocks(), shapes, strict=True):
        for name in NORMED:
            assert block.get_submodule(name).bias is None, name
        assert (block.self_attn.o_proj.bias is not None) == (shape["num_kv_heads"] < KV_GROUPS)
        assert (block.mlp.down_proj.bias is not None) == (shape["ffn_width"] < model.config.intermediate_size)
    assert all(shape["ffn_width"] < model.config.intermediate_size for shape in shapes)
    if weak_group:
        assert shapes[0]["num_kv_heads"] < KV_GROUPS  # so o_proj's compensation is exercised
    assert not model.config.attention_bias and not model.config.mlp_bias

    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "flap", recipe_yaml="method: flap\n", results={},
                          overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert not config["attention_bias"] and not config["mlp_bias"]
    recorded = {path for path, shape in config["secateur_linear_shapes"].items() if shape[2]}
    assert recorded == {name.removesuffix(".bias") for name in biases(model)}

    test_ids = ids(model, 2, 24, seed=7)
    expected = logits(model, test_ids)
    ours = load_model(str(out)).model
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for reloaded in (ours, remote):
        reloaded.set_attn_implementation("eager")  # the kernel the pruned model ran with
        reloaded.eval()
        assert biases(reloaded).keys() == biases(model).keys()
        assert get_adapter(reloaded).count_block_params() == after
        torch.testing.assert_close(logits(reloaded, test_ids), expected, rtol=0, atol=0)


def test_stade_on_every_layer_keeps_a_standard_checkpoint(tmp_path):
    """STADE compensates every layer a flag governs: the flags go on and no remote code is needed."""
    model = flap_llama(weak_group=False)
    secateur.prune(model, Recipe(method="stade", sparsity=0.5), ids(model), progress=False)
    assert model.config.attention_bias and model.config.mlp_bias
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "stade", recipe_yaml="method: stade\n", results={},
                          overwrite=False)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and not any(key.startswith("secateur_") for key in config)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    test_ids = ids(model, 2, 24, seed=7)
    torch.testing.assert_close(logits(reloaded, test_ids), logits(model, test_ids), rtol=0, atol=0)
