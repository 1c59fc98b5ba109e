"""Prune a model block by block, as the reference methods do.

For each decoder block, in order:
  1. forward hooks on its targeted linears gather the statistics the method needs,
     in one pass of the block over every calibration window;
  2. the method prunes each linear from its weight, bias and statistics;
  3. the pruned block is run again to produce the next block's inputs, so block l
     is calibrated on what the already pruned blocks < l produce.

The engine knows no method (it asks `method.needs` and calls `method.prune`, passing the
adapter's role of the layer to the methods that ask for it) and no architecture (it asks
the adapter). Only the current block is moved to the compute device; activations stay on
`storage` (the CPU by default).

OWL needs every block's outlier ratio before the first block is pruned, so with
`allocation: owl` a first, dense pass over all blocks gathers Wanda scores.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.allocation import OWL_NEEDS, block_outlier_ratio, owl_sparsities
from secateur.engine.capture import BlockCall, capture_block_inputs, run_block
from secateur.engine.memory import PeakMemory
from secateur.errors import SecateurError
from secateur.methods.base import LayerInfo, Method, SparsityTarget, prune_layer
from secateur.models.base import Adapter, LinearView
from secateur.recipe import Recipe
from secateur.stats import OUTPUT_STATISTICS, LinearStats


@dataclass
class PruneReport:
    layers: list[dict] = field(default_factory=list)  # name, shape, sparsity, (bias_compensation)
    block_sparsity: list[float] = field(default_factory=list)  # target per block
    owl_outlier_ratios: list[float] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)  # peak RSS of the pruning phase (and CUDA peak)
    warnings: list[str] = field(default_factory=list)
    # Structured methods: parameters before/after, per-block shapes, removed blocks.
    structure: dict | None = None

    @property
    def sparsity_achieved(self) -> float:
        if self.structure is not None:  # fraction of the decoder blocks' parameters removed
            return 1.0 - self.structure["params_after"] / self.structure["params_before"]
        zeros = sum(layer["zeros"] for layer in self.layers)
        total = sum(layer["params"] for layer in self.layers)
        return zeros / total if total else 0.0


class _Timer:
    """Accumulates wall time per phase; synchronises CUDA so GPU work is not misattributed."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                timer._sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer._sync()
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.start

        return _Phase()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def targeted_linears(adapter: Adapter, block: nn.Module, index: int, ignore: tuple[str, ...]) -> dict[str, LinearView]:
    """The block's prunable linears minus those matching an --ignore pattern.

    Patterns are globs over "blocks.<index>.<name>" (e.g. "*.mlp.down_proj", "blocks.0.*")
    so they read the same for every architecture's naming.
    """
    views = adapter.linears(block)
    return {
        name: view
        for name, view in views.items()
        if not any(fnmatch.fnmatchcase(f"blocks.{index}.{name}", pattern) for pattern in ignore)
    }


class SharedInputStats:
    """Hooks that feed each linear's `LinearStats`, computing each statistic once per input.

    q/k/v (and gate/up) receive the very same input tensor; their statistics are identical,
    and for SparseGPT's XᵀX computing them once instead of three times is most of the cost.
    Layers are matched by tensor identity (not address, which can be reused after a free).
    """

    def __init__(self, views: dict[str, LinearView], needs: frozenset[str]):
        self.stats: dict[str, LinearStats] = {}
        self.owner: dict[str, str] = {}  # layer -> layer whose statistics it shares
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._needs = needs
        self._handles = [
            view.module.register_forward_hook(lambda _m, inputs, out, name=name: self._hook(name, inputs[0], out))
            for name, view in views.items()
        ]

    def _hook(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if name not in self.owner:  # first window: find who, if anyone, saw this tensor already
            # Output statistics differ per layer even for a shared input: never share those.
            shared = None if self._needs & OUTPUT_STATISTICS else next(
                (owner for seen, owner in self._seen if seen is x), None)
            self.owner[name] = shared or name
            if shared is None:
                self.stats[name] = LinearStats(x.shape[-1], self._needs)
        self._seen.append((x, name))
        if self.owner[name] == name:
            self.stats[name].update(x, y)

    def end_window(self) -> None:
        self._seen.clear()

    def close(self) -> dict[str, LinearStats]:
        for handle in self._handles:
            handle.remove()
        return {name: self.stats[owner] for name, owner in self.owner.items()}


@torch.no_grad()
def _gather_stats(
    block: nn.Module,
    views: dict[str, LinearView],
    needs: frozenset[str],
    hidden: list[torch.Tensor],
    call: BlockCall,
    device,
    replace_with_outputs: bool,
) -> dict[str, LinearStats]:
    """One pass of `block` over every window with hooks feeding `LinearStats`.

    With `replace_with_outputs`, each window's input is replaced by the block's output as we go
    (the pass then doubles as the forward to the next block; memory stays at one copy)."""
    gatherer = SharedInputStats(views, needs)
    try:
        for index, x in enumerate(hidden):
            out = run_block(block, x.to(device), call)
            gatherer.end_window()
            if replace_with_outputs:
                hidden[index] = out.to(x.device)
    finally:
        stats = gatherer.close()
    missing = sorted(set(views) - set(stats))
    if missing:
        raise SecateurError(f"layers {missing} were never called by their block; the adapter lists wrong layers")
    return stats


@torch.no_grad()
def _forward_all(block, hidden: list[torch.Tensor], call: BlockCall, device, index: int) -> None:
    """Replace every window's input by the block's output, one window at a time (one copy in memory)."""
    for position, x in enumerate(hidden):
        out = run_block(block, x.to(device), call).to(x.device)
        if not torch.isfinite(out).all():
            raise SecateurError(
                f"block {index} produced NaN or Inf activations on the calibration text; "
                "use --dtype float32, or check the model and the calibration data"
            )
        hidden[position] = out


def _owl_ratios(adapter, blocks, hidden, calls, recipe, device, bar) -> list[float]:
    """Dense pass: each block's fraction of outlier Wanda scores (OWL's layerwise outlier distribution)."""
    ratios = []
    for index, block in enumerate(blocks):
        block.to(device)
        views = targeted_linears(adapter, block, index, recipe.ignore)
        stats = _gather_stats(block, views, OWL_NEEDS, hidden, calls[index], device, True)
        layers = [(view.get_weight().float(), stats[name]) for name, view in views.items()]
        ratios.append(block_outlier_ratio(layers, recipe.owl_threshold) if layers else 0.0)
        if str(device) != "cpu":
            block.to("cpu")
        bar.update(1)
    return ratios


def prune_model(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    recipe: Recipe,
    input_ids: torch.Tensor | None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> PruneReport:
    """Prune `model` in place following `recipe`; return what was done, how long it took and
    the peak memory of the pruning phase."""
    with PeakMemory(device) as memory:
        report = _prune_model(model, adapter, method, recipe, input_ids, device=device, progress=progress)
    report.memory_mb = memory.result()
    return report


def _prune_model(model, adapter, method, recipe, input_ids, *, device, progress) -> PruneReport:
    report = PruneReport()
    timer = _Timer(device)
    start = time.perf_counter()
    blocks = adapter.blocks()
    module_names = {module: name for name, module in model.named_modules()}
    needs_data = bool(method.needs) or recipe.allocation == "owl"
    if needs_data and input_ids is None:
        raise SecateurError(f"method {recipe.method!r} needs calibration data; give --calib")

    target = recipe.target()
    for index, block in enumerate(blocks):  # refuse an impossible N:M before any work
        for view in targeted_linears(adapter, block, index, recipe.ignore).values():
            target.check_layer(view.in_features, module_names[view.module])

    hidden: list[torch.Tensor] = []
    calls: list[BlockCall] = []
    if needs_data:
        with timer.phase("capture"):
            hidden, calls = capture_block_inputs(adapter, input_ids, device)

    sparsities = [recipe.sparsity] * len(blocks)
    if recipe.allocation == "owl":
        with timer.phase("owl_survey"), tqdm(total=len(blocks), desc="OWL outliers", disable=not progress) as bar:
            report.owl_outlier_ratios = _owl_ratios(adapter, blocks, hidden, calls, recipe, device, bar)
        sparsities = owl_sparsities(report.owl_outlier_ratios, recipe.sparsity, recipe.owl_lambda)
        with timer.phase("capture"):
            hidden, calls = capture_block_inputs(adapter, input_ids, device)
    report.block_sparsity = [recipe.target(s).sparsity for s in sparsities]

    with tqdm(total=len(blocks), desc=f"{recipe.method} blocks", unit="block", disable=not progress) as bar:
        for index, block in enumerate(blocks):
            block.to(device)
            views = targeted_linears(adapter, block, index, recipe.ignore)
            target = recipe.target(sparsities[index])

            stats: dict[str, LinearStats] = {}
            if method.needs:
                with timer.phase("calibration_forward"):
                    stats = _gather_stats(block, views, method.needs, hidden, calls[index], device, False)
                for name in views:
                    stats[name].check_finite(module_names[views[name].module])
            with timer.phase("pruning"):
                for name, view in views.items():
                    _prune_linear(adapter, block, name, view, method, stats.get(name), target, report, module_names)
            if needs_data and index + 1 < len(blocks):
                with timer.phase("calibration_forward"):
                    _forward_all(block, hidden, calls[index], device, index)
            if str(device) != "cpu":
                block.to("cpu")
            bar.update(1)

    report.timings_s = {k: round(v, 3) for k, v in timer.totals.items()}
    report.timings_s.setdefault("calibration_forward", 0.0)
    report.timings_s.setdefault("pruning", 0.0)
    report.timings_s["total"] = round(time.perf_counter() - start, 3)
    return report


def _prune_linear(adapter, block, name, view, method, stats, target: SparsityTarget, report, module_names):
    full_name = module_names[view.module]
    weight = view.get_weight().float()
    bias = view.get_bias()
    layer = LayerInfo(role=adapter.layer_role(name))
    result = prune_layer(method, weight, None if bias is None else bias.float(), stats, target, layer)
    view.set_weight(result.weight)
    entry = {"name": full_name, "shape": [view.out_features, view.in_features]}
    if result.bias is not None:
        if adapter.ensure_bias(block, name):
            view = adapter.linears(block)[name]  # ensure_bias may have replaced the module's bias
            view.set_bias(result.bias)
            entry["bias_updated"] = True
        else:
            message = f"{full_name}: the architecture cannot hold a bias here; bias compensation skipped"
            if message not in report.warnings:
                report.warnings.append(message)
    zeros = int((view.get_weight() == 0).sum())
    params = view.out_features * view.in_features
    entry.update(zeros=zeros, params=params, sparsity=round(zeros / params, 6))
    report.layers.append(entry)
