"""Diagnostic: each method's relative reconstruction error on the same layers, free of perplexity noise.

A few layers of the dense model (by default blocks first, ⅓, ⅔ and last × q_proj, o_proj,
up_proj, down_proj) get their input statistics gathered once, by the engine's block session
(the same capture, hooks and `LinearStats` as pruning), on the calibration windows and on as
many held-out windows of the same source (another seed, documents the calibration used left
out). Each layer is then pruned alone, from the dense weights, by every method of
benchmarks/methods.py that works per layer (OWL allocates over blocks: left out; TRIM is per
layer: kept), and its error is measured on both:

    e = ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² = tr((W − Ŵ) G (W − Ŵ)ᵀ) / tr(W G Wᵀ),   G = XᵀX

(a bias the method changes, STADE's, enters the numerator through Σx). The calibration error
is what the reconstruction methods minimise; the held-out one says whether that carries over.

    .venv/bin/python benchmarks/layer_error.py --data-dir ../shared/data --out benchmarks/results/layer-error
"""

from __future__ import annotations

import json
import sys
import time

import torch
from common import benchmark_parser, environment, load_setup
from methods import BEST_SCORER, PATTERNS, UNSTRUCTURED, VARIANTS, Variant

from secateur.data import calibration_windows
from secateur.engine import BlockSession
from secateur.errors import SecateurError
from secateur.methods.base import LayerInfo, PruneResult, get_method, prune_layer
from secateur.models import get_adapter
from secateur.recipe import Recipe
from secateur.stats import LinearStats
from secateur.trim import TRIM_NEEDS, with_row_allocation

DEFAULT_LAYERS = "q_proj,o_proj,up_proj,down_proj"
# TRIM's per-layer search with the other per-layer methods, beside methods.py's wanda-trim.
# Block-level variants (Wanda++'s regional gradients and fit, block_fit=K) are left out: a lone layer
# has no block to differentiate or fit.
LAYER_VARIANTS = [v for v in VARIANTS if v.allocation in ("uniform", "trim") and v.method not in (BEST_SCORER, "wanda++")
                  and not v.options.get("block_fit")] + [
    Variant("ria-trim", "ria", allocation="trim", patterns=UNSTRUCTURED, cost=2),
    # No trim_scores: TRIM's search runs SparseGPT for every candidate (tens per layer).
    Variant("sparsegpt-trim", "sparsegpt", allocation="trim", patterns=UNSTRUCTURED, cost=4),
    Variant("alps-trim", "alps", allocation="trim", patterns=UNSTRUCTURED, cost=4),
]


def held_out_windows(tokenizer, args, calib):
    """As many windows as the calibration has, from the same source with the next seed, none from a
    document the calibration drew from (a streamed source has no documents: offsets may overlap)."""
    drawn = calibration_windows(tokenizer, args.calib, nsamples=2 * args.nsamples, seqlen=args.seqlen,
                                seed=args.seed + 1, data_dir=args.data_dir)
    seen = {window["document"] for window in calib.protocol["windows"] if window["document"] is not None}
    keep = [i for i, window in enumerate(drawn.protocol["windows"]) if window["document"] not in seen]
    keep = keep[: args.nsamples]
    protocol = drawn.protocol | {"windows": [drawn.protocol["windows"][i] for i in keep], "nsamples": len(keep),
                                 "held_out_rule": "seed + 1, twice the windows drawn, those from a calibration "
                                                  "document dropped, the first nsamples kept"}
    return drawn.input_ids[keep], protocol


def chosen_layers(adapter, blocks_flag: str | None, layers_flag: str) -> dict[int, list[str]]:
    """Block index -> linear names (adapter names, matched by their last component or in full)."""
    count = len(adapter.blocks())
    blocks = ([int(b) for b in blocks_flag.split(",")] if blocks_flag
              else sorted({0, count // 3, 2 * count // 3, count - 1}))
    wanted = layers_flag.split(",")
    names = list(adapter.linears(adapter.blocks()[0]))
    picked = [name for name in names if name in wanted or name.rsplit(".", 1)[-1] in wanted]
    if any(not 0 <= b < count for b in blocks) or not picked:
        sys.exit(f"--blocks must be in [0, {count}) and --layers among {', '.join(names)}")
    return {block: picked for block in blocks}


def layer_statistics(model, adapter, input_ids, chosen: dict[int, list[str]], needs) -> dict[str, LinearStats]:
    """Statistics of the chosen layers' inputs in the dense model, keyed "block.name"."""
    session = BlockSession(model, adapter, input_ids, progress=False)
    session.start_pass()
    last, stats = max(chosen), {}
    for index in range(last + 1):
        if index not in chosen:
            session.advance(index)
            continue
        with session.block(index) as block:
            views = {name: view for name, view in adapter.linears(block).items() if name in chosen[index]}
            gathered = session.gather(index, views, needs, advance=index < last)
        stats |= {f"{index}.{name}": value for name, value in gathered.items()}
    return stats


def relative_error(weight: torch.Tensor, bias, result: PruneResult, stats: LinearStats) -> float:
    """‖Y − Ŷ‖² / ‖XWᵀ‖² over the tokens `stats` summed, from their Gram matrix (and Σx for a bias change)."""
    gram = stats.gram.double()
    dense = weight.double()
    removed = dense - result.weight.double()
    error = ((removed @ gram) * removed).sum()
    if result.bias is not None:  # Y − Ŷ = X(W − Ŵ)ᵀ − 1δᵀ, δ = b̂ − b
        delta = result.bias.double() - (0.0 if bias is None else bias.double())
        error += -2 * delta @ (removed @ stats.sum.double()) + stats.count * delta @ delta
    return float(error / ((dense @ gram) * dense).sum())


def layer_method(variant: Variant):
    method = get_method(variant.method, **variant.options)
    return with_row_allocation(method, "trim" if variant.allocation == "trim" else "uniform")


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.set_defaults(seqlen=512, out="benchmarks/results/layer-error")
    parser.add_argument("--seed", type=int, default=0, help="calibration window seed (held-out: seed + 1)")
    parser.add_argument("--blocks", default=None, help="comma list of block indices (default: first, ⅓, ⅔, last)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help="comma list of linear names (last component)")
    parser.add_argument("--patterns", default="0.5,0.7,2:4", help=f"comma list among {', '.join(PATTERNS)}")
    parser.add_argument("--only", default=None,
                        help=f"comma list of variants (default: all): {', '.join(v.name for v in LAYER_VARIANTS)}")
    args = parser.parse_args()
    patterns = args.patterns.split(",")
    only = args.only.split(",") if args.only else None
    names = {v.name for v in LAYER_VARIANTS}
    wrong = sorted(set(patterns) - set(PATTERNS)) + sorted(set(only or []) - names)
    if wrong:
        sys.exit(f"unknown pattern(s) or variant(s) {wrong}; patterns: {', '.join(PATTERNS)}; "
                 f"variants: {', '.join(names)}")
    methods = {}
    for variant in LAYER_VARIANTS:
        if only is not None and variant.name not in only:
            continue
        try:
            methods[variant.name] = (variant, layer_method(variant))
        except SecateurError as error:  # a method or refiner this secateur does not have yet
            print(f"skipped {variant.name}: {error}", file=sys.stderr)

    out, _, loaded, calib = load_setup(args)
    model, adapter = loaded.model, get_adapter(loaded.model)
    chosen = chosen_layers(adapter, args.blocks, args.layers)
    needs = frozenset().union(*(method.needs for _, method in methods.values())) | TRIM_NEEDS | {"sum"}
    held_out_ids, held_out_protocol = held_out_windows(loaded.tokenizer, args, calib)
    grams = {"calibration": layer_statistics(model, adapter, calib.input_ids, chosen, needs),
             "held_out": layer_statistics(model, adapter, held_out_ids, chosen, needs)}
    dense = {f"{index}.{name}": view for index, names in chosen.items()
             for name, view in adapter.linears(adapter.blocks()[index]).items() if name in names}

    rows = []
    # Cheapest variants first, at every pattern: a diagnostic stopped early still compares them all.
    order = sorted(((variant, method, pattern) for variant, method in methods.values() for pattern in patterns
                    if pattern in variant.patterns), key=lambda run: run[0].cost)
    for variant, method, pattern in order:
        kind, sparsity = PATTERNS[pattern]
        target = Recipe(sparsity=sparsity, sparsity_type=kind).target()
        rows += [measure(adapter, key, view, method, target, grams) | {"pattern": pattern, "variant": variant.name}
                 for key, view in dense.items()]
        print(f"done {variant.name} at {pattern}", file=sys.stderr)
        (out / "layer_error.json").write_text(json.dumps({
            "runs": rows, "calibration": calib.protocol, "held_out": held_out_protocol,
            "layers": list(dense), "args": vars(args), **environment(),
        }, indent=2))
        (out / "layer_error.md").write_text(render(rows, list(dense), patterns, args))
    print(render(rows, list(dense), patterns, args))


def measure(adapter, key: str, view, method, target, grams: dict[str, dict[str, LinearStats]]) -> dict:
    """Prune layer `key` ("block.name") alone from its dense weights; its errors on each Gram."""
    weight, bias = view.get_weight().float().clone(), view.get_bias()  # the dense weights stay untouched
    bias = None if bias is None else bias.float()
    layer = LayerInfo(role=adapter.layer_role(key.split(".", 1)[1]))
    row = {"layer": key, "shape": list(weight.shape)}
    started = time.perf_counter()
    try:
        result = prune_layer(method, weight, bias, grams["calibration"][key], target, layer)
    except SecateurError as error:  # e.g. a method that refuses this pattern
        return row | {"failed": str(error)}
    row["seconds"] = time.perf_counter() - started
    row["sparsity"] = float((result.weight == 0).float().mean())
    return row | {f"error_{which}": relative_error(weight, bias, result, stats[key]) for which, stats in grams.items()}


def render(rows: list[dict], layers: list[str], patterns: list[str], args) -> str:
    """Per pattern: layers down, variants across, "calibration / held-out" error in %."""
    lines = [(f"Model: {args.model}. Relative reconstruction error ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² in %, each layer pruned "
              f"alone from the dense model: calibration Gram ({args.nsamples} × {args.seqlen} tokens of "
              f"`{args.calib}`, seed {args.seed}) / held-out Gram (as many windows, seed {args.seed + 1}, other "
              "documents). Mean: over the layers shown.")]
    for pattern in (p for p in patterns if any(row["pattern"] == p for row in rows)):
        variants = list(dict.fromkeys(row["variant"] for row in rows if row["pattern"] == pattern))
        cell = {(row["variant"], row["layer"]): row for row in rows if row["pattern"] == pattern}
        lines += ["", f"Pattern {pattern}:", "", "| layer | " + " | ".join(variants) + " |",
                  "|---|" + "---:|" * len(variants)]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(_cell(cell.get((v, layer))) for v in variants) + " |")
        means = []
        for variant in variants:
            done = [r for r in (cell.get((variant, layer)) for layer in layers) if r and "failed" not in r]
            means.append(_cell({key: sum(r[key] for r in done) / len(done) for key in
                                ("error_calibration", "error_held_out")} if done else None))
        lines.append("| mean | " + " | ".join(means) + " |")
        seconds = [[r["seconds"] for r in (cell.get((v, layer)) for layer in layers) if r and "seconds" in r]
                   for v in variants]
        lines.append("| s per layer | " + " | ".join(f"{sum(t) / len(t):.2f}" if t else "" for t in seconds) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if "failed" in row:
        return "failed"
    return f"{100 * row['error_calibration']:.2f} / {100 * row['error_held_out']:.2f}"


if __name__ == "__main__":
    main()
