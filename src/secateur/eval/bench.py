"""What pruning buys: size on disk, parameters, peak memory and latency, side by side.

`benchmark` measures several models in one process under one protocol (same prompt,
runs interleaved so a shared machine's drift hits all of them alike) and, given a
reference (usually the dense model), reports each other model's ratios to it.

Peak memory: a process-level high-water mark counts every model loaded in the process,
so it cannot tell two models apart. `peak_memory_mb` is therefore the model's own
resident weights plus the transient peak of one prefill above the level just before it;
the raw process figures are kept beside it (`peak_memory`).

On a CUDA GPU with compute capability >= 8.0, a model whose decoder-block linears are
all 2:4 sparse (fp16/bf16) is also timed with PyTorch's semi-structured sparse kernels.
"""

from __future__ import annotations

import copy
import ctypes
import gc
from pathlib import Path

import torch
from torch import nn

from secateur.engine.memory import PeakMemory
from secateur.errors import SecateurError
from secateur.eval.speed import compare_latency, speedups

BENCH_FORMAT = "secateur-bench/1"  # `secateur bench --json`

MIB = 2**20
PROTOCOL_NOTE = "interleaved runs, median; spread min-max"
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --- sizes ------------------------------------------------------------------------------
def count_params(model: nn.Module) -> dict:
    """Total parameters (shared ones once) and, when the family is supported, those of the
    decoder blocks."""
    total = sum(p.numel() for p in model.parameters())  # parameters() skips duplicates (tied weights)
    try:
        from secateur.models import get_adapter

        block = get_adapter(model).count_block_params()
    except SecateurError:
        block = None
    return {"total": total, "block_params": block}


def _unique_storage_bytes(tensors) -> int:
    seen: set[tuple] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())
        if storage.data_ptr() == 0:  # meta / empty tensors have no storage to share
            key = ("tensor", id(tensor))
            nbytes = tensor.numel() * tensor.element_size()
        else:
            nbytes = storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def serialized_bytes(model: nn.Module) -> int:
    """Bytes the weights take serialized: the state dict's tensor storages, each shared
    storage (tied embeddings) counted once; the file format's small header is not included."""
    return _unique_storage_bytes(model.state_dict().values())


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and all buffers (persistent or not), shared ones once."""
    return _unique_storage_bytes(list(model.parameters()) + list(model.buffers()))


def checkpoint_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: its *.safetensors, or failing those its
    *.bin (a directory holding both formats would otherwise be counted twice)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SecateurError(f"checkpoint directory {str(directory)!r} does not exist or is not a directory")
    safetensors = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if safetensors:
        return safetensors
    return sorted(p for p in directory.glob("*.bin") if p.is_file() and p.name != "training_args.bin")


def disk_size(model: nn.Module, checkpoint_dir: str | Path | None = None) -> dict:
    if checkpoint_dir is not None:
        files = checkpoint_weight_files(checkpoint_dir)
        if files:
            nbytes = sum(f.stat().st_size for f in files)
            return {
                "bytes": nbytes,
                "mb": nbytes / MIB,
                "source": f"{len(files)} weight file(s) in {checkpoint_dir}",
            }
    nbytes = serialized_bytes(model)
    return {
        "bytes": nbytes,
        "mb": nbytes / MIB,
        "source": "estimated: unique tensor storage of the state dict",
    }


# --- 2:4 sparsity ---------------------------------------------------------------------
def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive weights along the last (input) dimension has
    at most 2 nonzeros. A last dimension that is not a multiple of 4 is not 2:4."""
    if weight.dim() == 0 or weight.shape[-1] % 4 != 0:
        return False
    groups = (weight.detach() != 0).reshape(-1, 4)
    return bool((groups.sum(dim=1) <= 2).all())


def _block_linears(model: nn.Module) -> list[nn.Module] | str:
    """Every prunable linear module of the decoder blocks, or the reason there are none usable."""
    try:
        from secateur.models import get_adapter

        adapter = get_adapter(model)
    except SecateurError as error:
        return str(error).splitlines()[0]
    modules = []
    for block in adapter.blocks():
        for view in adapter.linears(block).values():
            if view.transposed or not isinstance(view.module, nn.Linear):
                return "block linears are not nn.Linear (e.g. GPT-2 Conv1D); the sparse kernel needs F.linear"
            modules.append(view.module)
    if not modules:
        return "no prunable linears found"
    return modules


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        return param.dtype
    return None


def _two_four_skip_reason(model: nn.Module, device) -> str | None:
    """Why the 2:4 kernel cannot be timed for this model, or None when it can be tried."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA GPU with compute capability >= 8.0"
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 0):
        return "needs a CUDA GPU with compute capability >= 8.0"
    if _model_dtype(model) not in _HALF_DTYPES:
        return f"needs fp16/bf16 weights (model is {_model_dtype(model)})"
    linears = _block_linears(model)
    if isinstance(linears, str):
        return linears
    if not all(is_two_four(m.weight) for m in linears):
        return "not 2:4 sparse"
    return None


def semi_structured_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose decoder-block linear weights are semi-structured (2:4) sparse
    tensors; every other tensor is shared with `model`, not copied."""
    from torch.sparse import to_sparse_semi_structured

    linears = _block_linears(model)
    if isinstance(linears, str):
        raise SecateurError(linears)
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor  # deepcopy returns memo entries as they are: shared
    for module in linears:
        weight = module.weight
        sparse = to_sparse_semi_structured(weight.detach().contiguous())
        memo[id(weight)] = nn.Parameter(sparse, requires_grad=False)
    return copy.deepcopy(model, memo)


def _time_two_four(model: nn.Module, *, vocab_size: int, **protocol) -> dict:
    reason = _two_four_skip_reason(model, protocol["device"])
    if reason is not None:
        return {"skipped": reason}
    try:
        sparse = semi_structured_copy(model)
        timed = compare_latency({"dense": model, "sparse": sparse}, vocab_size=vocab_size, **protocol)
    except Exception as error:  # noqa: BLE001  conversion or kernel limits (shapes, dtype, build): report, don't fail
        text = str(error).strip().splitlines()
        return {"skipped": f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")}
    finally:
        sparse = None
        gc.collect()
    return {
        "latency": {k: timed["sparse"][k] for k in ("prefill_s", "decode_tok_s")},
        "dense_latency": {k: timed["dense"][k] for k in ("prefill_s", "decode_tok_s")},
        **speedups(timed, "sparse", "dense"),
    }


# --- memory -----------------------------------------------------------------------------
def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that memory the timing runs freed but
    the allocator kept resident does not hide the next forward's transient peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def prefill_peak_memory(model: nn.Module, input_ids: torch.Tensor, device) -> dict:
    """Peak memory of one forward over `input_ids`: the model's resident weights plus the
    transient peak above the level just before the forward (see the module docstring)."""
    model.eval()
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    _release_free_heap()
    if cuda:
        torch.cuda.synchronize()
        allocated_before = torch.cuda.memory_allocated()
    with PeakMemory(device) as peak:
        model(input_ids=input_ids, use_cache=True)
        if cuda:
            torch.cuda.synchronize()
    raw = peak.result()
    if raw.get("rss_peak_scope") == "pruning phase":
        raw["rss_peak_scope"] = "one prefill (whole process RSS, every loaded model included)"
    if cuda:
        transient = max(peak.cuda_peak_mb - allocated_before / MIB, 0.0)
        kind = "cuda allocated"
    else:
        before = peak.before_mb if peak.before_mb is not None else peak.peak_mb
        transient = max(peak.peak_mb - before, 0.0)
        kind = "rss"
    weights = resident_bytes(model) / MIB
    return {
        "peak_mb": weights + transient,
        "weights_mb": weights,
        "transient_mb": transient,
        "kind": kind,
        "process": raw,
    }


# --- the benchmark ----------------------------------------------------------------------
def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _vocab_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    return int(model.config.vocab_size)


def benchmark(
    models: dict[str, nn.Module],
    *,
    checkpoint_dirs: dict[str, Path | None] | None = None,
    prompt_tokens: int = 512,
    decode_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    seed: int = 0,
    reference: str | None = None,
) -> dict:
    """Measure `models` (already on `device`, eval mode) under one protocol.

    Returns {"protocol": {...}, "reference": name | None, "models": {name: {
        "params": {"total", "block_params"}, "disk_mb", "disk_bytes", "disk_source",
        "latency": {"prefill_s": {median,min,max,runs}, "decode_tok_s": {...}},
        "peak_memory_mb", "peak_memory": {...}, "semi_structured_2_4": {...},
        "ratios": {...}  (every model but the reference, when a reference is given)}}}.
    """
    if not models:
        raise SecateurError("benchmark needs at least one model")
    if reference is not None and reference not in models:
        raise SecateurError(
            f"reference {reference!r} is not one of the benchmarked models: {', '.join(models)}"
        )
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise SecateurError("prompt_tokens, decode_tokens and repeats must be >= 1, warmup >= 0")
    checkpoint_dirs = checkpoint_dirs or {}
    vocab_size = min(_vocab_size(m) for m in models.values())
    timing = {
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "seed": seed,
    }
    latency = compare_latency(models, vocab_size=vocab_size, **timing)

    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)
    results: dict[str, dict] = {}
    for name, model in models.items():
        disk = disk_size(model, checkpoint_dirs.get(name))
        memory = prefill_peak_memory(model, prompt, device)
        results[name] = {
            "params": count_params(model),
            "disk_mb": disk["mb"],
            "disk_bytes": disk["bytes"],
            "disk_source": disk["source"],
            "latency": {k: latency[name][k] for k in ("prefill_s", "decode_tok_s")},
            "peak_memory_mb": memory["peak_mb"],
            "peak_memory": memory,
            "dtype": str(_model_dtype(model)).removeprefix("torch."),
        }
    for name, model in models.items():
        results[name]["semi_structured_2_4"] = _time_two_four(model, vocab_size=vocab_size, **timing)

    if reference is not None:
        ref = results[reference]
        for name, entry in results.items():
            if name == reference:
                continue
            entry["ratios"] = {
                **speedups(latency, name, reference),
                "params_ratio": _ratio(entry["params"]["total"], ref["params"]["total"]),
                "disk_ratio": _ratio(entry["disk_bytes"], ref["disk_bytes"]),
                "memory_ratio": _ratio(entry["peak_memory_mb"], ref["peak_memory_mb"]),
            }

    dtypes = sorted({entry["dtype"] for entry in results.values()})
    protocol = {
        **{k: timing[k] for k in ("prompt_tokens", "decode_tokens", "repeats", "warmup", "device", "seed")},
        "torch_threads": torch.get_num_threads(),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "batch_size": 1,
        "statistic": PROTOCOL_NOTE,
        "decode": "greedy, KV cache, 16-token prompt, prompt prefill subtracted",
        "peak_memory": "model's resident weights + transient peak of one prefill of prompt_tokens tokens",
    }
    return {"protocol": protocol, "reference": reference, "models": results}


# --- rendering --------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _spread(summary: dict, scale: float = 1.0, digits: int = 1) -> str:
    return (
        f"{summary['median'] * scale:,.{digits}f} "
        f"({summary['min'] * scale:,.{digits}f}–{summary['max'] * scale:,.{digits}f})"
    )


def _times(value) -> str:
    return "—" if value is None else f"×{value:.2f}"


def render_bench(result: dict) -> str:
    """A markdown table, one row per model, with the protocol above it and 2:4 kernel notes below."""
    p = result["protocol"]
    reference = result.get("reference")
    protocol_line = (
        f"Protocol: batch 1, prompt {p['prompt_tokens']} tokens, decode {p['decode_tokens']} tokens; "
        f"{p['repeats']} {p['statistic']} (after {p['warmup']} warm-up); "
        f"device {p['device']}, {p['torch_threads']} torch threads, dtype {p['dtype']}."
    )
    lines = [protocol_line, ""]
    header = [
        "model",
        "params (M)",
        "disk MB",
        "peak MB",
        "prefill ms (median, min–max)",
        "decode tok/s (median, min–max)",
    ]
    if reference is not None:
        header += ["prefill ×ref", "decode ×ref", "params ×ref", "disk ×ref", "memory ×ref"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    notes: list[str] = []
    for name, entry in result["models"].items():
        row = [
            f"{name} (ref)" if name == reference else name,
            _fmt(entry["params"]["total"] / 1e6, 2),
            _fmt(entry["disk_mb"]),
            _fmt(entry["peak_memory_mb"]),
            _spread(entry["latency"]["prefill_s"], 1000.0, 1),
            _spread(entry["latency"]["decode_tok_s"], 1.0, 1),
        ]
        if reference is not None:
            if name == reference:
                row += ["×1.00"] * 5
            else:
                r = entry["ratios"]
                row += [
                    _times(r["prefill_speedup"]),
                    _times(r["decode_speedup"]),
                    _times(r["params_ratio"]),
                    _times(r["disk_ratio"]),
                    _times(r["memory_ratio"]),
                ]
        lines.append("| " + " | ".join(row) + " |")
        two_four = entry.get("semi_structured_2_4") or {}
        if "skipped" in two_four:
            notes.append(f"- {name}: 2:4 sparse kernel not timed: {two_four['skipped']}")
        elif two_four:
            notes.append(
                f"- {name}: 2:4 sparse kernel prefill {_spread(two_four['latency']['prefill_s'], 1000.0, 1)} ms, "
                f"{_times(two_four['prefill_speedup'])} vs the same weights on dense kernels; "
                f"decode {_spread(two_four['latency']['decode_tok_s'], 1.0, 1)} tok/s "
                f"({_times(two_four['decode_speedup'])})"
            )
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"
