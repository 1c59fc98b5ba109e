"""Structured methods faithful to their papers, on the cases where a naive port fails.

The model here has blocks of very different activation scales (the embeddings and block 0's
norms are scaled by 0.01, as SmolLM2's first block's residual stream is ~300× smaller than
the others') and 3 KV groups per block. Each test names the bug it guards against; each fails
on the code before the fix (checked when the fix was written).
"""

import copy

import pytest
import torch
from tiny_models import _config, model_from_config, tiny_tokenizer

import secateur
from secateur.export import save_checkpoint
from secateur.methods.flap import group_scores, head_scores, standardize
from secateur.methods.putri import allocate_steps, least_squares_refit, nested_refit_errors, refit_error
from secateur.methods.wanda_sp import block_shares
from secateur.models import get_adapter, load_model
from secateur.recipe import Recipe


def uneven_scales_model(blocks: int = 4, seed: int = 0):
    config = _config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 96, 192, blocks
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 6, 3, 16
    model = model_from_config(config, seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.01)
        model.model.layers[0].input_layernorm.weight.mul_(0.01)
        model.model.layers[0].post_attention_layernorm.weight.mul_(0.01)
    return model


@pytest.fixture(scope="module")
def dense():
    return uneven_scales_model()


def calibration(model, nsamples=8, seqlen=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=generator)


def prune(dense, method, sparsity, **options):
    model = copy.deepcopy(dense)
    _, report = secateur.prune(model, Recipe(method=method, sparsity=sparsity, method_options=options),
                               calibration(dense), progress=False)
    return model, report


def kv_groups_left(report):
    return [shape["num_kv_heads"] for shape in report.structure["blocks"]]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------ FLAP heads


def test_flap_head_scores_square_standardise_then_average():
    fluctuation = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 0.5], dtype=torch.float64)
    columns = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
    z = (fluctuation**2 - (fluctuation**2).mean()) / (fluctuation**2).std()
    expected = torch.stack([z[c].mean() for c in columns])
    torch.testing.assert_close(head_scores(fluctuation, columns), expected)


def test_flap_head_scores_are_not_forced_negative_with_three_groups():
    """Bug 1: z-scoring the 3 group means of a block always puts the weakest at <= -0.577, however
    alike the heads are. Standardised over the channels, alike heads score near 0."""
    generator = torch.Generator().manual_seed(0)
    channels = 1.0 + 0.01 * torch.rand(48, generator=generator, dtype=torch.float64)  # 3 alike heads
    columns = [torch.arange(16 * g, 16 * (g + 1)) for g in range(3)]
    naive = standardize(group_scores(channels, columns))
    assert naive.min() <= -0.577
    assert head_scores(channels, columns).abs().max() < 0.5


def test_flap_does_not_take_a_head_from_every_block(dense):
    """Bug 1 end to end: at 20 % the naive scoring removed one KV group from each of the 4 blocks."""
    _, report = prune(dense, "flap", 0.2)
    removed = sum(3 - left for left in kv_groups_left(report))
    assert removed <= 1, kv_groups_left(report)
    assert report.sparsity_achieved == pytest.approx(0.2, abs=0.005)


# ------------------------------------------------------------------------------ wanda-sp heads


def test_block_shares_are_scale_free():
    scores = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(block_shares(scores), block_shares(1000 * scores))
    assert float(block_shares(scores).sum()) == pytest.approx(1.0)
    torch.testing.assert_close(block_shares(torch.zeros(3)), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_wanda_sp_does_not_empty_the_small_scale_block(dense):
    """Bug 2: raw Wanda masses of block 0 are ~100× smaller, so the cross-block ranking took all
    but one of its KV groups first."""
    _, report = prune(dense, "wanda-sp", 0.3)
    left = kv_groups_left(report)
    assert sum(3 - n for n in left) >= 2  # the budget does remove groups
    assert left[0] >= 2, left


# ------------------------------------------------------------------------------ Putri heads


def test_putri_head_energy_is_normalised_per_block(dense):
    """Bug 4: absolute head energy is tiny in the small-scale block, which then loses its heads."""
    _, naive = prune(dense, "putri", 0.3, head_norm="none")
    _, normalised = prune(dense, "putri", 0.3)
    assert kv_groups_left(naive)[0] == 1  # the failure the normalisation exists for
    assert kv_groups_left(normalised)[0] >= 2, kv_groups_left(normalised)
    assert sum(kv_groups_left(naive)) == sum(kv_groups_left(normalised))


def test_putri_perplexity_search_refit_is_not_a_no_op(dense):
    """Bug 3: the search zeroed the removed groups' o_proj columns before the refit target was
    built, so the refit returned the weights unchanged."""
    ids = calibration(dense, 2, seed=9)
    with_refit, report = prune(dense, "putri", 0.3, head_score="perplexity", refit_o_proj=True)
    without_refit, _ = prune(dense, "putri", 0.3, head_score="perplexity", refit_o_proj=False)
    assert sum(3 - n for n in kv_groups_left(report)) >= 1
    assert not torch.allclose(logits(with_refit, ids), logits(without_refit, ids), atol=1e-6)
    changed = [
        not torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)
        for a, b in zip(with_refit.model.layers, without_refit.model.layers, strict=True)
        if a.self_attn.o_proj.in_features < dense.model.layers[0].self_attn.o_proj.in_features
    ]
    assert changed and all(changed)


# ------------------------------------------------------------------------------ refits


def _inputs(n, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, cols, dtype=torch.float64)  # channels of very different energy
    mix = torch.eye(cols, dtype=torch.float64) + 0.5 * torch.randn(cols, cols, generator=generator,
                                                                   dtype=torch.float64)
    return (torch.randn(n, cols, generator=generator, dtype=torch.float64) @ mix) * scale


def test_ridge_scales_with_each_inputs_energy():
    X = _inputs(64, 12, seed=1)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = torch.tensor([0, 3, 4, 7, 9, 11])
    H, C = X.T @ X, X.T @ (X @ W.T)
    H_SS = H[keep][:, keep]
    D = torch.diag(torch.diagonal(H_SS))
    expected = torch.linalg.solve(H_SS + 0.1 * D, C[keep]).T
    torch.testing.assert_close(least_squares_refit(H, C, keep, damp=0.1), expected)
    # Pulled towards a prior instead of zero: (H_SS + λD) Wᵀ = C_S + λ D Pᵀ.
    prior = W[:, keep]
    expected = torch.linalg.solve(H_SS + 0.1 * D, C[keep] + 0.1 * D @ prior.T).T
    torch.testing.assert_close(least_squares_refit(H, C, keep, damp=0.1, prior=prior), expected)
    # A huge ridge keeps the prior; no ridge is the exact solve.
    torch.testing.assert_close(least_squares_refit(H, C, keep, damp=1e9, prior=prior), prior, atol=1e-4, rtol=1e-4)


def test_ridge_refit_generalises_where_the_exact_one_overfits():
    """Fewer calibration tokens than kept inputs: the exact refit fits the noise."""
    W = torch.randn(8, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    keep = torch.arange(0, 40, 2)
    train, test = _inputs(24, 40, seed=4), _inputs(2000, 40, seed=5)
    H = train.T @ train
    held_out = {}
    for damp in (0.0, 0.05):
        new = least_squares_refit(H, H @ W.T, keep, damp=damp, prior=W[:, keep])
        held_out[damp] = float((test[:, keep] @ new.T - test @ W.T).square().mean())
    assert held_out[0.05] < 0.5 * held_out[0.0]


def test_refit_error_matches_the_direct_computation():
    X = _inputs(300, 10, seed=6)
    W = torch.randn(4, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    keep = torch.tensor([1, 2, 5, 8])
    H = X.T @ X
    for refit, damp in ((True, 0.0), (True, 0.01), (False, 0.0)):
        new = least_squares_refit(H, H @ W.T, keep, damp, prior=W[:, keep]) if refit else W[:, keep]
        direct = float((X[:, keep] @ new.T - X @ W.T).square().sum())
        assert refit_error(H, W, keep, damp, refit) == pytest.approx(direct, rel=1e-8)


def test_nested_refit_errors_agree_with_one_refit_per_width():
    X = _inputs(400, 12, seed=8)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    H = X.T @ X
    order = torch.randperm(12, generator=torch.Generator().manual_seed(10))
    exact = nested_refit_errors(H, W, order)
    plain = nested_refit_errors(H, W, order, refit=False)
    ridge = nested_refit_errors(H, W, order, damp=0.05)
    for w in range(1, 13):
        keep = order[:w].sort().values
        assert float(exact[w]) == pytest.approx(refit_error(H, W, keep), rel=1e-7, abs=1e-6)
        assert float(plain[w]) == pytest.approx(refit_error(H, W, keep, refit=False), rel=1e-7, abs=1e-6)
        # with a ridge: the ridge objective, at least the error of the ridge refit
        assert float(ridge[w]) >= refit_error(H, W, keep, damp=0.05) * (1 - 1e-9) - 1e-6
    assert float(exact[0]) == pytest.approx(float(((X @ W.T) ** 2).sum()))
    assert float(exact[12]) == pytest.approx(0.0, abs=1e-6)


def test_putri_warns_when_calibration_is_too_short_for_the_refit(dense):
    model = copy.deepcopy(dense)
    _, report = secateur.prune(model, Recipe(method="putri", sparsity=0.3), calibration(dense, 2, 16),
                               progress=False)
    assert any("calibration tokens" in warning for warning in report.warnings)
    model = copy.deepcopy(dense)
    _, enough = secateur.prune(model, Recipe(method="putri", sparsity=0.3), calibration(dense, 16, 96),
                               progress=False)  # 1,536 tokens for ~130 kept neurons: enough
    assert not any("calibration tokens" in warning for warning in enough.warnings)


# ------------------------------------------------------------------------------ global allocation


def test_allocate_steps_takes_the_cheapest_error_per_parameter_first():
    flat = ([0.0, 0.1, 0.2, 0.3], [10, 10, 10])
    steep = ([0.0, 5.0, 10.0], [10, 10])
    assert allocate_steps([flat, steep], 30) == [3, 0]
    assert allocate_steps([flat, steep], 40) == [3, 1]
    # A big step that would overshoot is passed over while a small one fits.
    big = ([0.0, 0.01], [100])
    assert allocate_steps([flat, big], 20) == [2, 0]
    with pytest.raises(Exception, match="minimum width"):
        allocate_steps([flat], 1000)


def test_putri_global_allocation_thins_the_block_that_matters_least(tmp_path):
    dense = uneven_scales_model()
    with torch.no_grad():
        dense.model.layers[2].mlp.down_proj.weight.mul_(0.01)  # block 2's FFN barely writes to the stream
    model, report = prune(dense, "putri", 0.3, allocation="global")
    widths = [shape["ffn_width"] for shape in report.structure["blocks"]]
    assert widths[2] == min(widths) and widths[2] < max(widths), widths
    assert report.sparsity_achieved == pytest.approx(0.3, abs=0.01)
    _, uniform = prune(dense, "putri", 0.3)
    assert len({s["ffn_width"] for s in uniform.structure["blocks"]}) == 1
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "global", recipe_yaml="method: putri\n", results={},
                          overwrite=False)
    ids = calibration(dense, 1, seed=7)
    torch.testing.assert_close(logits(load_model(str(out)).model, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_putri_global_allocation_stays_closer_to_dense_where_blocks_differ():
    """On a model whose blocks differ, choosing widths per block must beat one width for all: the
    pruned model's next-token distribution stays closer to the dense one (KL on held-out text;
    random tiny models have no meaningful loss of their own)."""
    dense = uneven_scales_model()
    with torch.no_grad():
        dense.model.layers[2].mlp.down_proj.weight.mul_(0.01)
    ids = calibration(dense, 4, seed=11)
    reference = torch.log_softmax(logits(dense, ids), -1)

    def kl(model):
        pruned = torch.log_softmax(logits(model, ids), -1)
        return float((reference.exp() * (reference - pruned)).sum(-1).mean())

    uniform, _ = prune(dense, "putri", 0.3)
    allocated, _ = prune(dense, "putri", 0.3, allocation="global")
    assert kl(allocated) < kl(uniform)


def test_putri_global_allocation_on_every_block_shape_of_gemma():
    from tiny_models import build_tiny_model

    model = build_tiny_model("gemma3_text")
    adapter = get_adapter(model)
    before = adapter.count_block_params()
    secateur.prune(model, Recipe(method="putri", sparsity=0.3, method_options={"allocation": "global"}),
                   calibration(model, 4, 32), progress=False)
    assert (before - get_adapter(model).count_block_params()) / before == pytest.approx(0.3, abs=0.02)
    assert torch.isfinite(logits(model, calibration(model, 1, 16, seed=3))).all()


def test_putri_global_allocation_drops_a_block_that_does_nothing(tmp_path):
    """Whole blocks compete in the same budget: a block whose attention and FFN barely write to
    the residual stream costs less to drop than any thinning elsewhere."""
    dense = uneven_scales_model(blocks=5)
    with torch.no_grad():
        dense.model.layers[3].mlp.down_proj.weight.mul_(1e-3)
        dense.model.layers[3].self_attn.o_proj.weight.mul_(1e-3)
    model, report = prune(dense, "putri", 0.2, allocation="global")
    assert report.structure["removed_blocks"] == [3]
    assert report.sparsity_achieved == pytest.approx(0.2, abs=0.01)
    _, kept_whole = prune(dense, "putri", 0.2, allocation="global", drop_blocks=False)
    assert kept_whole.structure["removed_blocks"] == []
    assert len(kept_whole.structure["blocks"]) == 5
    out = save_checkpoint(model, tiny_tokenizer(), tmp_path / "dropped", recipe_yaml="method: putri\n", results={},
                          overwrite=False)
    ids = calibration(dense, 1, seed=7)
    torch.testing.assert_close(logits(load_model(str(out)).model, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_output_gain_is_what_a_post_norm_does_to_a_small_error():
    """Gemma's sandwich norms: an error Δy in the FFN output reaches the residual stream through
    the post-FFN RMSNorm; `output_gain` predicts its energy there from the output statistics."""
    from tiny_models import build_tiny_model

    from secateur.methods.putri import output_gain

    model = build_tiny_model("gemma3_text")
    adapter = get_adapter(model)
    block = adapter.blocks()[1]
    norm = adapter.output_norm(block, "ffn")
    assert norm is block.post_feedforward_layernorm and adapter.output_norm(block, "heads") is not None
    assert get_adapter(build_tiny_model("llama")).output_norm(get_adapter(build_tiny_model("llama")).blocks()[0],
                                                            "ffn") is None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator) * 3)  # γ = 1 + w, far from 1
        y = torch.randn(512, norm.weight.numel(), generator=generator) * 0.05  # a small output, as in late blocks
        delta = torch.randn(y.shape, generator=generator) * 1e-4
        reached = float((norm(y + delta) - norm(y)).double().square().sum())
    predicted = output_gain(norm, y.double().square().sum(0), y.shape[0]) * float(delta.double().square().sum())
    assert predicted == pytest.approx(reached, rel=0.1)
    assert output_gain(None, y.square().sum(0), y.shape[0]) == 1.0


def test_putri_global_allocation_is_blind_to_the_scale_a_post_norm_removes():
    """With sandwich norms, scaling a block's down projection changes nothing the model computes
    (the post-FFN RMSNorm divides the scale out), so it must change nothing the allocation
    decides. Errors measured before the norm shrink with the scale (by 100 here), and such a
    block was thinned first: the allocation emptied Gemma-3-270M's last blocks, whose FFN outputs
    are small before their post-norms."""
    from tiny_models import build_tiny_model

    model = build_tiny_model("gemma3_text")
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        get_adapter(scaled).blocks()[1].mlp.down_proj.weight.mul_(0.1)
    ids = calibration(model, 1, seed=5)
    torch.testing.assert_close(logits(scaled, ids), logits(model, ids), rtol=1e-3, atol=1e-3)  # the same model

    def widths(dense):
        _, report = prune(dense, "putri", 0.3, allocation="global")
        return [shape["ffn_width"] for shape in report.structure["blocks"]]

    assert widths(scaled) == widths(model)
