"""Benchmark: unstructured, N:M and OWL pruning of SmolLM2-135M with every method.

Prints one markdown table (and writes it, with the raw numbers as JSON, under --out):
WikiText-2 and C4 perplexity dense vs pruned, pruning time against the calibration
forward passes it needs, and the pruning phase's peak memory against the budget
"model + one block's calibration activations + 20%".

    .venv/bin/python benchmarks/unstructured.py --data-dir ../shared/data

All runs share one process and one dense model (each run prunes a fresh copy), so
the timing ratios compare like with like on this machine.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time

import torch
from common import benchmark_parser, evaluate_perplexity, load_setup

import secateur

# (method, pattern, sparsity, allocation, method options)
RUNS = [(method, kind, sparsity, "uniform", {}) for method in ("magnitude", "wanda", "stade", "sparsegpt")
        for kind, sparsity in (("unstructured", 0.5), ("4:8", 0.5), ("2:4", 0.5))]
# STADE's split variant (the reference's): STADE on o_proj/down_proj, Wanda on the rest.
RUNS += [("stade", kind, sparsity, "uniform", {"layers": "out"})
         for kind, sparsity in (("unstructured", 0.5), ("4:8", 0.5), ("2:4", 0.5))]
RUNS += [(method, "unstructured", 0.7, allocation, {}) for method in ("wanda", "sparsegpt")
         for allocation in ("uniform", "owl")]
# Targets from the issue: prune time / calibration forward time.
TIME_TARGET = {"magnitude": 1.3, "wanda": 1.3, "stade": 1.3, "sparsegpt": 2.0}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma list of methods to run (default: all)")
    parser.add_argument("--patterns", default=None,
                        help="comma list of patterns to run, e.g. unstructured,2:4 (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out, datasets, loaded, calib = load_setup(args)
    dense, tokenizer = loaded.model, loaded.tokenizer
    model_mb = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**20
    activation_mb = args.nsamples * args.seqlen * dense.config.hidden_size * 4 / 2**20

    def evaluate(model):
        return evaluate_perplexity(model, tokenizer, datasets, args)

    dense_ppl, eval_protocol = evaluate(dense)
    rows = []
    runs = [r for r in RUNS if (args.only is None or r[0] in args.only.split(","))
            and (args.patterns is None or r[1] in args.patterns.split(","))]
    for method, kind, sparsity, allocation, options in runs:
        model = copy.deepcopy(dense)
        recipe = {"method": method, "sparsity": sparsity, "sparsity_type": kind, "allocation": allocation,
                  "nsamples": args.nsamples, "seqlen": args.seqlen, "method_options": options}
        started = time.perf_counter()
        _, report = secateur.prune(model, recipe, calib, progress=False)
        elapsed = time.perf_counter() - started
        ppl, _ = evaluate(model)
        timings = report.timings_s
        # OWL's dense survey pass is a calibration forward pass the method needs too.
        forward = timings["calibration_forward"] + timings.get("owl_survey", 0.0)
        memory = report.memory_mb
        working_set = model_mb + memory["rss_peak_mb"] - memory["rss_before_mb"]
        rows.append({
            "method": method, "options": options, "type": kind, "sparsity": sparsity, "allocation": allocation,
            "achieved": report.sparsity_achieved, "perplexity": ppl, "timings_s": timings, "wall_s": elapsed,
            "forward_s": forward, "time_ratio": timings["total"] / forward if forward else None,
            "memory_mb": memory, "working_set_mb": working_set,
            "memory_ratio": working_set / (model_mb + activation_mb),
        })
        print(f"done {method} {options} {kind} {sparsity} {allocation}: {ppl} in {elapsed:.1f} s", file=sys.stderr)
        del model
        # Written after every run, so an interrupted benchmark still leaves what it measured.
        table = render(rows, dense_ppl, datasets, args, model_mb, activation_mb)
        (out / "unstructured.md").write_text(table)
        (out / "unstructured.json").write_text(json.dumps({
            "dense": dense_ppl, "runs": rows, "calibration": calib.protocol, "evaluation": eval_protocol,
            "model_mb": model_mb, "activation_mb": activation_mb, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "secateur": secateur.__version__,
            "args": vars(args),
        }, indent=2))
    print(table)


def render(rows, dense_ppl, datasets, args, model_mb, activation_mb) -> str:
    lines = [
        (f"Model: {args.model}, fp32, CPU ({torch.get_num_threads()} threads). Calibration: {args.nsamples} windows "
         f"× {args.seqlen} tokens from `{args.calib}` (seed 0). Perplexity: first {args.max_windows} "
         f"non-overlapping windows of {args.eval_seqlen} tokens (protocol recorded in unstructured.json)."),
        "",
        ("| method | sparsity | " + " | ".join(f"{d} ppl" for d in datasets)
         + " | prune s | calib fwd s | ratio (target) | working set MB (ratio, target 1.2) |"),
        "|---|---|" + "---:|" * len(datasets) + "---:|---:|---:|---:|",
        "| dense | 0 | " + " | ".join(f"{dense_ppl[d]:.2f}" for d in datasets) + " | | | | |",
    ]
    for row in rows:
        label = row["type"] if row["type"] != "unstructured" else f"{row['sparsity']:.0%}"
        if row["allocation"] == "owl":
            label += " OWL"
        ratio = row["time_ratio"]
        target = TIME_TARGET[row["method"]]
        verdict = "n/a (no calibration)" if ratio is None else f"{ratio:.2f} ({'≤' if ratio <= target else '>'}{target})"
        name = row["method"] + "".join(f" {k}={v}" for k, v in row.get("options", {}).items())
        lines.append(
            f"| {name} | {label} | " + " | ".join(f"{row['perplexity'][d]:.2f}" for d in datasets)
            + f" | {row['timings_s']['total']:.1f} | {row['forward_s']:.1f} | {verdict} | "
            f"{row['working_set_mb']:.0f} ({row['memory_ratio']:.2f}) |"
        )
    lines += ["", (f"Budget: model {model_mb:.0f} MB + one block's calibration activations {activation_mb:.0f} MB. "
                   "Working set = model + (peak RSS during pruning − RSS before pruning).")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
