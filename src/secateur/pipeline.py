"""The steps `prune` and `sweep` share: evaluate a model under the chosen protocol, and
turn a pruning run into the results record (results.json, one line of a sweep); and what
`prune --out DIR [--resume]` adds around the pruning: the work directory where the run keeps
its progress (secateur.engine.workdir), the settings a resumed run must share with the run it
continues, and the removal of that directory once the checkpoint is in place.

Every record carries `"format": RESULTS_FORMAT`, which is how `secateur report` tells our
files from anything else.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_FORMAT = "secateur-results/1"
EVAL_FORMAT = "secateur-eval/1"  # `secateur eval --json`


@dataclass
class EvalOptions:
    """What to measure on the dense and the pruned model. Empty lists measure nothing."""

    datasets: list[str] = field(default_factory=list)  # perplexity
    seqlen: int | None = None  # perplexity window; None = the recipe's calibration seqlen
    max_windows: int | None = None
    data_dir: str | None = None
    tasks: list[str] = field(default_factory=list)  # zero-shot through lm-eval
    limit: int | None = None
    task_source: str = "local"
    batch_size: int = 16
    device: str = "cpu"
    quiet: bool = False

    def check(self) -> None:
        """Refuse unknown or unreadable datasets, unknown tasks and impossible counts before any
        long work starts."""
        from secateur.data import check_readable
        from secateur.errors import SecateurError

        for flag, value, least in (("--eval-seqlen / --seqlen", self.seqlen, 2), ("--max-windows", self.max_windows, 1),
                                   ("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise SecateurError(f"{flag} must be an integer >= {least}, got {value}")
        for name in self.datasets:
            check_readable(name, self.data_dir)
        if self.tasks:
            from secateur.eval.zeroshot import check_tasks

            check_tasks(self.tasks, self.task_source)


@contextlib.contextmanager
def loading_quietly(spec: str | None):
    """No progress bars while a local model (directory, .gguf, alias) loads: it takes seconds, and a
    check that fails right after loading must be the only line on stderr. Hub downloads keep theirs."""
    from transformers.utils import logging as hf_logging

    from secateur.models.loading import ALIASES

    local = spec is None or spec in ALIASES or Path(spec).expanduser().exists()
    if not local:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    real_tqdm = getattr(gguf_utils, "tqdm", None)
    if real_tqdm is not None:  # the GGUF de-quantization bar is plain tqdm, not transformers'
        gguf_utils.tqdm = functools.partial(real_tqdm, disable=True)
    try:
        yield
    finally:
        if real_tqdm is not None:
            gguf_utils.tqdm = real_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def evaluate_model(model, tokenizer, options: EvalOptions, *, seqlen: int, label: str) -> dict:
    """{"perplexity": {dataset: value}, "protocols": {dataset: protocol}, "zero_shot": summary | None};
    the model is left on the CPU."""
    from secateur.eval import perplexity

    values, protocols = {}, {}
    for name in options.datasets:
        result = perplexity(model, tokenizer, name, seqlen=seqlen, max_windows=options.max_windows,
                            data_dir=options.data_dir, device=options.device, progress=not options.quiet)
        values[name] = result["perplexity"]
        protocols[name] = result["protocol"]
        if not options.quiet:
            print(f"[{label}] {name}: perplexity {result['perplexity']:.3f}", file=sys.stderr)
    zero_shot = None
    if options.tasks:
        from secateur.eval.zeroshot import zero_shot as run_zero_shot

        model.to(options.device)
        zero_shot = run_zero_shot(model, tokenizer, options.tasks, limit=options.limit, source=options.task_source,
                                  batch_size=options.batch_size, device=options.device, quiet=options.quiet)
        if not options.quiet:
            print(f"[{label}] zero-shot mean acc {zero_shot['mean_acc']:.4f}", file=sys.stderr)
    if isinstance(model, torch.nn.Module):  # not a StreamedModel (--stream), which holds no block between uses
        model.to("cpu")
    return {"perplexity": values, "protocols": protocols, "zero_shot": zero_shot}


def peak_memory_mb(device: str) -> dict:
    """The whole process's peak (loading and evaluation included), beside the pruning phase's own."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = {"process_rss_peak_mb": round(rss_kb / 1024, 1)}
    if torch.device(device).type == "cuda":
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def versions() -> dict:
    import transformers

    from secateur import __version__

    return {"secateur": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def build_results(*, model_source: str, recipe, report, calibration, dense: dict | None, pruned: dict | None,
                  device: str, dtype: torch.dtype, started: float) -> dict:
    """The record of one pruning run; `dense`/`pruned` are `evaluate_model` outputs (or None)."""
    evaluations = {label: result for label, result in (("dense", dense), ("pruned", pruned)) if result}
    results = {
        "format": RESULTS_FORMAT,
        "model": model_source,
        "method": recipe.method,
        "sparsity_type": recipe.sparsity_type,
        "sparsity_target": recipe.nominal_sparsity,
        "sparsity_achieved": round(report.sparsity_achieved, 6),
        "allocation": recipe.allocation,
        "block_sparsity": [round(s, 6) for s in report.block_sparsity],
        "owl_outlier_ratios": report.owl_outlier_ratios,
        "layers": [{k: layer[k] for k in ("name", "shape", "sparsity") if k in layer}
                   | ({"bias_updated": True} if layer.get("bias_updated") else {}) for layer in report.layers],
        "structure": report.structure,
        "perplexity": {label: result["perplexity"] for label, result in evaluations.items()
                       if result["perplexity"]},
        "timings_s": report.timings_s | {"run_total": round(time.perf_counter() - started, 3)},
        "peak_memory_mb": report.memory_mb | peak_memory_mb(device),
        "protocol": {
            "calibration": calibration.protocol if calibration is not None else None,
            "evaluation": next((result["protocols"] for result in evaluations.values()), {}),
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "warnings": report.warnings,
        "world_size": report.world_size,
        "versions": versions(),
        "recipe": recipe.to_dict(),
    }
    if report.traffic_bytes is not None:  # torchrun: bytes each rank exchanged, per step
        results["traffic_bytes"] = report.traffic_bytes
    zero_shot = {label: result["zero_shot"] for label, result in evaluations.items() if result["zero_shot"]}
    if zero_shot:
        results["zero_shot"] = zero_shot
    return results


# --------------------------------------------------------------------------- resume


def check_resume(out: Path | None, resume: bool) -> Path | None:
    """Before the model is loaded: the work directory of a `prune --out` run (None without --out),
    refusing --resume without --out, and a leftover work directory without --resume."""
    from secateur.engine.workdir import check_work_dir
    from secateur.errors import SecateurError
    from secateur.outputs import resume_dir

    if out is None:
        if resume:
            raise SecateurError("--resume continues an interrupted `prune --out DIR`; give the same --out DIR")
        return None
    work_path = resume_dir(out)
    check_work_dir(work_path, resume=resume)
    return work_path


def open_work_dir(work_path: Path | None, *, resume: bool, model_spec: str | None, model, source: str, recipe,
                  calibration, dtype: torch.dtype, device: str):
    """Create the run's work directory, or with `resume` take up the interrupted run's one if
    it was made from the same settings (`resume_settings`); None without a work path."""
    from secateur.engine.workdir import WorkDir

    if work_path is None:
        return None
    settings = resume_settings(model_spec, model, source, recipe, calibration, dtype, device)
    work = WorkDir.open(work_path, settings, resume=resume)
    if resume:
        done = (f"taking up {work.resumed_steps} completed steps from {work_path}" if work.resumed_steps
                else f"nothing to resume in {work_path}; starting from the beginning")
        print(f"note: {done}", file=sys.stderr)
    return work


def prune_keeping_progress(model, recipe, calibration, *, work_dir, **options):
    """`secateur.prune` with the run's progress kept in `work_dir`. A refusal of the input on the
    way (NaN activations, an impossible target) removes it: resuming would fail the same way."""
    from secateur import prune
    from secateur.errors import SecateurError

    try:
        return prune(model, recipe, calibration, work_dir=work_dir, **options)
    except SecateurError:
        if work_dir is not None:
            work_dir.discard()
        raise


def resume_settings(model_spec: str | None, model, source: str, recipe, calibration, dtype: torch.dtype,
                    device: str) -> dict:
    """What a run computes from, as a resumed run compares it with the interrupted one: the
    model and its files (sizes and modification times: hashing billions of weights would cost
    minutes), the recipe, the calibration windows (their tokens' sha256), dtype, device kind and
    the versions whose arithmetic could differ. Nested keys read as "recipe sparsity"."""
    tokens = None
    if calibration is not None:
        ids = calibration.input_ids.contiguous()
        tokens = f"{tuple(ids.shape)} sha256:{hashlib.sha256(ids.numpy().tobytes()).hexdigest()}"
    found = versions()
    return {
        "model": source,
        "model file": _model_file_stamps(model_spec, model),
        "recipe": recipe.to_dict(),
        "calibration windows": tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(device).type,
        "version": {name: found[name] for name in ("secateur", "torch", "transformers")},
    }


def _model_file_stamps(spec: str | None, model) -> dict:
    """Size and modification time of every file the model was loaded from (for a hub id: the
    revision it resolved to)."""
    from secateur.models.loading import ALIASES, DEFAULT_MODEL

    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        files = {(path := ALIASES[spec].locate()).name: path}
    elif (path := Path(spec).expanduser()).is_file():
        files = {path.name: path}
    elif path.is_dir():
        files = {child.relative_to(path).as_posix(): child for child in sorted(path.rglob("*")) if child.is_file()}
    else:
        return {"revision": getattr(model.config, "_commit_hash", None)}
    stamps = {}
    for name, child in files.items():
        stat = child.stat()
        modified = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stat.st_mtime_ns // 10**9))
        stamps[name] = f"{stat.st_size} bytes, modified {modified}.{stat.st_mtime_ns % 10**9:09d}Z"
    return stamps
