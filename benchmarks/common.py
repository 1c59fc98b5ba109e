"""What the benchmark scripts share: the model/data/evaluation flags and their defaults, evaluation,
resuming an interrupted grid, and the environment recorded with the numbers."""

from __future__ import annotations

import argparse


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    """Model, calibration and perplexity flags; each script adds its own grid flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="shared/data layout (c4/, wikitext-2-raw/)")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--datasets", default="wikitext2,c4")
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def load_setup(args):
    """The output folder, dataset names, the dense model and the calibration windows (seed 0)."""
    from pathlib import Path

    import secateur
    from secateur.data import calibration_windows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = secateur.load(args.model)
    # seed 0 unless the script offers --seed (the older scripts' recorded args have no seed).
    calib = calibration_windows(loaded.tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                seed=getattr(args, "seed", 0), data_dir=args.data_dir)
    return out, args.datasets.split(","), loaded, calib


def evaluate_perplexity(model, tokenizer, datasets, args) -> tuple[dict, dict]:
    """Perplexity of `model` on each dataset under the script's protocol, and each protocol."""
    from secateur.eval import perplexity

    values, protocols = {}, {}
    for name in datasets:
        result = perplexity(model, tokenizer, name, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                            data_dir=args.data_dir)
        values[name], protocols[name] = result["perplexity"], result["protocol"]
    return values, protocols


def resumed_results(path, args, free: tuple[str, ...]) -> dict:
    """What an interrupted run with the same settings left in `path` (JSON with "runs" and "args"),
    {} if nothing; exits if it was made with other settings (apart from the `free` flags)."""
    import json
    import sys

    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    same = {k: v for k, v in previous["args"].items() if k not in free}
    now = {k: v for k, v in vars(args).items() if k not in free}
    if same != now:
        sys.exit(f"--resume: {path} was made with other settings: {same}")
    return previous


def resumed_rows(path, args, free: tuple[str, ...]) -> list[dict]:
    """The rows of `resumed_results`."""
    return resumed_results(path, args, free).get("runs", [])


def environment() -> dict:
    """What the numbers were measured with, recorded next to them."""
    import platform

    import torch

    import secateur

    return {"torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "secateur": secateur.__version__}
