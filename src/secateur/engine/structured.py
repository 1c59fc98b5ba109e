"""Services the structured methods (Putri, FLAP, wanda-sp, block-drop) are built from.

Structured methods differ in their flow — Putri prunes FFNs block by block and then
heads globally, FLAP scores everything on the dense model and applies one global
threshold, block-drop measures each block once — so, unlike the unstructured engine,
this one does not impose a loop. It offers the same sequential primitives instead:
capture the first block's inputs, gather statistics of some layers of block i, run
block i to produce block i+1's inputs, and measure the model's calibration loss. Like
the rest of the engine it knows no method and no architecture: layers come from the
adapter, statistics are `LinearStats`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from secateur.engine.capture import BlockCall, capture_block_inputs, run_block
from secateur.engine.memory import PeakMemory
from secateur.engine.sequential import PruneReport, SharedInputStats
from secateur.errors import SecateurError
from secateur.models.base import Adapter, LinearView
from secateur.stats import LinearStats


class StructuredSession:
    def __init__(self, model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, *, device="cpu",
                 progress: bool = True):
        self.model = model
        self.adapter = adapter
        self.input_ids = input_ids
        self.device = device
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.hidden: list[torch.Tensor] = []
        self.calls: list[BlockCall] = []
        self.warnings: list[str] = []

    # --- timing ------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str):
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    # --- sequential primitives -----------------------------------------------------
    def start_pass(self) -> None:
        """(Re)capture the first block's inputs from the model as it is now."""
        with self.phase("capture"):
            self.hidden, self.calls = capture_block_inputs(self.adapter, self.input_ids, self.device)

    @contextmanager
    def on_device(self, block: nn.Module):
        block.to(self.device)
        try:
            yield block
        finally:
            if torch.device(self.device).type != "cpu":
                block.to("cpu")

    @torch.no_grad()
    def gather(self, index: int, views: dict[str, LinearView], needs: frozenset[str],
               advance: bool = False) -> dict[str, LinearStats]:
        """Statistics of `views` (layers of block `index`) over every calibration window.
        With `advance`, the same pass also replaces the inputs by the block's outputs."""
        block = self.adapter.blocks()[index]
        with self.phase("calibration_forward"), self.on_device(block):
            gatherer = SharedInputStats(views, needs)
            try:
                for position, x in enumerate(self.hidden):
                    out = run_block(block, x.to(self.device), self.calls[index])
                    gatherer.end_window()
                    if advance:
                        self.hidden[position] = self._checked(out, index).to(x.device)
            finally:
                stats = gatherer.close()
        for name, stat in stats.items():
            stat.check_finite(f"block {index} {name}")
        return stats

    @torch.no_grad()
    def advance(self, index: int, observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Run block `index` on every window; its outputs become the next block's inputs.
        `observe(input, output)` sees each window's pair (e.g. for block influence)."""
        block = self.adapter.blocks()[index]
        with self.phase("calibration_forward"), self.on_device(block):
            for position, x in enumerate(self.hidden):
                out = self._checked(run_block(block, x.to(self.device), self.calls[index]), index)
                if observe is not None:
                    observe(x.to(self.device), out)
                self.hidden[position] = out.to(x.device)

    def _checked(self, out: torch.Tensor, index: int) -> torch.Tensor:
        if not torch.isfinite(out).all():
            raise SecateurError(f"block {index} produced NaN or Inf activations on the calibration text; "
                                "use --dtype float32, or check the model and the calibration data")
        return out

    # --- whole-model loss ------------------------------------------------------------
    @torch.no_grad()
    def calibration_nll(self, windows: int = 1) -> float:
        """Mean next-token NLL of the whole model on the first `windows` calibration windows
        (the whole model goes to the device; used by searches that score by perplexity)."""
        self.model.to(self.device)
        total, count = 0.0, 0
        with self.phase("search_forward"):
            for ids in self.input_ids[:windows]:
                ids = ids.unsqueeze(0).to(self.device)
                logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum")
                total += float(loss)
                count += ids.shape[1] - 1
        if torch.device(self.device).type != "cpu":
            self.model.to("cpu")
        value = total / count
        if not math.isfinite(value):
            raise SecateurError("calibration loss is NaN or Inf; check the model and the calibration data")
        return value


def prune_structured(model, adapter: Adapter, method, recipe, input_ids, *, device="cpu", progress=True) -> PruneReport:
    """Run a structured method and describe the model it leaves: parameters before and after
    (decoder blocks only, as `--sparsity` counts them) and every block's kept shape."""
    if input_ids is None:
        raise SecateurError(f"method {recipe.method!r} needs calibration data; give --calib")
    start = time.perf_counter()
    session = StructuredSession(model, adapter, input_ids, device=device, progress=progress)
    params_before = adapter.count_block_params()
    blocks_before = len(adapter.blocks())
    ffn_width_before = max(shape.ffn_width for shape in adapter.block_shapes())  # the dense width, for kept fractions
    with PeakMemory(device) as memory:
        details = method.prune_model(session, recipe.sparsity) or {}
    report = PruneReport(warnings=session.warnings)
    report.memory_mb = memory.result()
    report.timings_s = {k: round(v, 3) for k, v in session.timings.items()}
    report.timings_s.setdefault("calibration_forward", 0.0)
    report.timings_s["pruning"] = round(time.perf_counter() - start - sum(session.timings.values()), 3)
    report.timings_s["total"] = round(time.perf_counter() - start, 3)
    report.structure = {
        "params_before": params_before,
        "params_after": adapter.count_block_params(),
        "blocks_before": blocks_before,
        "ffn_width_before": ffn_width_before,
        "blocks": [
            {"ffn_width": shape.ffn_width, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads}
            for shape in adapter.block_shapes()
        ],
    } | details
    return report
