"""`secateur prune | eval`: the command line over the Python API.

Every `prune` flag that changes what is computed maps 1:1 to a `Recipe` field (dashes
become underscores); a flag given on the command line overrides the same field of
`--recipe FILE`. Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import torch
import yaml

from secateur.errors import SecateurError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SecateurError(f"{message} (see '{self.prog} --help')")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory, hub id, .gguf file, or alias smollm2-135m | gemma3-270m "
                             "(default: smollm2-135m, packaged)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype; auto = float32 on CPU, bfloat16 on GPU. Statistics are always fp32+")
    parser.add_argument("--data-dir", default=None,
                        help="directory with c4/ and wikitext-2-raw/ (layout of shared/data); default $SECATEUR_DATA")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secateur", description="Post-training pruning of large language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and (optionally) evaluate and save it")
    _add_model_args(p)
    p.add_argument("--recipe", default=None, help="YAML file of recipe fields; flags override it")
    p.add_argument("--method", help="magnitude | wanda | stade | sparsegpt (default wanda)")
    p.add_argument("--sparsity", type=float, help="fraction of weights to remove, in [0, 1) (default 0.5)")
    p.add_argument("--sparsity-type", help="unstructured | N:M such as 2:4, 4:8 (default unstructured)")
    p.add_argument("--allocation", help="uniform | owl (outlier-weighted sparsity per block)")
    p.add_argument("--owl-threshold", type=float, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, help="OWL spread λ around the target (default 0.08)")
    p.add_argument("--ignore", action="append", help="glob over blocks.<i>.<linear> to keep dense; repeatable")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="method parameter, e.g. blocksize=128, damp=0.01 (sparsegpt), scope=row (magnitude)")
    p.add_argument("--calib", help="calibration source: wiki-passages (default, offline), c4, wikitext2, or a "
                                   ".txt/.jsonl/.jsonl.gz/.parquet file")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, help="seed for drawing calibration windows (default 0)")
    p.add_argument("--eval", type=_csv, default=[], metavar="DATASETS",
                   help="evaluate dense and pruned perplexity on these datasets, e.g. wikitext2,c4")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    p.add_argument("--out", default=None, help="write the pruned checkpoint, recipe.yaml and results.json here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")

    e = sub.add_parser("eval", help="perplexity of a model under a recorded protocol")
    _add_model_args(e)
    e.add_argument("--datasets", type=_csv, default=["wikitext2"], help="comma list, e.g. wikitext2,c4")
    e.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    return parser


def _version() -> str:
    from secateur import __version__

    return f"secateur {__version__}"


def _resolve_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    kind = torch.device(device).type if device else "cpu"
    if kind not in ("cpu", "cuda"):
        raise SecateurError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SecateurError("--device cuda was asked but no CUDA GPU is available; use --device cpu")
    if dtype == "auto":
        return device, torch.float32 if kind == "cpu" else torch.bfloat16
    return device, getattr(torch, dtype)


def _recipe_from_args(args) -> Recipe:  # noqa: F821
    from secateur.recipe import Recipe

    base = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else {}
    flags = {
        "method": args.method, "sparsity": args.sparsity, "sparsity_type": args.sparsity_type,
        "allocation": args.allocation, "owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda,
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.ignore:
        base["ignore"] = [pattern for item in args.ignore for pattern in _csv(item)]
    if args.method_option:
        options = dict(base.get("method_options") or {})
        for item in args.method_option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise SecateurError(f"--method-option {item!r} is not KEY=VALUE (e.g. blocksize=128)")
            options[key.strip()] = yaml.safe_load(value)
        base["method_options"] = options
    return Recipe.from_dict(base)


def _peak_memory_mb(device: str) -> dict:
    """The whole process's peak (loading and evaluation included), beside the pruning phase's own."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = {"process_rss_peak_mb": round(rss_kb / 1024, 1)}
    if torch.device(device).type == "cuda":
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def _versions() -> dict:
    import transformers

    from secateur import __version__

    return {"secateur": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _evaluate_all(model, tokenizer, datasets, seqlen, args, device, label) -> tuple[dict, dict]:
    from secateur.eval import perplexity

    values, protocols = {}, {}
    for name in datasets:
        result = perplexity(model, tokenizer, name, seqlen=seqlen, max_windows=args.max_windows,
                            data_dir=args.data_dir, device=device, progress=not args.quiet)
        values[name] = result["perplexity"]
        protocols[name] = result["protocol"]
        if not args.quiet:
            print(f"[{label}] {name}: perplexity {result['perplexity']:.3f}", file=sys.stderr)
    return values, protocols


def _print_table(perplexity: dict) -> None:
    datasets = sorted({name for values in perplexity.values() for name in values})
    if not datasets:
        return
    print("| model | " + " | ".join(f"{d} ppl" for d in datasets) + " |")
    print("|---|" + "---:|" * len(datasets))
    for label, values in perplexity.items():
        print(f"| {label} | " + " | ".join(f"{values[d]:.3f}" if d in values else "" for d in datasets) + " |")


def cmd_prune(args) -> int:
    from secateur import prune as prune_api
    from secateur.data import calibration_windows
    from secateur.export import check_destination, save_checkpoint, write_json_atomic
    from secateur.methods import get_method
    from secateur.models import load_model

    started = time.perf_counter()
    recipe = _recipe_from_args(args)
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    if args.out:
        check_destination(args.out, args.overwrite)
    eval_seqlen = args.eval_seqlen or recipe.seqlen
    for name in args.eval:  # fail on an unknown dataset before the long work starts
        from secateur.data import check_dataset_name

        check_dataset_name(name, args.data_dir)

    loaded = load_model(args.model, dtype=dtype, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    method = get_method(recipe.method, **recipe.method_options)
    calibration = None
    if getattr(method, "structured", False) or method.needs or recipe.allocation == "owl":
        calibration = calibration_windows(tokenizer, recipe.calib, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                                          seed=recipe.seed, data_dir=args.data_dir)

    perplexity, eval_protocol = {}, {}
    if args.eval:
        perplexity["dense"], eval_protocol = _evaluate_all(model, tokenizer, args.eval, eval_seqlen, args, device,
                                                           "dense")
        model.to("cpu")

    model, report = prune_api(model, recipe, calibration, tokenizer=tokenizer, device=device,
                              progress=not args.quiet)
    if args.eval:
        perplexity["pruned"], _ = _evaluate_all(model, tokenizer, args.eval, eval_seqlen, args, device, "pruned")
        model.to("cpu")

    results = {
        "model": loaded.source,
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
        "perplexity": perplexity,
        "timings_s": report.timings_s | {"run_total": round(time.perf_counter() - started, 3)},
        "peak_memory_mb": report.memory_mb | _peak_memory_mb(device),
        "protocol": {
            "calibration": calibration.protocol if calibration is not None else None,
            "evaluation": eval_protocol,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "warnings": report.warnings,
        "versions": _versions(),
        "recipe": recipe.to_dict(),
    }
    if args.out:
        save_checkpoint(model, tokenizer, args.out, recipe_yaml=recipe.to_yaml(), results=results,
                        overwrite=args.overwrite)
    if args.json:
        write_json_atomic(args.json, results)
    _summary(results, args.out)
    return 0


def _summary(results: dict, out) -> None:
    structure, timings = results.get("structure"), results["timings_s"]
    if structure:
        print(f"{results['method']} target {results['sparsity_target']:.3f}: removed "
              f"{results['sparsity_achieved']:.4f} of the decoder blocks' parameters "
              f"({structure['params_before']:,} -> {structure['params_after']:,}) in {timings['total']:.1f} s")
    else:
        print(f"{results['method']} {results['sparsity_type']} target {results['sparsity_target']:.3f}: "
              f"achieved {results['sparsity_achieved']:.4f} over {len(results['layers'])} layers "
              f"in {timings['total']:.1f} s (calibration forward {timings['calibration_forward']:.1f} s, "
              f"pruning {timings['pruning']:.1f} s)")
    _print_table(results["perplexity"])
    for warning in results["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if out:
        print(f"saved to {out}")


def cmd_eval(args) -> int:
    from secateur.data import check_dataset_name
    from secateur.export import write_json_atomic
    from secateur.models import load_model

    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    for name in args.datasets:
        check_dataset_name(name, args.data_dir)
    loaded = load_model(args.model, dtype=dtype, device="cpu")
    values, protocols = _evaluate_all(loaded.model, loaded.tokenizer, args.datasets, args.seqlen, args, device,
                                      "model")
    _print_table({loaded.source: values})
    if args.json:
        write_json_atomic(args.json, {name: {"perplexity": values[name], "protocol": protocols[name]}
                                      for name in values} | {"model": loaded.source, "versions": _versions()})
    return 0


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.quiet:
            _quiet_transformers()
        return {"prune": cmd_prune, "eval": cmd_eval}[args.command](args)
    except SecateurError as error:
        print(f"secateur: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secateur: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
