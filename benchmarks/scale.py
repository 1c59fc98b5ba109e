"""Benchmark: memory at scale — a synthetic Llama-shaped checkpoint bigger than what streaming may hold.

Builds (once, cached under --checkpoint) a random-weight fp32 Llama checkpoint saved as several
safetensors shards — by default hidden 2048, 12 blocks, FFN 5632, 16 heads, SmolLM2's
49,152-token vocabulary and tokenizer, untied embeddings: 3.27 GB of weights — and measures
four things.

1. Perplexity, peak RSS (`--modes`, each run in a fresh subprocess):
   - `in-memory`: load the whole model (load_model) and compute its perplexity;
   - `streamed`: open it as a StreamedModel (one block in memory at a time) and compute the same
     perplexity.
2. Pruning, peak RSS and time (`--modes`, each run in a fresh subprocess): `--method` (wanda) at
   `--sparsity` 50 % on `--nsamples` (8) `--calib` (c4) windows of `--seqlen` (512) tokens, then
   saving the pruned checkpoint into a temporary run directory under `--work-dir`:
   - `prune in-memory`: secateur.load, secateur.prune, save_checkpoint;
   - `prune streamed`: the same on a StreamedModel (pruned blocks kept in scratch files in the run
     directory, written back module by module);
   - `prune streamed offload`: the same with the per-window activations on disk as well.
   Each row has the wall seconds of loading/opening, of the prune and of the save, the prune
   report's own timings, and the peak RSS of that work. The streamed checkpoints are then
   compared with the in-memory one tensor by tensor (one tensor of each in memory at a time):
   wanda's must be bitwise identical. The run directories are deleted afterwards.
3. `--ranks` (opt-in): `secateur prune` on `--rank-model` (SmolLM2-135M) for each of
   `--rank-methods` (wanda, sparsegpt) with P0 calibration (c4, 32 × 512, seed 0), once in one
   process (torch's default thread count) and once under torchrun with 2 processes (one thread
   each), optionally (`--ranks-stream`) once more with 2 processes and `--stream`: wall seconds of
   the whole command, results.json's timings and world size, the bytes rank 0 exchanged (total
   and mean per block step), and how far the 2-process checkpoint is from the 1-process one
   (largest relative difference of a tensor, whether every mask is the same).
4. `--resume-cost` (opt-in): wanda on `--rank-model` with the same calibration through the CLI:
   an uninterrupted run (T s), a run that SIGKILLs itself after step `--kill-step` (prune/14; t1 s
   until it died) and the same command with `--resume` (t2 s). Lost time = t1 + t2 − T; the
   resumed model.safetensors must have the uninterrupted one's sha256.

Beside each memory figure go the terms of the issue's bound, "one block's weights in fp32 + its
statistics + the calibration activations + the embeddings + 20 %", with the interpreter's own
baseline (Python, torch, transformers, tokenizer, the calibration token ids) measured before any
weight is read, and the check that the streamed peak is under 40 % of the checkpoint's size
(`method_terms_mb` says what the statistics estimate assumes). Everything goes to
OUT/scale.md and OUT/scale.json; temporary checkpoints live under --work-dir (outside the
repository) and are removed.

Run alone (the figures are the machine's memory, and the in-memory rows hold 3.3 GB; the prune
rows write three 3.3 GB checkpoints, two at a time, under --work-dir):

    .venv/bin/python benchmarks/scale.py --data-dir ../shared/data --ranks --resume-cost --out benchmarks/results/scale

One section only: `--modes ''` runs no perplexity or prune row (and builds no checkpoint), e.g.
`--modes '' --ranks`; `--modes 'prune in-memory,prune streamed'` runs just those rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_parser

BYTES_FP32 = 4
BYTES_FP64 = 8
MIB = 2**20
DEFAULT_SHAPE = {"hidden": 2048, "blocks": 12, "ffn": 5632, "heads": 16, "vocab_from": "smollm2-135m"}
DEFAULT_WORK_DIR = "~/.cache/secateur/scale/runs"
P0_CALIBRATION = {"calib": "c4", "nsamples": 32, "seqlen": 512, "seed": 0}  # the project's P0 protocol


# --- the synthetic checkpoint ----------------------------------------------------------------


def build_checkpoint(directory: Path, *, hidden: int, blocks: int, ffn: int, heads: int, tokenizer,
                     shard_bytes: int = 10**9, seed: int = 0) -> Path:
    """Write a random fp32 Llama checkpoint (untied embeddings) with `tokenizer` into `directory`
    (must not exist; built beside it and renamed when complete), one tensor in memory at a time.
    Linear weights ~ N(0, 1/in_features) so activations keep their scale through the blocks;
    embeddings ~ N(0, 1); norms 1."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from secateur.models.streaming import ShardWriter

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")  # renamed when complete: no half checkpoint
    if partial.exists():
        sys.exit(f"{partial} is left from an interrupted build: remove it and run again")
    partial.mkdir(parents=True)
    writer = ShardWriter(skeleton, partial, max_shard_bytes=shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    for name, param in skeleton.named_parameters():
        if param.dim() == 1:
            value = torch.ones(param.shape)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5
        writer.add({name: value})
        del value
    writer.finish()
    tokenizer.save_pretrained(partial)
    partial.rename(directory)
    return directory


def method_terms_mb(method: str, *, hidden: int, ffn: int, attention_width: int) -> dict:
    """What pruning one Llama block with `method` holds besides its weights, in MiB.

    A Llama block's linears read four distinct inputs: q/k/v share one (width hidden), o_proj reads
    the attention output (heads × head_dim), gate/up share one (hidden), down_proj reads the FFN
    activations (ffn). The engine gathers one `LinearStats` per distinct input (shared inputs share
    it) and holds all of a block's statistics while the block is pruned. Sums are float64.
    - magnitude: no statistics;
    - wanda: Σx² per input column, (3 inputs of ~hidden + ffn) × 8 bytes: a few KiB;
    - sparsegpt: the Gram XᵀX per distinct input, (hidden² × 2 + width² + ffn²) × 8 bytes; and,
      in `solve_mb`, the workspace of one layer's solve, taken at the widest input (down_proj):
      H, the identity, its Cholesky factor L, (H + λI)⁻¹ and U all alive at once in float64,
      5 × ffn² × 8 bytes (the float32 copy of U comes after L and the inverse are freed).
    Not counted (the 20 % margin's job): one layer's transient copies while it is pruned (wanda's
    scores and mask, ~2 × the largest linear) and one window's activations inside a block."""
    widths = (hidden, attention_width, hidden, ffn)
    if method == "magnitude":
        statistics, solve = 0, 0
    elif method == "wanda":
        statistics, solve = sum(widths) * BYTES_FP64, 0
    elif method == "sparsegpt":
        statistics, solve = sum(w * w for w in widths) * BYTES_FP64, 5 * max(widths) ** 2 * BYTES_FP64
    else:
        raise ValueError(f"no statistics estimate for method {method!r}: magnitude, wanda or sparsegpt")
    return {"statistics_mb": statistics / MIB, "solve_mb": solve / MIB}


def checkpoint_terms(directory: Path, *, windows: int, seqlen: int, nsamples: int, calib_seqlen: int,
                     method: str) -> dict:
    """The sizes (MiB) the memory bounds are made of, read from the checkpoint's config and index:
    perplexity's (`activations_mb`: the evaluation windows, `logits_mb`) and pruning's (`prune_*`)."""
    config = json.loads((directory / "config.json").read_text())
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    block = attention + 3 * hidden * ffn + 2 * hidden
    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    size = json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else files[0].stat().st_size
    window_mb = calib_seqlen * hidden * BYTES_FP32 / MIB
    method_terms = method_terms_mb(method, hidden=hidden, ffn=ffn, attention_width=heads * head_dim)
    return {
        "checkpoint_mb": size / MIB,
        "shards": len(files),
        "block_fp32_mb": block * BYTES_FP32 / MIB,
        "embeddings_mb": vocab * hidden * BYTES_FP32 / MIB,  # one matrix: input embeddings or LM head
        "activations_mb": windows * seqlen * hidden * BYTES_FP32 / MIB,
        "logits_mb": seqlen * vocab * BYTES_FP32 / MIB,  # one window's logits (perplexity only)
        "statistics_mb": 0.0,  # perplexity gathers none
        # Pruning: the engine keeps one copy of the next block's inputs, one (1, seqlen, hidden) fp32
        # tensor per window, and replaces each window's input by its output as it goes (advance),
        # so the outputs are never a second copy: nsamples × seqlen × hidden × 4 bytes.
        "prune_activations_mb": nsamples * window_mb,
        # Offloaded: the windows are on disk; in memory, the window being run and its output.
        "prune_offload_window_mb": 2 * window_mb,
        "prune_statistics_mb": method_terms["statistics_mb"],
        "prune_solve_mb": method_terms["solve_mb"],
    }


# --- what each child process measures ---------------------------------------------------------
# Each mode is `function(spec, memory)`; it enters `memory` (a PeakMemory) around the work whose
# peak RSS is measured and returns JSON values.


def _perplexity_in_memory(spec: dict, memory) -> dict:
    from secateur.eval import perplexity
    from secateur.models import load_model

    with memory:
        loaded = load_model(spec["model"])
        result = perplexity(loaded.model, loaded.tokenizer, spec["dataset"], seqlen=spec["seqlen"],
                            max_windows=spec["windows"], data_dir=spec["data_dir"])
    return {"perplexity": result["perplexity"]}


def _perplexity_streamed(spec: dict, memory) -> dict:
    from secateur.eval import perplexity
    from secateur.models.streaming import StreamedModel

    with memory, StreamedModel.open(spec["model"], offload_activations=spec.get("offload")) as stream:
        result = perplexity(stream, stream.tokenizer, spec["dataset"], seqlen=spec["seqlen"],
                            max_windows=spec["windows"], data_dir=spec["data_dir"])
    return {"perplexity": result["perplexity"]}


def _prune(spec: dict, memory, *, streamed: bool, offload: bool) -> dict:
    """Prune the checkpoint and save it into a new run directory under spec["work_dir"] (kept for
    the parent to compare; removed here if the run fails). The tokenizer and the calibration
    windows are made before `memory` is entered: they are part of the baseline."""
    import secateur
    from secateur.data import calibration_windows
    from secateur.export import save_checkpoint
    from secateur.models.loading import read_checkpoint_tokenizer
    from secateur.models.streaming import StreamedModel

    model_dir = Path(spec["model"])
    recipe = {"method": spec["method"], "sparsity": spec["sparsity"], "calib": spec["calib"],
              "nsamples": spec["nsamples"], "seqlen": spec["calib_seqlen"], "seed": 0}
    ids = calibration_windows(read_checkpoint_tokenizer(model_dir), spec["calib"], nsamples=spec["nsamples"],
                              seqlen=spec["calib_seqlen"], seed=0, data_dir=spec["data_dir"]).input_ids
    work = Path(spec["work_dir"]).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=spec["mode"].replace(" ", "-") + "-", dir=work))
    out = run_dir / "checkpoint"
    seconds = {}
    try:
        with memory:
            if streamed:
                started = time.perf_counter()
                with StreamedModel.open(model_dir, scratch_dir=run_dir,
                                        offload_activations=run_dir / "activations" if offload else None) as stream:
                    seconds["open_s"] = time.perf_counter() - started
                    started = time.perf_counter()
                    stream, report = secateur.prune(stream, recipe, ids, progress=False)
                    seconds["prune_s"] = time.perf_counter() - started
                    started = time.perf_counter()
                    save_checkpoint(stream, stream.tokenizer, out, recipe_yaml="", results={}, overwrite=False)
                    seconds["save_s"] = time.perf_counter() - started
            else:
                started = time.perf_counter()
                loaded = secateur.load(str(model_dir))
                seconds["load_s"] = time.perf_counter() - started
                started = time.perf_counter()
                model, report = secateur.prune(loaded.model, recipe, ids, progress=False)
                seconds["prune_s"] = time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint(model, loaded.tokenizer, out, recipe_yaml="", results={}, overwrite=False)
                seconds["save_s"] = time.perf_counter() - started
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return {**{key: round(value, 3) for key, value in seconds.items()}, "timings_s": report.timings_s,
            "report_memory_mb": report.memory_mb, "sparsity_achieved": round(report.sparsity_achieved, 6),
            "method": spec["method"], "run_dir": str(run_dir), "checkpoint": str(out)}


def _prune_in_memory(spec: dict, memory) -> dict:
    return _prune(spec, memory, streamed=False, offload=False)


def _prune_streamed(spec: dict, memory) -> dict:
    return _prune(spec, memory, streamed=True, offload=False)


def _prune_streamed_offload(spec: dict, memory) -> dict:
    return _prune(spec, memory, streamed=True, offload=True)


MODES = {"in-memory": _perplexity_in_memory, "streamed": _perplexity_streamed,
         "prune in-memory": _prune_in_memory, "prune streamed": _prune_streamed,
         "prune streamed offload": _prune_streamed_offload}
PERPLEXITY_MODES = ("in-memory", "streamed")
PRUNE_MODES = ("prune in-memory", "prune streamed", "prune streamed offload")
REFERENCE_MODE = "prune in-memory"  # what the streamed prunes' checkpoints are compared with
# The terms of each streamed mode's bound. The bound (block + statistics + activations +
# embeddings) is pruning's, plus SparseGPT's solve workspace (0 for wanda); perplexity also holds
# one window's logits beside the LM head. A mode that holds the whole model has none. Offloaded,
# the activations in memory are one window and its output, not every window.
BOUND_TERMS = {
    "streamed": ("block_fp32_mb", "statistics_mb", "activations_mb", "embeddings_mb", "logits_mb"),
    "prune streamed": ("block_fp32_mb", "prune_statistics_mb", "prune_solve_mb", "prune_activations_mb",
                       "embeddings_mb"),
    "prune streamed offload": ("block_fp32_mb", "prune_statistics_mb", "prune_solve_mb",
                               "prune_offload_window_mb", "embeddings_mb"),
}


def child(spec: dict) -> dict:
    """Run one mode and return its figures with the peak RSS of its work (what the interpreter
    and libraries hold before it is the baseline, measured apart)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (library code counts in the baseline)

    import secateur.engine
    import secateur.eval
    import secateur.export
    import secateur.models.streaming  # noqa: F401  (imported before the baseline, like the libraries)
    from secateur.engine.memory import PeakMemory

    memory = PeakMemory()
    result = MODES[spec["mode"]](spec, memory)
    figures = memory.result()
    figures["rss_peak_scope"] = "this run's work" if memory.phase_only else "whole process"
    # secateur.prune's own PeakMemory nests inside this one: the peak of loading is kept.
    return {"mode": spec["mode"], **result, **figures}


def measure(spec: dict) -> dict:
    """`child(spec)` in a fresh interpreter, so no earlier run's memory counts."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['mode']} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- comparing checkpoints --------------------------------------------------------------------


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `directory` that holds it (sharded or not)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            found.update(dict.fromkeys(handle.keys(), path))
    return found


def compare_checkpoints(reference: Path, other: Path) -> dict:
    """Tensor by tensor (one tensor of each checkpoint in memory at a time): whether `other` is
    bitwise `reference`, the largest absolute difference, the largest relative difference of a
    tensor (‖a − b‖ / ‖a‖, in float64) and whether every tensor has the same zeros (masks)."""
    from safetensors import safe_open

    ours, theirs = weight_files(reference), weight_files(other)
    result = {"tensors": len(ours), "same_names": sorted(ours) == sorted(theirs), "identical": True,
              "max_abs_diff": 0.0, "max_rel_diff": 0.0, "same_masks": True, "differing_tensors": 0}
    if not result["same_names"]:
        result.update(identical=False, only_in_reference=sorted(set(ours) - set(theirs))[:10],
                      only_in_other=sorted(set(theirs) - set(ours))[:10])
    for name in sorted(set(ours) & set(theirs)):
        with safe_open(ours[name], framework="pt") as handle:
            a = handle.get_tensor(name)
        with safe_open(theirs[name], framework="pt") as handle:
            b = handle.get_tensor(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            result.update(identical=False, same_masks=False, differing_tensors=result["differing_tensors"] + 1)
            continue
        if torch.equal(a, b):
            continue
        result["identical"] = False
        result["differing_tensors"] += 1
        difference = (a.double() - b.double()).abs()
        result["max_abs_diff"] = max(result["max_abs_diff"], float(difference.max()))
        norm = float(a.double().norm())
        relative = float(difference.norm()) / norm if norm else float("inf")
        result["max_rel_diff"] = max(result["max_rel_diff"], relative)
        result["same_masks"] &= torch.equal(a == 0, b == 0)
        del a, b, difference
    return result


def weights_sha256(directory: Path) -> dict[str, str]:
    """sha256 of every safetensors file of a checkpoint, read in 16 MiB pieces."""
    hashes = {}
    for path in sorted(directory.glob("*.safetensors")):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while piece := handle.read(16 * MIB):
                digest.update(piece)
        hashes[path.name] = digest.hexdigest()
    return hashes


def run_prune_modes(modes: list[str], base_spec: dict) -> list[dict]:
    """Run the modes in order; compare each streamed prune's checkpoint with the in-memory one
    as soon as both exist, then delete it (the reference goes last), so at most two pruned
    checkpoints are on disk at a time. Every run directory is removed, also on failure."""
    rows, kept = [], {}  # kept: mode -> row whose checkpoint waits for the comparison
    try:
        for mode in modes:
            row = measure({**base_spec, "mode": mode})
            rows.append(row)
            print(f"done {mode}: peak {row['rss_peak_mb']:.0f} MiB", file=sys.stderr)
            if "run_dir" in row:
                kept[mode] = row
            reference = kept.get(REFERENCE_MODE)
            for other in [m for m in kept if m != REFERENCE_MODE and reference is not None]:
                row = kept.pop(other)
                row["vs_in_memory"] = compare_checkpoints(Path(reference["checkpoint"]), Path(row["checkpoint"]))
                row["identical"] = row["vs_in_memory"]["identical"]
                shutil.rmtree(row["run_dir"], ignore_errors=True)
    finally:
        for row in kept.values():
            shutil.rmtree(row["run_dir"], ignore_errors=True)
    for row in rows:
        row.pop("run_dir", None)
        row.pop("checkpoint", None)
    return rows


# --- the CLI sections: ranks and resume cost ---------------------------------------------------


def cli_prune(args, method: str, out: Path, *, ranks: int = 1, stream: bool = False, extra=()) -> list[str]:
    """The `secateur prune` command line of the --ranks and --resume-cost sections."""
    launcher = [sys.executable, "-m", "secateur"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "secateur"]
    command = [*launcher, "prune", "--model", args.rank_model, "--method", method, "--sparsity", str(args.sparsity),
               "--calib", args.calib, "--nsamples", str(args.rank_nsamples), "--seqlen", str(args.rank_seqlen),
               "--seed", "0", "--out", str(out), "--quiet"]
    if args.data_dir:
        command[command.index("--calib"):command.index("--calib")] = ["--data-dir", args.data_dir]
    return command + (["--stream"] if stream else []) + list(extra)


def shown(command: list[str], out: Path) -> str:
    """The command as the report shows it: the interpreter as `python`, the temporary --out as OUT."""
    return shlex.join(["python" if part == sys.executable else "OUT" if part == str(out) else part
                       for part in command])


def timed(command: list[str], env: dict | None = None, *, expect: int = 0) -> tuple[float, subprocess.CompletedProcess]:
    """Run `command` in its own session; wall seconds of the whole command and its result. A
    return code other than `expect` fails the benchmark with the end of its output."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, start_new_session=True)
    seconds = time.perf_counter() - started
    if done.returncode != expect:
        raise RuntimeError(f"{shlex.join(command)} exited with {done.returncode} (expected {expect}):\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    return seconds, done


def traffic_summary(traffic: dict | None) -> dict | None:
    """results.json's traffic_bytes (rank 0's bytes exchanged per step): total, and mean per block step."""
    if not traffic:
        return None
    blocks = [step for name, step in traffic.items() if re.fullmatch(r"prune/\d+", name)]
    return {"total_bytes": sum(step["total"] for step in traffic.values()), "block_steps": len(blocks),
            "mean_bytes_per_block_step": sum(step["total"] for step in blocks) / len(blocks) if blocks else None}


def _cli_row(label: str, method: str, command: list[str], out: Path, seconds: float, ranks: int, threads) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {"run": label, "method": method, "ranks": ranks, "threads_per_rank": threads,
            "command": shown(command, out), "wall_s": round(seconds, 3), "timings_s": results["timings_s"],
            "world_size": results.get("world_size"), "peak_memory_mb": results.get("peak_memory_mb"),
            "traffic": traffic_summary(results.get("traffic_bytes")), "traffic_bytes": results.get("traffic_bytes")}


def ranks_section(args, work: Path) -> list[dict]:
    """For each method: 1 process (default threads), 1 process with one thread, 2 processes under
    torchrun (one thread each) and, with --ranks-stream, 2 streamed processes; each 2-process
    checkpoint is compared with both 1-process ones. The one-thread run is the like-for-like
    reference: a BLAS rounds differently with another thread count, and SparseGPT's sequential
    updates carry such a rounding difference into other masks, block after block."""
    single_env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    rows = []
    for method in args.rank_methods.split(","):
        area = Path(tempfile.mkdtemp(prefix=f"ranks-{method}-", dir=work))
        try:
            one = area / "one"
            command = cli_prune(args, method, one)
            seconds, _ = timed(command, single_env)
            rows.append(_cli_row("1 process", method, command, one, seconds, 1, "default"))
            print(f"done ranks {method} 1 process: {seconds:.1f} s", file=sys.stderr)
            one_thread = area / "one-thread"
            command = cli_prune(args, method, one_thread)
            seconds, _ = timed(command, rank_env)
            rows.append(_cli_row("1 process, 1 thread", method, command, one_thread, seconds, 1, 1))
            rows[-1]["vs_1_process"] = compare_checkpoints(one, one_thread)
            print(f"done ranks {method} 1 process 1 thread: {seconds:.1f} s", file=sys.stderr)
            for label, stream in [("2 processes", False)] + ([("2 processes --stream", True)] if args.ranks_stream
                                                             else []):
                two = area / label.replace(" ", "-").replace("--", "")
                command = cli_prune(args, method, two, ranks=2, stream=stream)
                seconds, _ = timed(command, rank_env)
                row = _cli_row(label, method, command, two, seconds, 2, 1)
                row["vs_1_process"] = compare_checkpoints(one, two)
                row["vs_1_thread"] = compare_checkpoints(one_thread, two)
                rows.append(row)
                print(f"done ranks {method} {label}: {seconds:.1f} s", file=sys.stderr)
                shutil.rmtree(two, ignore_errors=True)
        finally:
            shutil.rmtree(area, ignore_errors=True)
    return rows


def _difference(compared: dict | None, default: dict | None) -> str:
    """The two last cells of a ranks row: vs the 1-thread run, and (in brackets) vs the default-thread run."""
    if compared is None and default is None:
        return "— | —"
    main = "—" if compared is None else f"{compared['max_rel_diff']:.2e}"
    masks = "—" if compared is None else ("yes" if compared["same_masks"] else "**no**")
    if default is not None:
        main += f" ({default['max_rel_diff']:.2e} vs default threads)"
        masks += f" ({'yes' if default['same_masks'] else 'no'})"
    return f"{main} | {masks}"


def resume_cost_section(args, work: Path) -> dict:
    """Uninterrupted (T), killed after --kill-step (t1, until it died), resumed (t2): lost = t1 + t2 − T."""
    from secateur.engine.workdir import KILL_AFTER_STEP

    area = Path(tempfile.mkdtemp(prefix="resume-cost-", dir=work))
    try:
        whole, cut = area / "uninterrupted", area / "killed"
        command = cli_prune(args, "wanda", whole)
        uninterrupted, _ = timed(command)
        print(f"done resume-cost uninterrupted: {uninterrupted:.1f} s", file=sys.stderr)
        killed_command = cli_prune(args, "wanda", cut)
        killed, _ = timed(killed_command, {**os.environ, KILL_AFTER_STEP: args.kill_step}, expect=-9)
        resumed, done = timed([*killed_command, "--resume"])
        print(f"done resume-cost killed {killed:.1f} s + resumed {resumed:.1f} s", file=sys.stderr)
        taken = re.search(r"taking up (\d+) completed steps", done.stderr)
        expected, got = weights_sha256(whole), weights_sha256(cut)
        return {
            "command": shown(command, whole), "kill_env": f"{KILL_AFTER_STEP}={args.kill_step}",
            "kill_step": args.kill_step, "uninterrupted_s": round(uninterrupted, 3), "killed_s": round(killed, 3),
            "killed_returncode": -9, "resumed_s": round(resumed, 3),
            "lost_s": round(killed + resumed - uninterrupted, 3),
            "resumed_steps": int(taken.group(1)) if taken else None,
            "resumed_timings_s": json.loads((cut / "results.json").read_text())["timings_s"],
            "sha256": expected, "same_sha256": expected == got and bool(expected),
        }
    finally:
        shutil.rmtree(area, ignore_errors=True)


# --- the report ---------------------------------------------------------------------------------


def bound_mb(mode: str, terms: dict, baseline_mb: float) -> float | None:
    """A streamed mode's bound: its terms (BOUND_TERMS) × 1.2, plus what the interpreter held
    before any weight was read; None for a mode that holds the whole model."""
    if mode not in BOUND_TERMS:
        return None
    return 1.2 * sum(terms[term] for term in BOUND_TERMS[mode]) + baseline_mb


def _bound_cells(row: dict, terms: dict) -> str:
    bound = row.get("bound_mb")
    return "— | — |" if bound is None else f"{bound:.0f} | {'yes' if row['rss_peak_mb'] <= bound else 'no'} |"


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _p0(args) -> str:
    same = (args.calib, args.rank_nsamples, args.rank_seqlen) == tuple(P0_CALIBRATION[k] for k in
                                                                         ("calib", "nsamples", "seqlen"))
    return ": P0" if same else " (not P0)"


def render(summary: dict, args) -> str:
    terms, rows = summary.get("terms_mb"), summary["runs"]
    lines = []
    if rows:
        lines += [
            f"Command: `{summary.get('merged_from') or summary['command']}`"
            + (f" (then `{summary['command']}`, which redid some sections)" if summary.get("merged_from") else ""),
            "",
            (f"Synthetic Llama checkpoint: {terms['checkpoint_mb']:.0f} MiB of fp32 weights in {terms['shards']} "
             "safetensors shards. Peak RSS of each run's work (fresh process; `baseline` = interpreter and "
             "libraries before any weight is read)."),
            "",
        ]
    perplexity_rows = [row for row in rows if row["mode"] in PERPLEXITY_MODES]
    if perplexity_rows:
        lines += [
            (f"### Perplexity on `{args.dataset}`, {args.max_windows} windows of {args.eval_seqlen} tokens"),
            "",
            (f"Bound terms: one block fp32 {terms['block_fp32_mb']:.0f} MiB, embeddings {terms['embeddings_mb']:.0f} "
             f"MiB (one matrix), activations {terms['activations_mb']:.1f} MiB, statistics "
             f"{terms['statistics_mb']:.0f} MiB, one window's logits {terms['logits_mb']:.0f} MiB."),
            "",
            "| run | perplexity | baseline MiB | peak RSS MiB | peak / checkpoint | bound MiB | within bound |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in perplexity_rows:
            lines.append(f"| {row['mode']} | {row['perplexity']:.3f} | {row['rss_before_mb']:.0f} | "
                         f"{row['rss_peak_mb']:.0f} | {row['rss_peak_mb'] / terms['checkpoint_mb']:.1%} | "
                         + _bound_cells(row, terms))
        lines.append("")
    prune_rows = [row for row in rows if row["mode"] in PRUNE_MODES]
    if prune_rows:
        lines += [
            (f"### Pruning: {args.method} {args.sparsity:.0%}, {args.nsamples} `{args.calib}` windows of "
             f"{args.seqlen} tokens, saved to a temporary directory"),
            "",
            (f"Bound terms: one block fp32 {terms['block_fp32_mb']:.0f} MiB, embeddings {terms['embeddings_mb']:.0f} "
             f"MiB, activations {terms['prune_activations_mb']:.1f} MiB (one copy of every window's block input; "
             f"offloaded: one window and its output, {terms['prune_offload_window_mb']:.1f} MiB), statistics "
             f"{terms['prune_statistics_mb']:.2f} MiB, solve workspace {terms['prune_solve_mb']:.0f} MiB."),
            "",
            ("| run | load/open s | prune s | save s | capture s | calib forward s | pruning s | baseline MiB | "
             "peak RSS MiB | peak / checkpoint | bound MiB | within bound | same as in-memory | max abs diff |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
        ]
        for row in prune_rows:
            timings, compared = row["timings_s"], row.get("vs_in_memory")
            same = "—" if compared is None else ("identical" if compared["identical"] else "**differs**")
            diff = "—" if compared is None else f"{compared['max_abs_diff']:.3g}"
            lines.append(
                f"| {row['mode']} | {_seconds(row.get('load_s', row.get('open_s')))} | {row['prune_s']:.1f} | "
                f"{row['save_s']:.1f} | {_seconds(timings.get('capture'))} | "
                f"{_seconds(timings.get('calibration_forward'))} | {_seconds(timings.get('pruning'))} | "
                f"{row['rss_before_mb']:.0f} | {row['rss_peak_mb']:.0f} | "
                f"{row['rss_peak_mb'] / terms['checkpoint_mb']:.1%} | " + _bound_cells(row, terms) + f" {same} | {diff} |")
        lines.append("")
    if rows:
        lines += ["Bound = 1.2 × (" + "; ".join(f"{mode}: {' + '.join(t.removesuffix('_mb') for t in names)}"
                                                for mode, names in BOUND_TERMS.items()) + ") + baseline.", ""]
    if summary.get("ranks"):
        lines += [
            (f"### 1 process vs 2 processes (torchrun, gloo): `{args.rank_model}`, calibration {args.calib}, "
             f"{args.rank_nsamples} × {args.rank_seqlen}, seed 0{_p0(args)}"),
            "",
        ]
        for command in dict.fromkeys(row["command"] for row in summary["ranks"]):
            lines.append(f"Command: `{command}`  ")
        lines += [
            "",
            ("1 process: torch's default thread count, or OMP_NUM_THREADS=1; 2 processes: OMP_NUM_THREADS=1 each. "
             "Bytes are what rank 0 exchanged (results.json traffic_bytes). Differences: the largest relative one "
             "over tensors, ‖a − b‖ / ‖a‖, against the 1-process run with the same thread count per process (and "
             "in brackets against the default-thread run: another BLAS rounding, which SparseGPT carries into "
             "other masks)."),
            "",
            ("| method | run | wall s | prune total s | world size | bytes exchanged | mean bytes / block step | "
             "max rel diff vs 1 process (1 thread) | same masks |"),
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in summary["ranks"]:
            traffic, compared, default = row["traffic"], row.get("vs_1_thread"), row.get("vs_1_process")
            lines.append(
                f"| {row['method']} | {row['run']} | {row['wall_s']:.1f} | {row['timings_s']['total']:.1f} | "
                f"{row['world_size']} | " + ("— | — |" if traffic is None else
                                              f"{traffic['total_bytes']:,} | {traffic['mean_bytes_per_block_step']:,.0f} |")
                + f" {_difference(compared, default)} |")
        lines.append("")
    cost = summary.get("resume_cost")
    if cost:
        lines += [
            (f"### Kill and resume: wanda on `{args.rank_model}` (calibration {args.calib}, {args.rank_nsamples} × "
             f"{args.rank_seqlen}, seed 0{_p0(args)}), killed after step {cost['kill_step']}"),
            "",
            f"Command: `{cost['command']}` (killed: with `{cost['kill_env']}`; resumed: the same plus `--resume`)",
            "",
            "| uninterrupted T s | killed t1 s | resumed t2 s | lost t1 + t2 − T s | steps taken up | same sha256 |",
            "|---:|---:|---:|---:|---:|---|",
            (f"| {cost['uninterrupted_s']:.1f} | {cost['killed_s']:.1f} | {cost['resumed_s']:.1f} | "
             f"{cost['lost_s']:.1f} | {cost['resumed_steps']} | {'yes' if cost['same_sha256'] else '**no**'} |"),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.set_defaults(out="benchmarks/results/scale", datasets="wikitext2", nsamples=8, seqlen=512)
    parser.add_argument("--checkpoint", default=None,
                        help="where the synthetic checkpoint is built, reused when present (default: "
                             "~/.cache/secateur/scale/llama-HIDDEN-BLOCKS-FFN, outside the repository)")
    parser.add_argument("--hidden", type=int, default=DEFAULT_SHAPE["hidden"])
    parser.add_argument("--blocks", type=int, default=DEFAULT_SHAPE["blocks"])
    parser.add_argument("--ffn", type=int, default=DEFAULT_SHAPE["ffn"])
    parser.add_argument("--heads", type=int, default=DEFAULT_SHAPE["heads"])
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size of the synthetic checkpoint")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma list of {', '.join(MODES)} (default: all; '' for none)")
    parser.add_argument("--offload-activations", default=None,
                        help="streamed perplexity runs keep activations on disk here")
    parser.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt", "magnitude"],
                        help="method of the prune rows (default wanda)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target of every prune (default 0.5)")
    parser.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                        help="where the temporary checkpoints go, outside the repository (default "
                             f"{DEFAULT_WORK_DIR}); each run's directory is removed after use")
    parser.add_argument("--ranks", action="store_true", help="also: CLI prune in 1 process vs 2 under torchrun")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections of OUT/scale.json that this run does not redo (e.g. --modes '' --ranks)")
    parser.add_argument("--ranks-stream", action="store_true", help="--ranks: also 2 processes with --stream")
    parser.add_argument("--rank-methods", default="wanda,sparsegpt", help="--ranks: comma list of methods")
    parser.add_argument("--resume-cost", action="store_true", help="also: time lost to a kill and a resume")
    parser.add_argument("--kill-step", default="prune/14", help="--resume-cost: the step after which the run dies")
    parser.add_argument("--rank-model", default="smollm2-135m", help="model of --ranks and --resume-cost")
    parser.add_argument("--rank-nsamples", type=int, default=P0_CALIBRATION["nsamples"],
                        help="--ranks/--resume-cost calibration windows (P0: 32)")
    parser.add_argument("--rank-seqlen", type=int, default=P0_CALIBRATION["seqlen"],
                        help="--ranks/--resume-cost calibration window length (P0: 512)")
    args = parser.parse_args()
    args.dataset = args.datasets.split(",")[0]
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    summary = {"command": shlex.join(["python", *sys.argv]), "args": vars(args), "bound_terms": BOUND_TERMS,
               "runs": [], "python": platform.python_version(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if modes:
        checkpoint = Path(args.checkpoint or f"~/.cache/secateur/scale/llama-{args.hidden}-{args.blocks}-{args.ffn}")
        checkpoint = checkpoint.expanduser()
        if not (checkpoint / "config.json").is_file():
            from secateur.models import load_model

            tokenizer = load_model(DEFAULT_SHAPE["vocab_from"]).tokenizer
            print(f"building {checkpoint} ...", file=sys.stderr)
            build_checkpoint(checkpoint, hidden=args.hidden, blocks=args.blocks, ffn=args.ffn, heads=args.heads,
                             tokenizer=tokenizer, shard_bytes=args.shard_mb * 10**6)
        terms = checkpoint_terms(checkpoint, windows=args.max_windows, seqlen=args.eval_seqlen,
                                 nsamples=args.nsamples, calib_seqlen=args.seqlen, method=args.method)
        base_spec = {"model": str(checkpoint), "dataset": args.dataset, "data_dir": args.data_dir,
                     "seqlen": args.eval_seqlen, "windows": args.max_windows, "offload": args.offload_activations,
                     "method": args.method, "sparsity": args.sparsity, "calib": args.calib,
                     "nsamples": args.nsamples, "calib_seqlen": args.seqlen, "work_dir": str(work)}
        rows = run_prune_modes(modes, base_spec)
        for row in rows:
            row["bound_mb"] = bound_mb(row["mode"], terms, row["rss_before_mb"])
        streamed = [row for row in rows if row["mode"] in BOUND_TERMS]
        summary.update(terms_mb=terms, runs=rows, streamed_peak_below_40pct=all(
            row["rss_peak_mb"] < 0.4 * terms["checkpoint_mb"] for row in streamed))
    if args.merge and (out / "scale.json").is_file():  # keep the sections this run does not redo
        previous = json.loads((out / "scale.json").read_text())
        kept = {key: previous[key] for key in ("runs", "terms_mb", "streamed_peak_below_40pct", "ranks",
                                                "resume_cost") if key in previous}
        if not modes:
            summary.update({k: v for k, v in kept.items() if k in ("runs", "terms_mb", "streamed_peak_below_40pct")})
        if not args.ranks and "ranks" in kept:
            summary["ranks"] = kept["ranks"]
        if not args.resume_cost and "resume_cost" in kept:
            summary["resume_cost"] = kept["resume_cost"]
        summary["merged_from"] = previous.get("command")
    if args.ranks:
        summary["ranks"] = ranks_section(args, work)
    if args.resume_cost:
        summary["resume_cost"] = resume_cost_section(args, work)
    text = render(summary, args)
    (out / "scale.json").write_text(json.dumps(summary, indent=2))
    (out / "scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
