"""Prune a model block by block, as the reference methods do: a short loop over a `BlockSession`.

For each decoder block, in order:
  1. forward hooks on its targeted linears gather the statistics the method needs,
     in one pass of the block over every calibration window;
  2. the method prunes each linear from its weight, bias and statistics;
  3. the pruned block is run again to produce the next block's inputs, so block l
     is calibrated on what the already pruned blocks < l produce.

The engine knows no method (it asks `method.needs` and calls `method.prune`, passing the
adapter's role of the layer to the methods that ask for it) and no architecture (it asks
the adapter). Capture, statistics, advancing, device parking, timing and resume are the
session's (`engine/session.py`); each block is one resumable step ("prune/<index>") whose
state is the block's pruned weights and biases.

OWL needs every block's outlier ratio before the first block is pruned, so with
`allocation: owl` (or `owl+trim`) a first, dense pass over all blocks gathers Wanda scores (steps "owl/<index>").
"""

from __future__ import annotations

import fnmatch
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.allocation import OWL_NEEDS, block_outlier_ratio, owl_sparsities
from secateur.engine.distributed import LARGE_SUMS
from secateur.engine.memory import PeakMemory
from secateur.engine.regional import RegionalPlan
from secateur.engine.session import BlockSession, PruneReport
from secateur.errors import SecateurError
from secateur.methods.base import LayerInfo, Method, PruneResult, SparsityTarget, prune_layer
from secateur.models.base import Adapter, LinearView
from secateur.recipe import Recipe
from secateur.stats import LinearStats

__all__ = ["PruneReport", "prune_model", "targeted_linears"]


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


def prune_model(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    recipe: Recipe,
    input_ids: torch.Tensor | None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    work_dir=None,
    world=None,
    stream=None,
) -> PruneReport:
    """Prune `model` in place following `recipe`; return what was done, how long it took and
    the peak memory of the pruning phase. `work_dir` (`engine.workdir.WorkDir`): keep each
    completed block there, and take up the blocks an interrupted run completed. `world`: this
    process's `engine.distributed.World` under torchrun (see `BlockSession`: every rank prunes
    every layer from the all-reduced statistics). `stream`: the `StreamedModel` whose skeleton
    `model` is (`prune --stream`: one block in memory at a time)."""
    with PeakMemory(device) as memory:
        report = _prune_model(model, adapter, method, recipe, input_ids, device=device, progress=progress,
                              work_dir=work_dir, world=world, stream=stream)
    report.memory_mb = memory.result()
    return report


def _prune_model(model, adapter, method, recipe, input_ids, *, device, progress, work_dir, world,
                 stream) -> PruneReport:
    start = time.perf_counter()
    session = BlockSession(model, adapter, input_ids, device=device, progress=progress, work_dir=work_dir,
                           world=world, stream=stream)
    try:
        return _prune_blocks(session, method, recipe, input_ids, start, progress)
    finally:
        session.close()


def _prune_blocks(session: BlockSession, method, recipe, input_ids, start: float, progress: bool) -> PruneReport:
    adapter = session.adapter
    report = PruneReport(warnings=session.warnings)
    blocks = adapter.blocks()
    needs_data = bool(method.needs) or recipe.block_allocation == "owl"
    if needs_data and input_ids is None:
        raise SecateurError(f"method {recipe.method!r} needs calibration data; give --calib")

    target = recipe.target()
    for index, block in enumerate(blocks):  # refuse an impossible N:M before any work
        for view in targeted_linears(adapter, block, index, recipe.ignore).values():
            target.check_layer(view.in_features, session.layer_name(view))

    sparsities = [recipe.sparsity] * len(blocks)
    if recipe.block_allocation == "owl":
        with session.phase("owl_survey"), tqdm(total=len(blocks), desc="OWL outliers", disable=not progress) as bar:
            report.owl_outlier_ratios = _owl_ratios(session, recipe, bar)
        sparsities = owl_sparsities(report.owl_outlier_ratios, recipe.sparsity, recipe.owl_lambda)
    report.block_sparsity = [recipe.target(s).sparsity for s in sparsities]

    if needs_data:
        session.start_pass()
    with tqdm(total=len(blocks), desc=f"{recipe.method} blocks", unit="block", disable=not progress) as bar:
        for index in range(len(blocks)):
            step = f"prune/{index}"
            saved = session.replay(step)
            if saved is not None:  # completed by the interrupted run this one resumes
                with session.block(index) as block:
                    _restore_block(adapter, block, saved.tensors)
                report.layers.extend(saved.meta["layers"])
                bar.update(1)
                continue
            with session.block(index) as block:
                views = targeted_linears(adapter, block, index, recipe.ignore)
                target = recipe.target(sparsities[index])
                stats: dict[str, LinearStats] = {}
                if method.needs:
                    # Gram or cross matrices: under torchrun each layer is solved by one owner rank.
                    stats = session.gather(index, views, method.needs, owners=bool(method.needs & set(LARGE_SUMS)))
                # A regional method (Wanda++, or block_fit=K): block-level gradients (and the dense
                # outputs its fit needs) before pruning, the fit of the pruned block to the dense one after.
                regional = RegionalPlan.of(method)
                prepared = regional.prepare(session, index, block, views) if regional else None
                with session.phase("pruning"):
                    layers = [_prune_linear(session, block, name, view, method, stats.get(name), target,
                                            prepared.gradients.get(name) if prepared else None)
                              for name, view in views.items()]
                if prepared is not None:
                    regional.optimize(session, index, block, views, prepared)
                if needs_data and index + 1 < len(blocks):
                    session.advance(index)
                session.complete(step, _block_state(adapter, block, views), {"layers": layers})
            report.layers.extend(layers)
            bar.update(1)

    report.timings_s = session.timings_s(start)
    report.timings_s.setdefault("pruning", 0.0)
    session.describe_world(report)
    return report


def _owl_ratios(session: BlockSession, recipe: Recipe, bar) -> list[float]:
    """Dense pass: each block's fraction of outlier Wanda scores (OWL's layerwise outlier distribution)."""
    adapter = session.adapter
    count = len(adapter.blocks())
    session.start_pass()
    ratios = []
    for index in range(count):
        step = f"owl/{index}"
        saved = session.replay(step)
        if saved is None:
            with session.block(index) as block:
                views = targeted_linears(adapter, block, index, recipe.ignore)
                stats = session.gather(index, views, OWL_NEEDS, advance=index + 1 < count)
                layers = [(view.get_weight().float(), stats[name]) for name, view in views.items()]
                ratio = block_outlier_ratio(layers, recipe.owl_threshold) if layers else 0.0
            session.complete(step, meta={"ratio": ratio})
        else:
            ratio = saved.meta["ratio"]
        ratios.append(ratio)
        bar.update(1)
    return ratios


def _prune_linear(session: BlockSession, block, name, view, method, stats, target: SparsityTarget,
                  regional_grad: torch.Tensor | None = None) -> dict:
    """Prune one linear in place; returns its entry of the report. `regional_grad`: the layer's
    regional gradient, for a regional method (passed on in its `LayerInfo`)."""
    adapter = session.adapter
    full_name = session.layer_name(view)
    weight = view.get_weight().float()
    bias = view.get_bias()
    layer = LayerInfo(role=adapter.layer_role(name), regional_grad=regional_grad)
    result = (prune_layer(method, weight, None if bias is None else bias.float(), stats, target, layer)
              if session.solves(name) else None)  # torchrun's owner path: another rank solves it
    result = PruneResult(session.share_result(name, result and result.weight),
                         session.share_result(name, result and result.bias))
    view.set_weight(result.weight)
    entry = {"name": full_name, "shape": [view.out_features, view.in_features]}
    if result.bias is not None:
        if adapter.ensure_bias(block, name):
            view = adapter.linears(block)[name]  # ensure_bias may have replaced the module's bias
            view.set_bias(result.bias)
            entry["bias_updated"] = True
        else:
            message = f"{full_name}: the architecture cannot hold a bias here; bias compensation skipped"
            if message not in session.warnings:
                session.warnings.append(message)
    zeros = int((view.get_weight() == 0).sum())
    params = view.out_features * view.in_features
    entry.update(zeros=zeros, params=params, sparsity=round(zeros / params, 6))
    return entry


def _block_state(adapter: Adapter, block: nn.Module, views: dict[str, LinearView]) -> dict[str, torch.Tensor]:
    """The pruned linears' weights and biases, as stored (the step a resumed run restores)."""
    state = {}
    for name, view in adapter.linears(block).items():
        if name in views:
            state[f"{name}.weight"] = view.get_weight()
            if view.get_bias() is not None:
                state[f"{name}.bias"] = view.get_bias()
    return state


def _restore_block(adapter: Adapter, block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back what `_block_state` saved, with the biases bias compensation gave layers that had none."""
    for name in adapter.linears(block):
        if f"{name}.weight" not in state:
            continue
        if f"{name}.bias" in state:
            adapter.ensure_bias(block, name)
        view = adapter.linears(block)[name]
        view.set_weight(state[f"{name}.weight"])
        if f"{name}.bias" in state:
            view.set_bias(state[f"{name}.bias"])
