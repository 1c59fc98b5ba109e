"""Run a structured method (Putri, FLAP, wanda-sp, block-drop) and describe the model it leaves.

Structured methods differ in their flow — Putri prunes FFNs block by block and then heads,
FLAP scores everything on the dense model and applies one global threshold, block-drop
measures each block once — so no loop is imposed here: the method receives the same
`BlockSession` the unstructured engine loops over (`engine/session.py`) and drives it
(`start_pass`, `gather`, `advance`, `calibration_nll`; `replay`/`complete` for its resumable
steps). This module only times the run and reports parameters and shapes before and after.
"""

from __future__ import annotations

import time

from secateur.engine.memory import PeakMemory
from secateur.engine.session import BlockSession, PruneReport
from secateur.errors import SecateurError
from secateur.models.base import Adapter


def prune_structured(model, adapter: Adapter, method, recipe, input_ids, *, device="cpu", progress=True,
                     work_dir=None, world=None, stream=None) -> PruneReport:
    """Run a structured method and describe the model it leaves: parameters before and after
    (decoder blocks only, as `--sparsity` counts them) and every block's kept shape.
    `work_dir` (`engine.workdir.WorkDir`): keep the method's completed steps there, and take up
    those an interrupted run completed. `world`: this process's `engine.distributed.World`
    under torchrun. `stream`: the `StreamedModel` whose skeleton `model` is (`prune --stream`)."""
    if input_ids is None:
        raise SecateurError(f"method {recipe.method!r} needs calibration data; give --calib")
    start = time.perf_counter()
    session = BlockSession(model, adapter, input_ids, device=device, progress=progress, work_dir=work_dir,
                           world=world, stream=stream)
    params_before = adapter.count_block_params()
    blocks_before = len(adapter.blocks())
    ffn_width_before = max(shape.ffn_width for shape in adapter.block_shapes())  # the dense width, for kept fractions
    with PeakMemory(device) as memory:
        try:
            details = method.prune_model(session, recipe.sparsity) or {}
        finally:
            session.close()
    report = PruneReport(warnings=session.warnings)
    report.memory_mb = memory.result()
    session.describe_world(report)
    report.timings_s = session.timings_s(start)
    # Whatever no phase covers is the method's own work: scores, selections, slicing, refits.
    report.timings_s["pruning"] = round(report.timings_s["total"] - sum(session.timer.totals.values()), 3)
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
