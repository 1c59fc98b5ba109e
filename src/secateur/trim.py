"""TRIM (Beck et al., 2025): give the rows of a layer different sparsities, so that no output loses much.

A uniform per-row sparsity damages some output dimensions far more than others; TRIM moves
sparsity from the rows whose outputs suffer most to the rows that hardly notice. Quality is
the cosine similarity between each row's dense and pruned outputs over the calibration tokens,
computed from XᵀX (the `gram` statistic) without the tokens themselves:

    ⟨y_i, y'_i⟩ = w_i G w'_iᵀ,   ‖y_i‖² = w_i G w_iᵀ       (G = XᵀX, y_i = X w_iᵀ)

Starting from uniform rows x = s, each iteration adds to every row's sparsity its quality
min–max normalised onto [0, 2·lr] and centred (better rows take more), then shifts all rows by
one common amount, clipped to [0, 0.95], so that the mean stays s. Of ten iterations the
allocation with the best cosine similarity of the whole layer output is kept (the uniform one
if none beats it). Learning rates 0.01, 0.02, 0.04, 0.08, 0.12, 0.16 are tried in turn until
one does worse than the one before; if none beats uniform, −0.01, −0.02, −0.04 likewise. These
are the paper's defaults (quality "cosim", layer metric "cosim_flat", 10 iterations).

Exactness (decision): the paper floors s_i·in per row, so a layer can end below its target;
here the rows' counts are rounded to integers that add up to exactly floor(s · numel), largest
remainders first, so the layer's sparsity is the target within one weight.

Any per-layer method can be allocated this way: TRIM hands it a target with per-row counts
(`SparsityTarget.row_counts`) and measures what it returns, so the search sees the method's
real output, weight updates included (SparseGPT's). That costs one call of the method per
candidate (about 20 to 60 per layer). A method whose call is expensive may offer
`trim_scores(weight, stats)`, the ranking it would start from: the search then prunes by that
ranking without updates, and the method runs twice, with the counts found and with uniform
rows, keeping the better by the same quality (ALPS does this), so TRIM never does worse than
uniform rows on its own measure.
Biases a method returns (STADE) are left out of the quality, as in the paper, which measures
the linear part. N:M fixes every group's count: TRIM does not apply to it.

With OWL (`owl+trim`), OWL sets each block's sparsity and TRIM spreads it over each layer's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from secateur.errors import SecateurError
from secateur.masks import count_to_prune, prune_mask
from secateur.methods.base import LayerInfo, Method, MethodWrapper, PruneResult, SparsityTarget, prune_layer
from secateur.stats import LinearStats

TRIM_NEEDS = frozenset({"gram"})  # statistics the quality needs, on top of the method's
LEARNING_RATES = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
NEGATIVE_LEARNING_RATES = (-0.01, -0.02, -0.04)  # tried only when no positive rate beats uniform
ITERATIONS = 10
MAX_ROW_SPARSITY = 0.95  # no row is pruned beyond this (unless the target itself is higher)
_NORMALISE_EPS = 1e-6  # the paper's guard in the min-max normalisation of the row qualities


class OutputQuality:
    """Cosine similarity between the dense and a pruned layer's outputs, per row and over the
    whole output, from the inputs' Gram matrix."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor):
        self.weight = weight.detach().to(torch.float32)
        self.gram = gram.to(torch.float32)
        dense_times_gram = weight.detach().to(torch.float64) @ gram.to(torch.float64)
        self.dense_times_gram = dense_times_gram
        self.dense_energy = (dense_times_gram * weight.detach().to(torch.float64)).sum(1)  # ‖y_i‖²

    def __call__(self, pruned: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(per-row cosine similarities, cosine similarity of the flattened output)."""
        # Through the error E = W − W′, so that float32 only touches the small term ‖XEᵀ‖².
        error = self.weight - pruned.to(torch.float32)
        cross = (self.dense_times_gram * error.to(torch.float64)).sum(1)  # ⟨y_i, X e_iᵀ⟩
        error_energy = ((error @ self.gram) * error).sum(1).to(torch.float64)
        kept = self.dense_energy - cross  # ⟨y_i, y′_i⟩
        pruned_energy = (self.dense_energy - 2 * cross + error_energy).clamp_min(0.0)  # ‖y′_i‖²
        norms = (self.dense_energy * pruned_energy).sqrt()
        rows = torch.where(norms > 0, kept / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        rows = torch.where(self.dense_energy > 0, rows, 1.0).clamp(-1.0, 1.0)  # a silent row loses nothing
        total = float((self.dense_energy.sum() * pruned_energy.sum()).sqrt())
        layer = float(kept.sum()) / total if total > 0 else float(self.dense_energy.sum() == 0)
        return rows, layer


def recentre(values: torch.Tensor, mean: float, high: float) -> torch.Tensor:
    """clamp(values + τ, 0, high) with the one shift τ that makes the mean `mean` (0 <= mean <= high)."""
    low_shift, high_shift = -float(values.max()), high - float(values.min())
    for _ in range(64):  # bisection on a monotone function of τ: 64 halvings reach float64's resolution
        shift = (low_shift + high_shift) / 2
        if float((values + shift).clamp(0.0, high).mean()) < mean:
            low_shift = shift
        else:
            high_shift = shift
    return (values + (low_shift + high_shift) / 2).clamp(0.0, high)


def row_counts(sparsities: torch.Tensor, total: int, cols: int, cap: int) -> torch.Tensor:
    """Integers near sparsities·cols, each in [0, cap], adding up to exactly `total`.

    Rows are rounded down, then the rows with the largest remainders get one more (fewest
    removed from the smallest remainders if the floors overshoot); ties go to the lower row.
    """
    wanted = sparsities.to(torch.float64) * cols
    counts = wanted.floor().clamp(0, cap).long()
    remainder = wanted - counts
    while (missing := total - int(counts.sum())) != 0:
        room = counts < cap if missing > 0 else counts > 0
        if not bool(room.any()):
            raise SecateurError(f"cannot remove {total} weights from {len(counts)} rows of {cols} with at most "
                                f"{cap} per row")
        priority = torch.where(room, remainder if missing > 0 else -remainder, -torch.inf)
        order = torch.argsort(priority, descending=True, stable=True)[: min(abs(missing), int(room.sum()))]
        counts[order] += 1 if missing > 0 else -1
        remainder[order] = 0.0
    return counts


@dataclass
class TrimOutcome:
    result: PruneResult
    counts: torch.Tensor  # weights removed per row
    quality: float  # cosine similarity of the layer output, dense vs pruned
    uniform_quality: float  # the same for uniform rows
    learning_rate: float | None  # None: uniform rows were best


def trim_search(
    prune: Callable[[tuple[int, ...]], PruneResult],
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float,
    *,
    search: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
) -> TrimOutcome:
    """TRIM's allocation for one layer: `prune(counts)` prunes it with `counts[i]` weights removed
    from row i; `search(counts)`, if given, is a cheaper pruned weight to judge candidates by
    (then `prune` runs twice: with the best counts and with uniform rows, and the better wins)."""
    rows, cols = weight.shape
    total = count_to_prune(sparsity, rows * cols)
    high = max(MAX_ROW_SPARSITY, sparsity)
    cap = min(cols, max(int(high * cols), -(-total // rows)))
    quality = OutputQuality(weight, gram)
    best: dict = {"quality": -torch.inf, "counts": None, "result": None, "rate": None}  # over every rate

    def evaluate(x: torch.Tensor, rate: float | None) -> tuple[torch.Tensor, float]:
        counts = tuple(row_counts(x, total, cols, cap).tolist())
        result = None if search else prune(counts)
        per_row, layer = quality(search(counts) if search else result.weight)
        if layer > best["quality"]:  # strictly better: uniform rows win ties
            best.update(quality=layer, counts=counts, result=result, rate=rate)
        return per_row, layer

    uniform = torch.full((rows,), float(sparsity), dtype=torch.float64)
    uniform_rows, uniform_quality = evaluate(uniform, None)
    if rows > 1 and 0 < total and sparsity < high:
        for rates in (LEARNING_RATES, NEGATIVE_LEARNING_RATES):
            previous = -torch.inf
            for rate in rates:
                score = _iterate(evaluate, uniform, uniform_rows, rate, float(sparsity), high)
                if score <= previous:
                    break
                previous = score
            if best["rate"] is not None:
                break
    if search is not None:  # judged by a stand-in so far: the method's own output decides against uniform rows
        finalists = [(tuple(row_counts(uniform, total, cols, cap).tolist()), None), (best["counts"], best["rate"])]
        best["quality"] = -torch.inf
        for counts, rate in dict(finalists).items():
            result = prune(counts)
            layer = quality(result.weight)[1]
            uniform_quality = layer if rate is None else uniform_quality
            if layer > best["quality"]:
                best.update(quality=layer, counts=counts, result=result, rate=rate)
    return TrimOutcome(best["result"], torch.tensor(best["counts"]), best["quality"], uniform_quality, best["rate"])


def _iterate(evaluate, uniform, uniform_rows, rate, sparsity, high) -> float:
    """ITERATIONS steps at one learning rate from uniform rows; the best layer quality seen."""
    x, per_row, best = uniform.clone(), uniform_rows, -torch.inf
    for _ in range(ITERATIONS):
        spread = (per_row - per_row.min()) / (per_row.max() - per_row.min() + _NORMALISE_EPS) * (2 * rate)
        x = recentre(x + spread - spread.mean(), sparsity, high)
        per_row, layer = evaluate(x, rate)
        best = max(best, layer)
    return best


@dataclass(frozen=True)
class TrimmedMethod(MethodWrapper):
    """A per-layer method whose rows get TRIM's sparsities: to the engine, one more method."""

    @property
    def extra_needs(self) -> frozenset[str]:
        return TRIM_NEEDS

    def prune(self, weight, bias, stats: LinearStats, target: SparsityTarget,
              layer: LayerInfo | None = None) -> PruneResult:
        if target.kind != "unstructured":
            raise SecateurError(f"--allocation trim spreads an unstructured sparsity over rows; {target.n}:"
                                f"{target.m} fixes every group's count: use --allocation uniform")
        if stats is None or stats.gram is None or stats.count == 0:
            raise SecateurError("--allocation trim needs the input Gram matrix of at least one calibration token")
        def prune(counts: tuple[int, ...]) -> PruneResult:
            result = prune_layer(self.method, weight, bias, stats, _with_counts(target, counts), layer)
            zeros = (result.weight == 0).sum(1)
            if bool((zeros < torch.tensor(counts)).any()):
                raise SecateurError(f"method {self.name!r} does not honour per-row sparsities, which --allocation "
                                    "trim needs; use --allocation uniform or owl with it")
            return result

        search = None
        if hasattr(self.method, "trim_scores"):
            scores = self.method.trim_scores(weight, stats)

            def search(counts: tuple[int, ...]) -> torch.Tensor:
                return weight.masked_fill(prune_mask(scores, _with_counts(target, counts)), 0.0)
        return trim_search(prune, weight, stats.gram, target.sparsity, search=search).result


def _with_counts(target: SparsityTarget, counts: tuple[int, ...]) -> SparsityTarget:
    return dataclasses.replace(target, scope="row", row_counts=counts)


def with_row_allocation(method: Method, row_allocation: str) -> Method:
    """`method` as the engine runs it under the recipe's `row_allocation` ("trim" wraps it)."""
    return TrimmedMethod(method) if row_allocation == "trim" else method
