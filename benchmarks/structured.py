"""Benchmark: structured pruning — Putri (default, perplexity head search, global allocation),
FLAP, wanda-sp and block-drop at 20-50 % of the decoder blocks' parameters.

Prints one markdown table (written with raw numbers as JSON under --out): WikiText-2 and C4
perplexity, parameters, checkpoint size on disk, pruning time, and CPU latency of the pruned
model against the dense one (prefill of 512 tokens; decoding 64 tokens; batch 1) as ratios
measured in the same run, interleaved with the dense model.

The README's table uses protocol P0 (calibration C4 32 × 512 tokens, seed 0; perplexity on the
first 40 windows of 512 tokens), pruning first and latency alone afterwards:

    .venv/bin/python benchmarks/structured.py --data-dir ../shared/data --seqlen 512 \
        --max-windows 40 --repeats 0 --keep-checkpoints --out benchmarks/results/structured-p0
    .venv/bin/python benchmarks/structured.py --data-dir ../shared/data --seqlen 512 \
        --max-windows 40 --repeats 5 --latency-pass --out benchmarks/results/structured-p0
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_parser, load_setup

import secateur
from secateur.eval import perplexity
from secateur.eval.bench import disk_size
from secateur.eval.speed import compare_latency
from secateur.eval.speed import speedups as speed_ratios
from secateur.export import save_checkpoint
from secateur.models import get_adapter

VARIANTS = {
    "putri": ("putri", {}),
    "putri-ppl": ("putri", {"head_score": "perplexity"}),
    "putri-global": ("putri", {"allocation": "global"}),
    "flap": ("flap", {}),
    "wanda-sp": ("wanda-sp", {}),
    "block-drop": ("block-drop", {}),
}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.3,0.4,0.5")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--search-ratios", default="0.2,0.3",
                        help="ratios at which the slow perplexity-searched putri-ppl runs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="latency repetitions per model; 0 = measure latency later with --latency-pass")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every pruned checkpoint under OUT/checkpoints (needed by --latency-pass)")
    parser.add_argument("--latency-pass", action="store_true",
                        help="only time the kept checkpoints against dense (interleaved) and update the table; "
                             "run it when the machine is otherwise idle")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in OUT/structured.json (same settings) and run only the rest")
    args = parser.parse_args()
    out, datasets, loaded, calib = load_setup(args)
    dense, tokenizer = loaded.model, loaded.tokenizer

    def evaluate(model):
        return {name: perplexity(model, tokenizer, name, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                                 data_dir=args.data_dir)["perplexity"] for name in datasets}

    def disk_mb(model, keep_as: str | None = None) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            target = out / "checkpoints" / keep_as if keep_as else Path(tmp) / "ckpt"
            path = save_checkpoint(model, tokenizer if keep_as else None, target, recipe_yaml="", results={},
                                   overwrite=True)
            return disk_size(model, path)["mb"]

    if args.latency_pass:
        latency_pass(args, out, dense, tokenizer, datasets)
        return

    dense_params = get_adapter(dense).count_block_params()
    dense_row = {"perplexity": evaluate(dense), "params": dense_params, "disk_mb": disk_mb(dense)}
    rows = []
    if args.resume and (out / "structured.json").exists():
        previous = json.loads((out / "structured.json").read_text())
        free = ("resume", "ratios", "variants", "search_ratios", "repeats", "keep_checkpoints", "latency_pass")
        same = {k: v for k, v in previous["args"].items() if k not in free}
        now = {k: v for k, v in vars(args).items() if k not in free}
        if same != now:
            sys.exit(f"--resume: {out / 'structured.json'} was made with other settings: {same}")
        rows = previous["runs"]
    done = {(row["variant"], row["ratio"]) for row in rows}
    grid = [(ratio, variant) for ratio in map(float, args.ratios.split(","))
            for variant in args.variants.split(",") if variant != "putri-ppl"]
    # The perplexity-searched Putri costs (blocks × groups) forward passes per round: it runs
    # last, only at --search-ratios.
    if "putri-ppl" in args.variants.split(","):
        grid += [(float(r), "putri-ppl") for r in args.search_ratios.split(",") if r]
    for ratio, variant in grid:
        if (variant, ratio) in done:
            continue
        method, options = VARIANTS[variant]
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        _, report = secateur.prune(model, {"method": method, "sparsity": ratio, "method_options": options},
                                   calib, progress=False)
        elapsed = time.perf_counter() - started
        latency = compare_latency({"dense": dense, "pruned": model}, vocab_size=dense.config.vocab_size,
                                  repeats=args.repeats) if args.repeats else None
        row = {
            "variant": variant, "ratio": ratio, "perplexity": evaluate(model),
            "params": report.structure["params_after"], "removed": report.sparsity_achieved,
            "disk_mb": disk_mb(model, f"{variant}-{ratio}" if args.keep_checkpoints else None),
            "prune_s": elapsed, "timings_s": report.timings_s, **speedups(latency), "structure": report.structure,
        }
        rows.append(row)
        print(f"done {variant} {ratio}: {row['perplexity']} removed {row['removed']:.3f} in {elapsed:.0f} s",
              file=sys.stderr)
        del model
        write_results(out, rows, dense_row, datasets, args, calib.protocol)
    print(render(rows, dense_row, datasets, args))


def speedups(latency) -> dict:
    if latency is None:
        return {"prefill_speedup": None, "decode_speedup": None, "latency": None}
    return speed_ratios(latency, "pruned", "dense") | {"latency": latency}


def write_results(out, rows, dense_row, datasets, args, calibration) -> None:
    (out / "structured.md").write_text(render(rows, dense_row, datasets, args))
    (out / "structured.json").write_text(json.dumps({
        "dense": dense_row, "runs": rows, "calibration": calibration, "args": vars(args),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "secateur": secateur.__version__,
    }, indent=2))


def latency_pass(args, out, dense, tokenizer, datasets) -> None:
    """Time each kept checkpoint against the dense model, interleaved, and rewrite the table:
    pruning and perplexity are CPU-bound work that can share a machine; latency cannot."""
    saved = json.loads((out / "structured.json").read_text())
    rows, latency_repeats = saved["runs"], max(args.repeats, 1)
    wanted = {float(r) for r in args.ratios.split(",")}
    for row in rows:
        if row["ratio"] not in wanted:
            continue  # --ratios limits what is timed (e.g. only 0.5)
        path = out / "checkpoints" / f"{row['variant']}-{row['ratio']}"
        if not path.is_dir():
            print(f"no checkpoint for {row['variant']} {row['ratio']}; rerun with --keep-checkpoints", file=sys.stderr)
            continue
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(path)  # checkpoints kept by older runs hold the weights only
        pruned = secateur.load(str(path)).model
        row.update(speedups(compare_latency({"dense": dense, "pruned": pruned}, vocab_size=dense.config.vocab_size,
                                            repeats=latency_repeats)))
        row["latency_repeats"] = latency_repeats
        print(f"latency {row['variant']} {row['ratio']}: prefill x{row['prefill_speedup']:.2f} "
              f"decode x{row['decode_speedup']:.2f}", file=sys.stderr)
        del pruned
        args.repeats = latency_repeats
        write_results(out, rows, saved["dense"], datasets, args, saved["calibration"])
    print(render(rows, saved["dense"], datasets, args))


def render(rows, dense_row, datasets, args) -> str:
    head = ("| method | removed | " + " | ".join(f"{d} ppl" for d in datasets)
            + " | block params (M) | disk MB | prune s | prefill ×dense | decode ×dense |")
    lines = [
        (f"Model: {args.model}, fp32, CPU ({torch.get_num_threads()} threads). Calibration: {args.nsamples} windows "
         f"× {args.seqlen} tokens from `{args.calib}` (seed 0). Perplexity: first {args.max_windows} windows of "
         f"{args.eval_seqlen} tokens. Latency: prefill of 512 tokens and greedy decoding of 64 tokens, batch 1, "
         f"median of {args.repeats} runs interleaved with the dense model; ratio > 1 = faster than dense."),
        "", head, "|---|---|" + "---:|" * (len(datasets) + 5),
        "| dense | 0 | " + " | ".join(f"{dense_row['perplexity'][d]:.2f}" for d in datasets)
        + f" | {dense_row['params'] / 1e6:.1f} | {dense_row['disk_mb']:.0f} | | 1.00 | 1.00 |",
    ]
    for row in sorted(rows, key=lambda r: (r["ratio"], r["variant"])):
        lines.append(
            f"| {row['variant']} | {row['removed']:.1%} | "
            + " | ".join(f"{row['perplexity'][d]:.2f}" for d in datasets)
            + f" | {row['params'] / 1e6:.1f} | {row['disk_mb']:.0f} | {row['prune_s']:.0f} | "
            + (f"{row['prefill_speedup']:.2f} | {row['decode_speedup']:.2f} |" if row.get("prefill_speedup")
               else "n/a | n/a |")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
