"""Structured methods end to end on tiny models: the model really shrinks, to the target."""

import copy

import pytest
import torch
from tiny_models import _config, build_tiny_model, model_from_config

import secateur
from secateur.errors import SecateurError
from secateur.models import get_adapter, load_model
from secateur.recipe import Recipe

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
METHODS = ["putri", "flap", "wanda-sp"]


def calibration_ids(model, nsamples=4, seqlen=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=generator)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", LLAMA_LIKE)
@pytest.mark.parametrize("method", METHODS)
def test_structured_method_hits_the_parameter_target(arch, method):
    model = build_tiny_model(arch)
    adapter = get_adapter(model)
    before = adapter.count_block_params()
    _, report = secateur.prune(model, Recipe(method=method, sparsity=0.3), calibration_ids(model), progress=False)
    after = get_adapter(model).count_block_params()
    assert report.structure["params_before"] == before and report.structure["params_after"] == after
    assert after < before
    assert (before - after) / before == pytest.approx(0.3, abs=0.01), report.structure
    assert torch.isfinite(logits(model, calibration_ids(model, 1, seed=5))).all()
    for shape in report.structure["blocks"]:
        assert shape["num_kv_heads"] >= 1 and shape["ffn_width"] >= 1
        assert shape["num_heads"] % shape["num_kv_heads"] == 0


def test_putri_head_scores_both_work_and_can_differ():
    dense = build_tiny_model("llama")
    ids = calibration_ids(dense)
    results = {}
    for score in ("reconstruction", "perplexity"):
        model = copy.deepcopy(dense)
        recipe = Recipe(method="putri", sparsity=0.4, method_options={"head_score": score})
        _, report = secateur.prune(model, recipe, ids, progress=False)
        results[score] = report.structure["kv_groups_removed"]
        assert sum(map(len, results[score])) > 0
    assert sum(map(len, results["reconstruction"])) == sum(map(len, results["perplexity"]))


@pytest.mark.parametrize("sparsity", [0.2, 0.4])
def test_putri_perplexity_search_removes_exactly_the_budget(sparsity):
    """With more groups per round than the budget (4 KV groups per block, 4 blocks), the greedy
    search must stop at the budget, not take a whole round."""
    from secateur.methods.putri import model_budget

    config = _config("llama")
    config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 4, 8, 4
    config.head_dim = config.hidden_size // 8
    dense = model_from_config(config)
    budget = model_budget(get_adapter(dense), sparsity, 1.5).heads_groups_to_remove
    ids = calibration_ids(dense)
    for score in ("reconstruction", "perplexity"):
        model = copy.deepcopy(dense)
        _, report = secateur.prune(model, Recipe(method="putri", sparsity=sparsity,
                                                 method_options={"head_score": score}), ids, progress=False)
        assert sum(map(len, report.structure["kv_groups_removed"])) == budget, score
        assert report.sparsity_achieved == pytest.approx(sparsity, abs=0.01), score


def test_putri_ffn_update_beats_plain_removal():
    """The least-squares refit of down_proj must bring the pruned model closer to the dense one
    than removing the same neurons without an update."""
    dense = build_tiny_model("llama")
    ids = calibration_ids(dense, nsamples=8, seqlen=64)
    reference = logits(dense, ids)
    pruned = copy.deepcopy(dense)
    secateur.prune(pruned, Recipe(method="putri", sparsity=0.3, method_options={"alpha": 0.01}), ids,
                   progress=False)
    # Same kept neurons, original down_proj columns: undo the update only.
    plain = copy.deepcopy(dense)
    adapter, pruned_adapter = get_adapter(plain), get_adapter(pruned)
    for block, pruned_block in zip(adapter.blocks(), pruned_adapter.blocks()):
        units, pruned_units = adapter.ffn_units(block), pruned_adapter.ffn_units(pruned_block)
        if pruned_units.width == units.width:
            continue
        producer = next(iter(units.producers))
        original_rows = units.producers[producer].get_weight()
        kept_rows = pruned_units.producers[producer].get_weight()
        keep = torch.tensor([int((original_rows == row).all(1).nonzero()[0]) for row in kept_rows])
        adapter.keep_ffn(block, keep)
    error_refit = (logits(pruned, ids) - reference).square().mean()
    error_plain = (logits(plain, ids) - reference).square().mean()
    assert error_refit < error_plain


def test_flap_gives_blocks_different_widths_and_reloads(tmp_path):
    from tiny_models import tiny_tokenizer

    from secateur.export import save_checkpoint

    model = build_tiny_model("llama")
    loaded_tok = tiny_tokenizer()
    _, report = secateur.prune(model, Recipe(method="flap", sparsity=0.35), calibration_ids(model), progress=False)
    widths = {shape["ffn_width"] for shape in report.structure["blocks"]}
    assert len(widths) > 1 or len({s["num_kv_heads"] for s in report.structure["blocks"]}) > 1
    out = save_checkpoint(model, loaded_tok, tmp_path / "flap", recipe_yaml="method: flap\n", results={},
                          overwrite=False)
    ids = calibration_ids(model, 1, seed=7)
    reloaded = load_model(str(out)).model
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_block_drop_removes_the_lowest_influence_blocks():
    model = build_tiny_model("gemma3_text")  # 3 blocks, two attention types
    _, report = secateur.prune(model, Recipe(method="block-drop", sparsity=0.34), calibration_ids(model),
                               progress=False)
    influence = report.structure["block_influence"]
    (dropped,) = report.structure["removed_blocks"]
    assert influence[dropped] == min(influence)
    assert len(get_adapter(model).blocks()) == 2
    assert torch.isfinite(logits(model, calibration_ids(model, 1))).all()


@pytest.mark.parametrize("arch", ["opt", "gpt2", "gpt_neox"])
def test_block_drop_and_flap_ffn_on_other_families(arch):
    model = build_tiny_model(arch)
    secateur.prune(model, Recipe(method="block-drop", sparsity=0.5), calibration_ids(model), progress=False)
    assert torch.isfinite(logits(model, calibration_ids(model, 1))).all()


def test_impossible_ratios_are_refused():
    model = build_tiny_model("llama")
    with pytest.raises(SecateurError, match="block-drop"):
        secateur.prune(model, Recipe(method="block-drop", sparsity=0.99), calibration_ids(model), progress=False)
    with pytest.raises(SecateurError):
        secateur.prune(model, Recipe(method="flap", sparsity=0.99), calibration_ids(model), progress=False)
    with pytest.raises(SecateurError, match="structured"):
        Recipe(method="putri", sparsity_type="2:4")
