"""Prune a model block by block, as the reference methods do.

For each decoder block, in order:
  1. forward hooks on its targeted linears gather the statistics the method needs,
     in one pass of the block over every calibration window;
  2. the method prunes each linear from its weight, bias and statistics;
  3. the pruned block is run again to produce the next block's inputs, so block l
     is calibrated on what the already pruned blocks < l produce.

The engine knows no method (it asks `method.needs` and calls `method.prune`) and no
architecture (it asks the adapter). Only the current block is moved to the compute
device; activations stay on `storage` (the CPU by default).

OWL needs every block's outlier ratio before the first block is pruned, so with
`allocation: owl` a first, dense pass over all blocks gathers Wanda scores.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.allocation import outlier_ratio, owl_sparsities
from secateur.engine.capture import BlockCall, capture_block_inputs, run_block
from secateur.errors import SecateurError
from secateur.methods.base import Method, SparsityTarget
from secateur.models.base import Adapter, LinearView
from secateur.recipe import Recipe
from secateur.stats import LinearStats


@dataclass
class PruneReport:
    layers: list[dict] = field(default_factory=list)  # name, shape, sparsity, (bias_compensation)
    block_sparsity: list[float] = field(default_factory=list)  # target per block
    owl_outlier_ratios: list[float] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def sparsity_achieved(self) -> float:
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


@torch.no_grad()
def _gather_stats(
    block: nn.Module,
    views: dict[str, LinearView],
    needs: frozenset[str],
    hidden: list[torch.Tensor],
    call: BlockCall,
    device,
    keep_outputs: bool,
) -> tuple[dict[str, LinearStats], list[torch.Tensor] | None]:
    """One pass of `block` over every window with hooks feeding `LinearStats`."""
    stats = {name: LinearStats(view.in_features, needs) for name, view in views.items()}
    handles = [
        view.module.register_forward_hook(lambda _m, inputs, _out, s=stats[name]: s.update(inputs[0]))
        for name, view in views.items()
    ]
    outputs = [] if keep_outputs else None
    try:
        for x in hidden:
            out = run_block(block, x.to(device), call)
            if keep_outputs:
                outputs.append(out.to(x.device))
    finally:
        for handle in handles:
            handle.remove()
    return stats, outputs


@torch.no_grad()
def _forward_all(block, hidden: list[torch.Tensor], call: BlockCall, device, index: int) -> list[torch.Tensor]:
    outputs = []
    for x in hidden:
        out = run_block(block, x.to(device), call).to(x.device)
        if not torch.isfinite(out).all():
            raise SecateurError(
                f"block {index} produced NaN or Inf activations on the calibration text; "
                "use --dtype float32, or check the model and the calibration data"
            )
        outputs.append(out)
    return outputs


def _owl_ratios(adapter, blocks, hidden, calls, recipe, device, bar) -> list[float]:
    """Dense pass: each block's fraction of outlier Wanda scores (OWL's layerwise outlier distribution)."""
    ratios = []
    for index, block in enumerate(blocks):
        block.to(device)
        views = targeted_linears(adapter, block, index, recipe.ignore)
        stats, hidden = _gather_stats(block, views, frozenset({"sumsq"}), hidden, calls[index], device, True)
        scores = [
            view.get_weight().float().abs() * stats[name].column_norm().to(view.get_weight().device).float()
            for name, view in views.items()
        ]
        ratios.append(outlier_ratio(scores, recipe.owl_threshold) if scores else 0.0)
        block.to("cpu") if str(device) != "cpu" else None
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
    log: Callable[[str], None] = lambda _msg: None,
) -> PruneReport:
    """Prune `model` in place following `recipe`; return what was done and how long it took."""
    report = PruneReport()
    timer = _Timer(device)
    start = time.perf_counter()
    blocks = adapter.blocks()
    module_names = {module: name for name, module in model.named_modules()}
    needs_data = bool(method.needs) or recipe.allocation == "owl"
    if needs_data and input_ids is None:
        raise SecateurError(f"method {recipe.method!r} needs calibration data; give --calib")

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
            for name, view in views.items():
                target.check_layer(view.in_features, module_names[view.module])

            stats: dict[str, LinearStats] = {}
            if method.needs:
                with timer.phase("calibration_forward"):
                    stats, _ = _gather_stats(block, views, method.needs, hidden, calls[index], device, False)
                for name in views:
                    stats[name].check_finite(module_names[views[name].module])
            with timer.phase("pruning"):
                for name, view in views.items():
                    _prune_linear(adapter, block, name, view, method, stats.get(name), target, report, module_names)
            if needs_data and index + 1 < len(blocks):
                with timer.phase("calibration_forward"):
                    hidden = _forward_all(block, hidden, calls[index], device, index)
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
    result = method.prune(weight, None if bias is None else bias.float(), stats, target)
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
