"""RIA (with its N:M channel permutation) and DSnoT (as a method and as `refine=dsnot`):
hand-checked small layers, invariants on random layers, and whole tiny models of every family."""

import pytest
import torch
from test_engine import calibration_ids, targeted_weights
from test_methods import correlated_inputs, stats_for
from tiny_models import TINY_ARCHS, build_tiny_model

import secateur
from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods import SparsityTarget, get_method, method_option_names
from secateur.methods.base import LayerInfo
from secateur.methods.dsnot import estimated_error
from secateur.methods.ria import kept_score, nm_channel_permutation, ria_scores
from secateur.recipe import Recipe
from secateur.roles import ROLE_NORMED
from secateur.stats import LinearStats

HALF = SparsityTarget.unstructured(0.5)
NM_TARGETS = [SparsityTarget.n_m(2, 4), SparsityTarget.n_m(4, 8)]


def shifted_inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated inputs with per-column means, as the inputs of o_proj or down_proj have."""
    gen = torch.Generator().manual_seed(seed + 100)
    return correlated_inputs(tokens, cols, seed) + torch.randn(cols, generator=gen) * 2


def random_layer(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- RIA -----------------------------------------------------------------------------------------

def test_ria_score_equals_the_papers_formula_element_by_element():
    w = random_layer(5, 8, seed=1)
    x = shifted_inputs(40, 8, seed=1)
    stats = stats_for(get_method("ria"), x)
    scores = ria_scores(w, stats, 0.5)
    for i in range(5):
        for j in range(8):
            row_sum = sum(abs(float(w[i, k])) for k in range(8))
            column_sum = sum(abs(float(w[k, j])) for k in range(5))
            norm = sum(float(x[t, j]) ** 2 for t in range(40)) ** 0.5
            expected = (abs(float(w[i, j])) / row_sum + abs(float(w[i, j])) / column_sum) * norm ** 0.5
            assert float(scores[i, j]) == pytest.approx(expected, rel=1e-5)


def test_ria_hand_example_prunes_over_the_whole_layer():
    # |W| = [[1, 3], [1, 1]], unit activations: row sums 4, 2; column sums 2, 4.
    # Scores: [[1/4 + 1/2, 3/4 + 3/4], [1/2 + 1/2, 1/2 + 1/4]] = [[0.75, 1.5], [1.0, 0.75]];
    # over the layer the two 0.75 go (ties: lower flat index first is (0,0), then (1,1)).
    w = torch.tensor([[1.0, -3.0], [-1.0, 1.0]])
    stats = LinearStats(2, frozenset({"sumsq"}), count=1, sumsq=torch.ones(2, dtype=torch.float64))
    result = get_method("ria").prune(w, None, stats, HALF)
    assert result.weight.tolist() == [[0.0, -3.0], [-1.0, 0.0]]
    # Per row (Wanda's groups) it is the same here.
    assert get_method("ria", scope="row").prune(w, None, stats, HALF).weight.tolist() == [[0.0, -3.0], [-1.0, 0.0]]


def test_ria_zero_row_scores_zero_not_nan():
    w = random_layer(4, 8, seed=2)
    w[1] = 0.0
    stats = stats_for(get_method("ria"), shifted_inputs(30, 8, seed=2))
    scores = ria_scores(w, stats, 0.5)
    assert torch.isfinite(scores).all() and (scores[1] == 0).all()


@pytest.mark.parametrize("target", NM_TARGETS, ids=["2:4", "4:8"])
def test_ria_nm_mask_holds_in_memory_order_without_permutation(target):
    method = get_method("ria")
    w = random_layer(16, 64, seed=3)
    result = method.prune(w, None, stats_for(method, shifted_inputs(100, 64, seed=3)), target)
    zeros = (result.weight == 0).reshape(16, -1, target.m).sum(-1)
    assert (zeros == target.n).all()


@pytest.mark.parametrize("target", NM_TARGETS, ids=["2:4", "4:8"])
def test_ria_permutation_keeps_the_function_and_is_nm_in_its_order(target):
    method = get_method("ria", permute=True)
    w = random_layer(24, 64, seed=4)
    x = shifted_inputs(120, 64, seed=4)
    stats = stats_for(method, x)
    scores = ria_scores(w, stats, 0.5)
    order = nm_channel_permutation(scores, target.n, target.m)
    assert sorted(order.tolist()) == list(range(64))
    assert not torch.equal(order, torch.arange(64))  # it did move columns

    result = method.prune(w, None, stats, target)
    # N:M in the permuted order (where a 2:4 kernel would read it), not necessarily in memory order.
    permuted_zeros = (result.weight[:, order] == 0).reshape(24, -1, target.m).sum(-1)
    assert (permuted_zeros == target.n).all()
    # The layer that was pruned is the permuted one: W·P with the mask chosen there, fed Pᵀx.
    # The saved, un-permuted weight must compute the very same outputs.
    # (float64, so that only the order of the sums differs)
    x, w = x.double(), w.double()
    permuted_layer = w[:, order].masked_fill(prune_mask(scores[:, order], target), 0.0)
    torch.testing.assert_close(x[:, order] @ permuted_layer.T, x @ result.weight.double().T, rtol=0, atol=1e-10)
    torch.testing.assert_close(x[:, order] @ w[:, order].T, x @ w.T, rtol=0, atol=1e-10)  # dense: same too


@pytest.mark.parametrize("target", NM_TARGETS, ids=["2:4", "4:8"])
def test_ria_permutation_keeps_at_least_the_plain_masks_score(target):
    gains = []
    for seed in range(4):
        w = random_layer(32, 64, seed=10 + seed)
        stats = stats_for(get_method("ria"), shifted_inputs(80, 64, seed=10 + seed))
        scores = ria_scores(w, stats, 0.5)
        plain = kept_score(scores, target.n, target.m)
        permuted = kept_score(scores[:, nm_channel_permutation(scores, target.n, target.m)], target.n, target.m)
        assert permuted >= plain
        gains.append(permuted / plain)
        # The score the returned mask keeps is the permuted one.
        method = get_method("ria", permute=True)
        kept = method.prune(w, None, stats, target).weight != 0
        assert float(scores[kept].double().sum()) == pytest.approx(permuted, rel=1e-6)
    assert max(gains) > 1.001  # the assignment found better groupings, not just the identity


def test_ria_permutation_has_no_effect_on_unstructured_masks():
    w = random_layer(16, 32, seed=5)
    stats = stats_for(get_method("ria"), shifted_inputs(60, 32, seed=5))
    plain = get_method("ria").prune(w, None, stats, HALF).weight
    assert torch.equal(get_method("ria", permute=True).prune(w, None, stats, HALF).weight, plain)
    assert int((plain == 0).sum()) == 16 * 32 // 2


# --- DSnoT ---------------------------------------------------------------------------------------

def test_dsnot_hand_example():
    # Two tokens per input: col 0 (2.9, 3.1): μ 3, σ² .01, ‖x‖ √18.02; col 1 (2.8, 3.2): μ 3, σ² .04,
    # ‖x‖ √18.08; cols 2, 3 (−1, 1): μ 0, σ² 1, ‖x‖ √2. W = [.5, .6, 2, −3].
    # Wanda (|W|·‖x‖ = 2.12, 2.55, 2.83, 4.24) prunes cols 0, 1:
    #   ε = .5·3 + .6·3 = 3.3, Σ d²σ² = .25·.01 + .36·.04 = .0169, E = 10.89 + .0169 = 10.9069.
    # Cycle 1 grows col 0 (Wμ/σ² = 150 > 45) and prunes col 2 (lowest Wanda kept; μ = 0 pushes
    #   nothing): ε = 1.8, Σ d²σ² = .0144 + 4 = 4.0144, E = 7.2544 < 10.9069: accepted.
    # Cycle 2 would grow col 1 and prune col 3: ε = 0 but Σ d²σ² = 13, E = 13 > 7.2544: refused, stop.
    x = torch.tensor([[2.9, 2.8, -1.0, -1.0], [3.1, 3.2, 1.0, 1.0]])
    w = torch.tensor([[0.5, 0.6, 2.0, -3.0]])
    method = get_method("dsnot")
    stats = stats_for(method, x)
    wanda = get_method("wanda").prune(w, None, stats, HALF)
    assert wanda.weight.tolist() == [[0.0, 0.0, 2.0, -3.0]]
    result = method.prune(w, None, stats, HALF)
    assert result.weight.tolist() == [[0.5, 0.0, 0.0, -3.0]]
    assert float(estimated_error(w, None, wanda, stats)[0]) == pytest.approx(10.9069, abs=1e-4)
    assert float(estimated_error(w, None, result, stats)[0]) == pytest.approx(7.2544, abs=1e-4)
    # ε is the mean output error over the calibration tokens.
    error = (x.double() @ (w - result.weight).double().T).squeeze(1)
    assert float(error.mean()) == pytest.approx(1.8, abs=1e-6)
    assert get_method("dsnot", max_cycles=0).prune(w, None, stats, HALF).weight.tolist() == wanda.weight.tolist()


REFINED = [
    ("wanda", {}),
    ("magnitude", {}),  # scope "layer": rows with different counts
    ("ria", {}),
    ("stade", {}),  # moves the bias
    ("sparsegpt", {}),  # updates the kept weights
]


@pytest.mark.parametrize(("name", "options"), REFINED, ids=[name for name, _ in REFINED])
@pytest.mark.parametrize("target", [HALF, SparsityTarget.unstructured(0.7), *NM_TARGETS],
                         ids=["50%", "70%", "2:4", "4:8"])
def test_refine_dsnot_never_raises_the_estimate_and_keeps_the_structure(name, options, target):
    w = random_layer(32, 64, seed=20)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(21))
    x = shifted_inputs(160, 64, seed=20)
    plain = get_method(name, **options)
    refined = get_method(name, refine="dsnot", **options)
    stats = stats_for(refined, x)
    before = plain.prune(w, bias, stats, target)
    after = refined.prune(w, bias, stats, target)

    assert (estimated_error(w, bias, after, stats) <= estimated_error(w, bias, before, stats) + 1e-9).all()
    assert torch.equal((after.weight == 0).sum(1), (before.weight == 0).sum(1))  # same count per row
    if target.kind == "nm":
        groups = lambda weight: (weight == 0).reshape(32, -1, target.m).sum(-1)
        assert torch.equal(groups(after.weight), groups(before.weight))
    changed = (after.weight != before.weight)
    # A regrown weight gets its dense value back; every other entry is the method's or 0.
    regrown = changed & (after.weight != 0)
    assert torch.equal(after.weight[regrown], w[regrown])
    assert (after.weight[changed & ~regrown] == 0).all()
    if name != "stade":  # STADE's bias already cancels the mean error DSnoT works on
        assert changed.any()
        assert float(estimated_error(w, bias, after, stats).sum()) < float(estimated_error(w, bias, before, stats).sum())
    if before.bias is not None:
        assert torch.equal(after.bias, before.bias)


def test_dsnot_lowers_the_true_error_on_inputs_with_means():
    # The estimate assumes independent inputs; on correlated held-out data it must still help.
    w = random_layer(32, 64, seed=30)
    x = shifted_inputs(600, 64, seed=30)
    calibration, held_out = x[:400], x[400:]
    method = get_method("dsnot")
    stats = stats_for(method, calibration)
    for target in (HALF, SparsityTarget.n_m(2, 4)):
        wanda = get_method("wanda").prune(w, None, stats, target).weight
        refined = method.prune(w, None, stats, target).weight
        error = lambda pruned: float((held_out @ (w - pruned).T).square().sum())
        assert error(refined) < 0.95 * error(wanda)


def test_refine_passes_layer_info_to_the_method_that_asks():
    method = get_method("stade", layers="out", refine="dsnot")
    x = shifted_inputs(80, 32, seed=6)
    w = random_layer(8, 32, seed=6)
    result = method.prune(w, None, stats_for(method, x), HALF, layer=LayerInfo(role=ROLE_NORMED))
    assert result.bias is None  # STADE's Wanda branch for normed layers: no bias


def test_refine_option_is_offered_and_checked():
    assert {"refine", "scope", "permute", "activation_exponent"} <= method_option_names("ria")
    assert "refine" in method_option_names("wanda")
    assert "refine" not in method_option_names("flap")  # structured: no per-layer mask to refine
    refined = get_method("magnitude", refine="dsnot")
    assert refined.name == "magnitude" and {"sum", "sumsq"} <= refined.needs
    assert Recipe(method="magnitude", method_options={"refine": "dsnot"}).needs_calibration
    assert not Recipe(method="magnitude").needs_calibration
    with pytest.raises(SecateurError, match="accepted: dsnot"):
        get_method("wanda", refine="dsnop")
    with pytest.raises(SecateurError, match="unknown option"):
        get_method("flap", refine="dsnot")
    with pytest.raises(SecateurError, match="one or the other"):
        get_method("ria", permute=True, refine="dsnot")


@pytest.mark.parametrize(("name", "options"), [
    ("ria", {"scope": "column"}),
    ("ria", {"activation_exponent": -1.0}),
    ("ria", {"permute": "yes"}),
    ("dsnot", {"max_cycles": -1}),
    ("dsnot", {"update_threshold": -0.1}),
])
def test_bad_options_are_refused(name, options):
    with pytest.raises(SecateurError):
        get_method(name, **options)


# --- Whole tiny models of every family -----------------------------------------------------------

def prune_tiny(arch: str, method: str, options: dict, pattern: str):
    model = build_tiny_model(arch)
    recipe = Recipe(method=method, sparsity=0.5, sparsity_type=pattern, method_options=options)
    _, report = secateur.prune(model, recipe, calibration_ids(model), progress=False)
    assert report.sparsity_achieved == pytest.approx(0.5, abs=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calibration_ids(model, 1)).logits).all()
    return targeted_weights(model)


def assert_nm_in_memory_order(weights: dict, n: int, m: int) -> None:
    for key, weight in weights.items():
        assert ((weight == 0).reshape(weight.shape[0], -1, m).sum(-1) == n).all(), key


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_prunes_with_ria_permuted_and_dsnot(arch):
    for key, weight in prune_tiny(arch, "ria", {"permute": True}, "2:4").items():
        # N:M in a permuted order, so in memory order only the count per row is fixed.
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), key
    assert_nm_in_memory_order(prune_tiny(arch, "dsnot", {}, "4:8"), 4, 8)


def test_ria_over_the_layer_and_refined_sparsegpt_on_a_whole_model():
    for key, weight in prune_tiny("llama", "ria", {}, "unstructured").items():
        assert int((weight == 0).sum()) == weight.numel() // 2, key  # whole-layer comparison
    assert_nm_in_memory_order(prune_tiny("qwen2", "sparsegpt", {"refine": "dsnot"}, "2:4"), 2, 4)
