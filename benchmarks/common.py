"""What both benchmark scripts share: the model/data/evaluation flags and their defaults."""

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
    calib = calibration_windows(loaded.tokenizer, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                data_dir=args.data_dir)
    return out, args.datasets.split(","), loaded, calib
