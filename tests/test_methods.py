"""Pruning methods on small layers, checked against hand-computed values and invariants."""

import pytest
import torch

from secateur.errors import SecateurError
from secateur.methods import METHODS, SparsityTarget, get_method
from secateur.stats import LinearStats

ALL = ("magnitude", "wanda", "stade", "sparsegpt")


def stats_for(method, x: torch.Tensor) -> LinearStats:
    stats = LinearStats(x.shape[-1], method.needs)
    stats.update(x)
    return stats


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """X = Z @ A: mixed, strongly correlated columns with uneven scales, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols // 4, generator=gen)
    a = torch.randn(cols // 4, cols, generator=gen)
    scale = torch.rand(cols, generator=gen) * 2 + 0.2
    return (z @ a + 0.1 * torch.randn(tokens, cols, generator=gen)) * scale


# Hand-made 2×4 layer. Two calibration tokens give, per column (population statistics):
#   values (3,5) (1,-1) (2,2) (0,4) → mean μ = [4, 0, 2, 2], std σ = [1, 1, 0, 2],
#   norm ‖X_:,j‖ = [√34, √2, √8, 4].
W_HAND = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
B_HAND = torch.tensor([0.5, -1.0])
X_HAND = torch.tensor([[3.0, 1.0, 2.0, 0.0], [5.0, -1.0, 2.0, 4.0]])
HALF = SparsityTarget.unstructured(0.5)


def test_registry_has_every_method():
    assert set(ALL) <= set(METHODS)
    with pytest.raises(SecateurError, match="accepted"):
        get_method("nope")


def test_wanda_hand_example():
    # Scores |W|·norm: row 0 = [5.83, 2.83, 8.49, 16] → remove cols 1, 0;
    #                  row 1 = [23.3, 4.24, 5.66, 4]  → remove cols 3, 1.
    wanda = get_method("wanda")
    result = wanda.prune(W_HAND, B_HAND, stats_for(wanda, X_HAND), HALF)
    assert result.weight.tolist() == [[0.0, 0.0, 3.0, -4.0], [4.0, 0.0, -2.0, 0.0]]
    assert result.bias is None


def test_magnitude_hand_example_differs_from_wanda():
    magnitude = get_method("magnitude", scope="row")
    result = magnitude.prune(W_HAND, B_HAND, stats_for(magnitude, X_HAND), HALF)
    assert result.weight.tolist() == [[0.0, 0.0, 3.0, -4.0], [4.0, 3.0, 0.0, 0.0]]


def test_stade_hand_example_and_bias():
    # Scores |W|·σ: row 0 = [1, 2, 0, 8] → remove cols 2, 0; row 1 = [4, 3, 0, 2] → remove cols 2, 3.
    # Bias: row 0: 0.5 + 1·4 + 3·2 = 10.5; row 1: −1 + (−2)·2 + 1·2 = −3.
    stade = get_method("stade")
    result = stade.prune(W_HAND, B_HAND, stats_for(stade, X_HAND), HALF)
    assert result.weight.tolist() == [[0.0, -2.0, 0.0, -4.0], [4.0, 3.0, 0.0, 0.0]]
    assert result.bias.dtype == torch.float32
    assert result.bias.tolist() == [10.5, -3.0]
    # A layer without a bias gets one.
    assert stade.prune(W_HAND, None, stats_for(stade, X_HAND), HALF).bias.tolist() == [10.0, -2.0]


def test_stade_keeps_the_mean_output():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 48, generator=gen) * 0.5 + torch.rand(48, generator=gen) * 4 + 1  # means 1..5
    w = torch.randn(24, 48, generator=gen)
    b = torch.randn(24, generator=gen)
    stade = get_method("stade")
    result = stade.prune(w, b, stats_for(stade, x), HALF)
    xd = x.double()
    dense_mean = (xd @ w.double().T + b.double()).mean(0)
    pruned_mean = (xd @ result.weight.double().T + result.bias.double()).mean(0)
    uncompensated = (xd @ result.weight.double().T + b.double()).mean(0)
    assert torch.allclose(pruned_mean, dense_mean, atol=1e-4, rtol=0)
    assert (uncompensated - dense_mean).abs().max() > 1.0


def test_magnitude_default_is_layer_scope():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    result = get_method("magnitude").prune(w, None, LinearStats(4, frozenset()), HALF)
    assert result.weight.tolist() == [[0.0, 0.0, 0.0, 0.0], [10.0, 20.0, 30.0, 40.0]]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("magnitude", {"scope": "column"}),
        ("sparsegpt", {"mask_scope": "tile"}),
        ("sparsegpt", {"blocksize": 0}),
    ],
)
def test_bad_options_name_accepted_values(name, options):
    with pytest.raises(SecateurError):
        get_method(name, **options)


def _method(name):
    return get_method("magnitude", scope="row") if name == "magnitude" else get_method(name)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_exact_sparsity_per_row(name, sparsity):
    method = _method(name)
    x = correlated_inputs(200, 40, seed=2)
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    result = method.prune(w, None, stats_for(method, x), SparsityTarget.unstructured(sparsity))
    expected = int(sparsity * 40)  # 20 and 12
    assert ((result.weight == 0).sum(1) == expected).all()
    assert result.weight.shape == w.shape and result.weight.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_in_every_group(name, n, m):
    method = get_method(name)
    x = correlated_inputs(200, 64, seed=4)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    result = method.prune(w, None, stats_for(method, x), SparsityTarget.n_m(n, m))
    zeros = (result.weight == 0).reshape(16, 64 // m, m).sum(-1)
    assert (zeros == n).all()


@pytest.mark.parametrize("name", ["magnitude", "wanda", "stade"])
def test_metric_methods_keep_weights_unchanged(name):
    method = get_method(name)
    x = correlated_inputs(100, 32, seed=6)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    result = method.prune(w, None, stats_for(method, x), HALF)
    kept = result.weight != 0
    assert torch.equal(result.weight[kept], w[kept])
    assert int(kept.sum()) == w.numel() // 2


def _reconstruction_error(x, w, w_hat):
    return float((x @ w.T - x @ w_hat.T).norm())


@pytest.mark.parametrize("target", [HALF, SparsityTarget.n_m(2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda(target):
    x = correlated_inputs(384, 128, seed=8)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    errors = {}
    for name in ("wanda", "sparsegpt"):
        method = get_method(name)
        errors[name] = _reconstruction_error(x, w, method.prune(w, None, stats_for(method, x), target).weight)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"]


def test_sparsegpt_block_scope_exact_over_layer():
    method = get_method("sparsegpt", mask_scope="block", blocksize=16)
    x = correlated_inputs(200, 40, seed=10)
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(11))
    result = method.prune(w, None, stats_for(method, x), SparsityTarget.unstructured(0.3))
    assert int((result.weight == 0).sum()) == int(0.3 * 8 * 40)


def test_sparsegpt_rank_deficient_hessian_does_not_crash():
    # 24 tokens for 64 columns, and 5 columns that never fire.
    x = correlated_inputs(24, 64, seed=12)
    x[:, :5] = 0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(13))
    method = get_method("sparsegpt")
    result = method.prune(w, None, stats_for(method, x), HALF)
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, :5] == 0).all()  # dead columns are zeroed
    assert ((result.weight == 0).sum(1) >= 32).all()


def test_sparsegpt_raises_damping_until_cholesky_succeeds():
    # A Hessian with a negative eigenvalue (-0.05): damping 0.01·mean(diag) = 0.01 is not enough,
    # 0.1 is. The first attempt must be retried, not crash.
    gen = torch.Generator().manual_seed(14)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    eig = torch.ones(16, dtype=torch.float64)
    eig[0] = -0.05
    method = get_method("sparsegpt")
    stats = LinearStats(16, method.needs, count=2, gram=q @ torch.diag(eig) @ q.T)  # H = (2/2)·gram
    w = torch.randn(4, 16, generator=gen)
    result = method.prune(w, None, stats, HALF)
    assert torch.isfinite(result.weight).all()
    assert ((result.weight == 0).sum(1) == 8).all()


def test_sparsegpt_hopeless_hessian_raises_secateur_error():
    method = get_method("sparsegpt")
    stats = LinearStats(8, method.needs, count=1, gram=-torch.eye(8, dtype=torch.float64))
    with pytest.raises(SecateurError, match="singular"):
        method.prune(torch.randn(4, 8), None, stats, HALF)


def test_sparsegpt_merged_stats_equal_one_pass():
    # Small integers: every float32 partial sum is exact, so the two Gram matrices are identical.
    gen = torch.Generator().manual_seed(15)
    x = torch.randint(-3, 4, (300, 32), generator=gen).float()
    w = torch.randn(8, 32, generator=gen)
    method = get_method("sparsegpt", blocksize=8)
    one = stats_for(method, x)
    merged = stats_for(method, x[:120]).merge(stats_for(method, x[120:]))
    a = method.prune(w, None, one, HALF).weight
    b = method.prune(w, None, merged, HALF).weight
    assert torch.equal(a, b)
    assert not torch.equal(a[a != 0], w[a != 0])  # the kept weights were really updated


def test_sparsegpt_hand_example_two_columns():
    # H = [[2, 1], [1, 2]], no damping. Pruning w0 is compensated optimally by w1 += w0·H01/H11:
    # row (1, 3): saliencies w²/U_jj² = 1/(2/3) = 1.5 and 9/(1/2) = 18 → prune col 0, w1 = 3.5.
    # row (3, 1): 13.5 and 2 → prune col 1, the last column, so nothing is updated.
    method = get_method("sparsegpt", damp=0.0)
    stats = LinearStats(
        2, method.needs, count=2, gram=torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    )
    result = method.prune(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), None, stats, HALF)
    assert torch.allclose(result.weight, torch.tensor([[0.0, 3.5], [3.0, 0.0]]), atol=1e-6)
    assert result.weight[0, 0] == 0 and result.weight[1, 1] == 0


@pytest.mark.parametrize("blocksize", [3, 4, 24])  # 3 is rounded up to 4; 24 leaves a partial last block
def test_sparsegpt_lazy_blocks_equal_column_by_column(blocksize):
    # For N:M the mask decisions happen at the same columns whatever the block size, so the lazy
    # block update must give the same result as updating every later column at once.
    x = correlated_inputs(256, 64, seed=16)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(17))
    target = SparsityTarget.n_m(2, 4)
    small = get_method("sparsegpt", blocksize=blocksize)
    whole = get_method("sparsegpt", blocksize=64)
    a = small.prune(w, None, stats_for(small, x), target).weight
    b = whole.prune(w, None, stats_for(whole, x), target).weight
    assert torch.equal(a == 0, b == 0)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
