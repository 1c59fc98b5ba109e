"""Ablation: one structured (or any) method under several option sets, on the same calibration.

Used to choose Putri's defaults (README, "Structured pruning"). Each spec is
RATIO:METHOD[:KEY=VALUE...]; values are YAML (true, 0.1, global). One JSON line per spec is
printed and appended to --out: WikiText-2 perplexity on the first --max-windows windows of 512
tokens, fraction removed, pruning seconds, KV groups removed and FFN widths per block.

    .venv/bin/python benchmarks/ablation.py --data-dir ../shared/data --seqlen 512 --max-windows 8 \\
        --datasets wikitext2 --out benchmarks/results/putri-defaults.jsonl \\
        0.3:putri 0.3:putri:refit_o_proj=false 0.3:putri:refit_damp=0.1
"""

from __future__ import annotations

import copy
import json
import time

import yaml
from common import benchmark_parser, load_setup

import secateur
from secateur.eval import perplexity


def parse_spec(spec: str) -> tuple[float, str, dict]:
    ratio, method, *options = spec.split(":")
    return float(ratio), method, {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in options)}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="RATIO:METHOD[:KEY=VALUE...]")
    parser.set_defaults(out="benchmarks/results/ablation.jsonl")
    args = parser.parse_args()
    specs = [(spec, *parse_spec(spec)) for spec in args.specs]  # all parsed before any work
    out_file = args.out
    args.out = "benchmarks/results"  # load_setup wants a folder; the lines go to out_file
    _, datasets, loaded, calib = load_setup(args)

    def evaluate(model):
        return {name: round(perplexity(model, loaded.tokenizer, name, seqlen=args.eval_seqlen,
                                       max_windows=args.max_windows, data_dir=args.data_dir)["perplexity"], 2)
                for name in datasets}

    def record(line: dict) -> None:  # one line per run, written at once: an interrupted ablation keeps its runs
        print(json.dumps(line), flush=True)
        with open(out_file, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    record({"spec": "dense", "perplexity": evaluate(loaded.model), "calibration": calib.protocol,
            "args": {k: v for k, v in vars(args).items() if k != "specs"}, "secateur": secateur.__version__})
    for spec, ratio, method, options in specs:
        model = copy.deepcopy(loaded.model)
        started = time.perf_counter()
        _, report = secateur.prune(model, {"method": method, "sparsity": ratio, "method_options": options}, calib,
                                   progress=False)
        elapsed = time.perf_counter() - started
        structure = report.structure or {}
        record({
            "spec": spec, "perplexity": evaluate(model), "removed": round(report.sparsity_achieved, 4),
            "prune_s": round(elapsed, 1), "kv_groups_removed": structure.get("kv_groups_removed"),
            "removed_blocks": structure.get("removed_blocks"),
            "ffn_widths": [block["ffn_width"] for block in structure.get("blocks", [])],
            "warnings": report.warnings,
        })
        del model


if __name__ == "__main__":
    main()
