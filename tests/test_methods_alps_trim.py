"""ALPS (ADMM + conjugate-gradient refit) and TRIM (per-row sparsity allocation), by hand and end to end."""

import dataclasses
import re

import pytest
import torch
from test_engine import calibration_ids, targeted_weights
from test_methods import correlated_inputs, stats_for
from tiny_models import TINY_ARCHS, build_tiny_model

import secateur
from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods import PruneResult, SparsityTarget, get_method
from secateur.methods.base import LayerInfo
from secateur.recipe import Recipe
from secateur.stats import LinearStats
from secateur.trim import OutputQuality, TrimmedMethod, recentre, row_counts, trim_search, with_row_allocation

HALF = SparsityTarget.unstructured(0.5)
TWO_FOUR = SparsityTarget.n_m(2, 4)
NORMED = LayerInfo(role="normed")


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x.double() @ (w - w_hat).double().T).norm())


def realistic_layer(rows=64, cols=128, tokens=384, seed=8):
    x = correlated_inputs(tokens, cols, seed=seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return x, w


# --- ALPS -------------------------------------------------------------------------------------

def test_alps_hand_example_refits_what_sparsegpt_cannot():
    # H = [[2, 1], [1, 2]]. Row (1, 3): pruning w0 costs w0²·(H00 − H01²/H11) = 1.5 and w1 absorbs
    # it, w1 = 3 + 0.5·1 = 3.5. Row (3, 1): pruning w1 costs 1.5, w0 = 3 + 0.5·1 = 3.5. SparseGPT
    # finds the same mask but cannot update column 0 after pruning column 1 (it is already
    # behind it): its row 2 stays (3, 0), error 1.5 + (0.5)²·1.5 vs ALPS's 1.5.
    alps = get_method("alps", damp=0.0)
    gram = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    stats = LinearStats(2, alps.needs, count=2, gram=gram)
    w = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    result = alps.prune(w, None, stats, HALF)
    torch.testing.assert_close(result.weight, torch.tensor([[0.0, 3.5], [3.5, 0.0]]), rtol=0, atol=1e-5)
    assert result.bias is None
    sparsegpt = get_method("sparsegpt", damp=0.0).prune(w, None, stats, HALF).weight
    assert sparsegpt[1].tolist() == [3.0, 0.0]


def test_alps_refit_is_the_least_squares_optimum_on_its_support():
    # On the kept weights the gradient of the (damped) reconstruction error must vanish:
    # ((Ŵ − W)(H + λI))_ij = 0 where kept, λ = 0.01 · mean diag H. Float32 CG to a 1e-4 residual.
    x, w = realistic_layer(rows=8, cols=32, tokens=200, seed=20)
    alps = get_method("alps", cg_iter=64)
    stats = stats_for(alps, x)
    w_hat = alps.prune(w, None, stats, HALF).weight
    kept = w_hat != 0
    damped = stats.gram + 0.01 * stats.gram.diagonal().mean() * torch.eye(32, dtype=torch.float64)
    gradient = (w_hat - w).double() @ damped
    unfitted = (w.masked_fill(~kept, 0.0) - w).double() @ damped  # same mask, no refit
    assert float(gradient[kept].abs().max()) < 1e-3 * float(unfitted[kept].abs().max())


@pytest.mark.parametrize("target", [HALF, TWO_FOUR], ids=["50%", "2:4"])
def test_alps_reconstructs_better_than_sparsegpt_at_the_same_budget(target):
    x, w = realistic_layer()
    errors, results = {}, {}
    for name in ("wanda", "sparsegpt", "alps"):
        method = get_method(name)
        results[name] = method.prune(w, None, stats_for(method, x), target).weight
        errors[name] = output_error(x, w, results[name])
    assert errors["alps"] < 0.9 * errors["sparsegpt"] < errors["wanda"], errors
    zeros = results["alps"] == 0
    if target.kind == "nm":
        assert ((zeros.reshape(64, -1, 4).sum(-1)) == 2).all()
    else:
        assert (zeros.sum(1) == 64).all()  # exactly floor(0.5 · 128) in every row, like SparseGPT


def test_alps_layer_scope_is_exact_over_the_layer_and_better_still():
    x, w = realistic_layer()
    target = SparsityTarget.unstructured(0.7)
    row = get_method("alps")
    layer = get_method("alps", mask_scope="layer")
    by_row = row.prune(w, None, stats_for(row, x), target).weight
    by_layer = layer.prune(w, None, stats_for(layer, x), target).weight
    assert int((by_layer == 0).sum()) == int(0.7 * w.numel())
    assert len(set((by_layer == 0).sum(1).tolist())) > 1  # rows end uneven, as in the paper
    assert output_error(x, w, by_layer) < output_error(x, w, by_row)


def test_alps_recovers_from_a_penalty_too_large_to_move():
    # With ρ = 1000 ADMM cannot leave the starting mask: the schedule divides ρ by 5 until the
    # support moves, so the result improves on the starting mask refitted (max_iter=0), if less
    # than from the paper's ρ = 0.1.
    x, w = realistic_layer(rows=32, cols=64, tokens=256, seed=14)
    errors = {}
    for options in ({"rho": 0.1}, {"rho": 1000.0}, {"max_iter": 0}):
        alps = get_method("alps", **options)
        errors[str(options)] = output_error(x, w, alps.prune(w, None, stats_for(alps, x), HALF).weight)
    paper, too_large, start = errors.values()
    assert paper < too_large < 0.95 * start, errors


def test_alps_dead_inputs_are_pruned_for_free():
    x, w = realistic_layer(rows=16, cols=64, tokens=48, seed=12)
    x[:, :5] = 0
    alps = get_method("alps")
    result = alps.prune(w, None, stats_for(alps, x), HALF).weight
    assert torch.isfinite(result).all()
    assert (result[:, :5] == 0).all()
    assert ((result == 0).sum(1) == 32).all()


@pytest.mark.parametrize("options", [{"rho": 0.0}, {"max_iter": -1}, {"update_iter": 0}, {"mask_scope": "tile"},
                                     {"damp": -1.0}])
def test_alps_bad_options_are_refused(options):
    with pytest.raises(SecateurError, match="alps"):
        get_method("alps", **options)


# --- TRIM pieces --------------------------------------------------------------------------------

def test_output_quality_matches_the_outputs_themselves():
    x, w = realistic_layer(rows=12, cols=32, tokens=100, seed=30)
    pruned = w.masked_fill(prune_mask(w.abs(), HALF), 0.0)
    stats = LinearStats(32, frozenset({"gram"}))
    stats.update(x)
    per_row, layer = OutputQuality(w, stats.gram)(pruned)
    y, y_pruned = x.double() @ w.double().T, x.double() @ pruned.double().T
    expected_rows = torch.nn.functional.cosine_similarity(y, y_pruned, dim=0)
    torch.testing.assert_close(per_row, expected_rows, rtol=0, atol=1e-5)
    assert layer == pytest.approx(float(torch.nn.functional.cosine_similarity(y.flatten(), y_pruned.flatten(),
                                                                              dim=0)), abs=1e-6)


def test_recentre_keeps_the_mean_and_the_bounds():
    values = torch.tensor([0.1, 0.5, 0.9, 1.2, -0.3], dtype=torch.float64)
    out = recentre(values, 0.5, 0.95)
    assert float(out.mean()) == pytest.approx(0.5, abs=1e-12)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 0.95
    assert torch.equal(torch.argsort(out, stable=True), torch.argsort(values.clamp(0, 0.95), stable=True))


def test_row_counts_hand_example():
    # Wanted 0.25·8, 0.55·8, 0.7·8 = 2, 4.4, 5.6 → floors 2, 4, 5 = 11; a total of 12 gives the
    # one extra weight to the largest remainder (row 2, 0.6).
    counts = row_counts(torch.tensor([0.25, 0.55, 0.7]), total=12, cols=8, cap=7)
    assert counts.tolist() == [2, 4, 6]
    # Over the cap: rows are clipped and the rest goes to the others.
    assert row_counts(torch.tensor([1.0, 0.0]), total=9, cols=8, cap=7).tolist() == [7, 2]
    with pytest.raises(SecateurError, match="cannot remove"):
        row_counts(torch.tensor([0.5, 0.5]), total=15, cols=8, cap=7)


@pytest.mark.parametrize("sparsity", [0.5, 0.63])
def test_trim_rows_average_exactly_to_the_target_and_improve_on_uniform(sparsity):
    x, w = realistic_layer(rows=48, cols=96, tokens=400, seed=40)
    wanda = get_method("wanda")
    stats = LinearStats(96, wanda.needs | {"gram"})
    stats.update(x)
    target = SparsityTarget.unstructured(sparsity)
    outcome = trim_search(lambda counts: wanda.prune(w, None, stats, dataclasses.replace(target, row_counts=counts)),
                          w, stats.gram, sparsity)
    zeros = (outcome.result.weight == 0).sum(1)
    assert torch.equal(zeros, outcome.counts)
    assert int(zeros.sum()) == int(sparsity * w.numel())  # floor(s · numel): the target within one weight
    assert int(zeros.min()) >= 0 and int(zeros.max()) < 96
    assert len(set(zeros.tolist())) > 2  # rows really differ
    assert outcome.learning_rate is not None
    assert 1 - outcome.quality < 1 - outcome.uniform_quality  # TRIM's loss is lower than uniform rows'
    # The quality reported is the real one of the result.
    assert OutputQuality(w, stats.gram)(outcome.result.weight)[1] == pytest.approx(outcome.quality, abs=1e-12)


def test_trimmed_method_wraps_any_method_and_reports_its_name_and_needs():
    wanda = get_method("wanda")
    trimmed = with_row_allocation(wanda, "trim")
    assert isinstance(trimmed, TrimmedMethod) and trimmed.name == "wanda"
    assert trimmed.needs == frozenset({"sumsq", "gram"})
    assert with_row_allocation(wanda, "uniform") is wanda
    x, w = realistic_layer(rows=32, cols=64, tokens=300, seed=50)
    stats = stats_for(trimmed, x)
    result = trimmed.prune(w, None, stats, SparsityTarget.unstructured(0.6), layer=NORMED).weight
    assert int((result == 0).sum()) == int(0.6 * w.numel())
    with pytest.raises(SecateurError, match="unstructured"):
        trimmed.prune(w, None, stats, TWO_FOUR, layer=NORMED)


@pytest.mark.parametrize("name", ["sparsegpt", "alps", "stade", "magnitude"])
def test_methods_honour_per_row_counts(name):
    x, w = realistic_layer(rows=16, cols=64, tokens=200, seed=60)
    method = get_method(name)
    counts = tuple(range(10, 42, 2))
    target = dataclasses.replace(SparsityTarget.unstructured(0.5), row_counts=counts)
    result = method.prune(w, None, stats_for(method, x), target).weight
    assert (result == 0).sum(1).tolist() == list(counts)


def test_sparsegpt_with_uniform_row_counts_is_plain_sparsegpt():
    x, w = realistic_layer(rows=16, cols=64, tokens=200, seed=61)
    method = get_method("sparsegpt", blocksize=16)
    stats = stats_for(method, x)
    uniform = dataclasses.replace(HALF, row_counts=(32,) * 16)
    assert torch.equal(method.prune(w, None, stats, uniform).weight, method.prune(w, None, stats, HALF).weight)


def test_trim_with_sparsegpt_and_alps_beats_their_uniform_rows():
    x, w = realistic_layer(rows=32, cols=64, tokens=300, seed=70)
    target = SparsityTarget.unstructured(0.75)  # 48 per row: uniform rows are the plain method's own
    for name in ("sparsegpt", "alps"):
        trimmed = TrimmedMethod(get_method(name))
        stats = stats_for(trimmed, x)
        plain = trimmed.method.prune(w, None, stats, target).weight
        result = trimmed.prune(w, None, stats, target, layer=NORMED).weight
        quality = OutputQuality(w, stats.gram)
        assert quality(result)[1] >= quality(plain)[1] - 1e-12, name
        assert int((result == 0).sum()) == int(0.75 * w.numel())


@dataclasses.dataclass
class _UniformOnly:
    """A method that ignores per-row counts (prunes floor(s·in) per row whatever it is told)."""

    name = "uniform-only"
    needs = frozenset({"sumsq"})

    def prune(self, weight, bias, stats, target):
        plain = SparsityTarget.unstructured(target.sparsity)
        return PruneResult(weight.masked_fill(prune_mask(weight.abs(), plain), 0.0))


def test_trim_refuses_a_method_that_ignores_row_counts():
    x, w = realistic_layer(rows=32, cols=64, tokens=300, seed=80)
    trimmed = TrimmedMethod(_UniformOnly())
    with pytest.raises(SecateurError, match="does not honour per-row sparsities"):
        trimmed.prune(w, None, stats_for(trimmed, x), SparsityTarget.unstructured(0.6), layer=NORMED)


# --- Recipes ----------------------------------------------------------------------------------

def test_allocations_parse_and_split_into_block_and_row_parts():
    both = Recipe(method="wanda", sparsity=0.6, allocation="owl+trim")
    assert (both.block_allocation, both.row_allocation) == ("owl", "trim")
    assert (Recipe(allocation="trim").block_allocation, Recipe(allocation="trim").row_allocation) == ("uniform", "trim")
    assert Recipe(allocation="owl").row_allocation == "uniform"
    assert Recipe(method="magnitude", allocation="trim").needs_calibration  # TRIM reads XᵀX
    assert Recipe.from_dict(both.to_dict()) == both


@pytest.mark.parametrize("allocation", ["trim", "owl+trim"])
def test_trim_with_n_m_is_refused_in_one_line(allocation):
    with pytest.raises(SecateurError, match=re.escape(f"--allocation {allocation} works with unstructured")) as error:
        Recipe(sparsity_type="2:4", allocation=allocation)
    assert "\n" not in str(error.value)


def test_unknown_allocation_lists_the_accepted_ones():
    with pytest.raises(SecateurError, match="uniform, owl, trim, owl\\+trim"):
        Recipe(allocation="trim+owl")


# --- End to end on tiny models of every family ------------------------------------------------

def prune_tiny_half(arch: str, method: str, kind: str, options: dict) -> None:
    """Prune a tiny model of `arch` to 50 % (`kind`: unstructured or 2:4): the pattern holds in every
    targeted layer, the report says 50 %, the model still computes."""
    model = build_tiny_model(arch)
    recipe = Recipe(method=method, sparsity=0.5, sparsity_type=kind, method_options=options)
    _, report = secateur.prune(model, recipe, calibration_ids(model), progress=False)
    for key, weight in targeted_weights(model).items():
        if kind == "2:4":
            assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all(), key
        else:
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), key
    assert report.sparsity_achieved == pytest.approx(0.5, abs=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calibration_ids(model, 1)).logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_alps_prunes_every_family(arch):
    # Unstructured on half the families, 2:4 on the others (the layer tests cover both kinds in
    # depth); 15 ADMM iterations keep the run short, the wiring is what is tested here.
    prune_tiny_half(arch, "alps", "unstructured" if TINY_ARCHS.index(arch) % 2 else "2:4", {"max_iter": 15})


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_trim_prunes_every_family_with_uneven_rows_and_the_exact_layer_sparsity(arch):
    model = build_tiny_model(arch)
    recipe = Recipe(method="wanda", sparsity=0.6, allocation="trim")
    _, report = secateur.prune(model, recipe, calibration_ids(model), progress=False)
    uneven = False
    for key, weight in targeted_weights(model).items():
        zeros = (weight == 0).sum(1)
        assert int(zeros.sum()) == int(0.6 * weight.numel()), key
        assert int(zeros.max()) < weight.shape[1], key
        uneven |= len(set(zeros.tolist())) > 1
    assert uneven
    assert report.sparsity_achieved == pytest.approx(0.6, abs=1e-3)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calibration_ids(model, 1)).logits).all()


def test_owl_plus_trim_spreads_blocks_and_rows():
    model = build_tiny_model("llama")
    recipe = Recipe(method="wanda", sparsity=0.6, allocation="owl+trim", owl_lambda=0.1, owl_threshold=2.0)
    _, report = secateur.prune(model, recipe, calibration_ids(model, nsamples=4, seqlen=64), progress=False)
    assert sum(report.block_sparsity) / len(report.block_sparsity) == pytest.approx(0.6, abs=1e-6)
    assert max(report.block_sparsity) - min(report.block_sparsity) > 0.0  # OWL ran
    rows_uneven = [len(set((w == 0).sum(1).tolist())) > 1 for w in targeted_weights(model).values()]
    assert any(rows_uneven)  # TRIM ran


def test_trim_is_named_in_reports_and_refused_by_the_llm_compressor_export():
    from secateur.interop import check_exportable
    from secateur.report import series_label

    assert series_label({"method": "wanda", "allocation": "owl+trim"}) == "wanda +owl+trim"
    assert series_label({"method": "wanda", "allocation": "trim"}) != series_label({"method": "wanda"})
    with pytest.raises(SecateurError, match="no per-row allocation"):
        check_exportable(Recipe(method="sparsegpt", allocation="trim"))
