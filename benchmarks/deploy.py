"""Benchmark: deployment in llama.cpp — dense and structurally pruned models exported to GGUF.

For the dense model and each pruned one (Putri at --ratios by default): the GGUF of every
--types, its size, llama.cpp's prefill and decode speed (tokens/s, --threads threads, median of
--repeats runs interleaved across models), and llama.cpp's WikiText-2 perplexity next to
transformers' perplexity of the same model in memory. Both perplexities use secateur's own
windows and NLL code (secateur.eval.perplexity): llama.cpp is wrapped as a model whose logits
come from `Llama.eval` with all logits kept, so the tokens scored are the same. An f32 file must
match transformers within 1 % (the `match` column); f16 and q8_0 show what quantization costs.

The README's table (protocol P0: calibration C4 32 × 512 tokens, seed 0; perplexity on the first
40 windows of 512 tokens), run alone on the machine:

    .venv/bin/python benchmarks/deploy.py --data-dir ../shared/data --seqlen 512 --max-windows 40 \
        --out benchmarks/results/deploy-p0

Needs llama-cpp-python (`pip install -e .[llama]`).
"""

from __future__ import annotations

import copy
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import benchmark_parser, load_setup

import secateur
from secateur.eval import perplexity
from secateur.gguf_export import export_gguf

MATCH = 0.01  # llama.cpp's perplexity of an f32 file within 1 % of transformers'


def allow_weight_repacking(allowed: bool) -> None:
    """llama.cpp repacks quantized weights for its extra CPU kernels (AMX, interleaved q4/q8) when
    it loads a model. With llama-cpp-python 0.3.36 built here, a batched q8_0/q4_0 forward in the
    repacked layout crashes (segfault, the packaged SmolLM2 GGUF too); single tokens do not. Off
    unless --repack: quantized prefill then runs llama.cpp's plain kernels."""
    import llama_cpp
    import llama_cpp.llama

    stock = llama_cpp.llama_model_default_params

    def defaults():
        params = stock()
        params.use_extra_bufts = allowed
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


class LlamaCppModel:
    """A llama.cpp model seen through the one call secateur's perplexity makes:
    `model(input_ids, use_cache=False).logits`, logits of every position, float32."""

    training = False

    def __init__(self, path: Path, *, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False):
        tokens = input_ids[0].tolist()
        self.llm.reset()
        self.llm.eval(tokens)
        logits = torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))
        return type("Output", (), {"logits": logits[None]})()


def llama_cpp_speed(paths: dict[str, Path], *, vocab_size: int, threads: int, prompt_tokens: int,
                    decode_tokens: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of each GGUF in llama.cpp, runs interleaved across files."""
    from llama_cpp import Llama

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (prompt_tokens,), generator=generator).tolist()
    models = {name: Llama(model_path=str(path), n_ctx=prompt_tokens + decode_tokens + 16, n_batch=prompt_tokens,
                          n_ubatch=prompt_tokens, n_threads=threads, n_threads_batch=threads, verbose=False)
              for name, path in paths.items()}

    def one_run(llm) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for token in itertools.islice(itertools.cycle(prompt), decode_tokens):  # one at a time, with the KV cache
            llm.eval([token])
        return prompt_tokens / prefill, decode_tokens / (time.perf_counter() - start)

    for llm in models.values():  # warm-up
        one_run(llm)
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, llm in models.items():
            runs[name].append(one_run(llm))
    for llm in models.values():
        llm.close()
    return {name: {"prefill_tok_s": statistics.median(r[0] for r in values),
                   "decode_tok_s": statistics.median(r[1] for r in values), "runs": len(values)}
            for name, values in runs.items()}


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.set_defaults(datasets="wikitext2")
    parser.add_argument("--method", default="putri")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--types", default="f32,f16,q8_0", help="GGUF tensor types to export and measure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed llama.cpp runs per file (0: no timing)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--keep-gguf", action="store_true", help="keep the GGUF files under OUT/gguf")
    parser.add_argument("--repack", action="store_true",
                        help="let llama.cpp repack quantized weights for its extra CPU kernels (crashes with "
                             "llama-cpp-python 0.3.36 on this machine; see allow_weight_repacking)")
    args = parser.parse_args()
    allow_weight_repacking(args.repack)
    out, datasets, loaded, calib = load_setup(args)
    dense, tokenizer = loaded.model, loaded.tokenizer
    types = args.types.split(",")

    models = {"dense": dense}
    prune_s = {"dense": 0.0}
    for ratio in map(float, args.ratios.split(",")):
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        secateur.prune(model, {"method": args.method, "sparsity": ratio}, calib, progress=False)
        name = f"{args.method}-{ratio}"
        models[name], prune_s[name] = model, time.perf_counter() - started
        print(f"pruned {name} in {prune_s[name]:.0f} s", file=sys.stderr)

    with tempfile.TemporaryDirectory() as scratch:
        folder = out / "gguf" if args.keep_gguf else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        rows, files = [], {}
        for name, model in models.items():
            reference = {d: perplexity(model, tokenizer, d, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                                       data_dir=args.data_dir)["perplexity"] for d in datasets}
            for gguf_type in types:
                path = folder / f"{name}-{gguf_type}.gguf"
                written = export_gguf(model, tokenizer, path, gguf_type=gguf_type, overwrite=True,
                                      name=f"{args.model} {name}")
                llama = LlamaCppModel(path, n_ctx=args.eval_seqlen, threads=args.threads)
                measured = {d: perplexity(llama, tokenizer, d, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                                          data_dir=args.data_dir)["perplexity"] for d in datasets}
                llama.llm.close()
                gap = {d: measured[d] / reference[d] - 1 for d in datasets}
                row = {"model": name, "type": gguf_type, "arch": written.arch, "notes": written.notes,
                       "gguf_mb": path.stat().st_size / 2**20, "prune_s": prune_s[name],
                       "ppl_transformers": reference, "ppl_llama_cpp": measured, "ppl_gap": gap,
                       "match": all(abs(g) <= MATCH for g in gap.values()) if gguf_type == "f32" else None}
                rows.append(row)
                files[(name, gguf_type)] = path
                print(f"{name} {gguf_type}: llama.cpp {measured} vs transformers {reference}", file=sys.stderr)
                write_results(out, rows, args)
        if args.repeats:
            for gguf_type in types:
                speed = llama_cpp_speed({name: files[(name, gguf_type)] for name in models},
                                        vocab_size=dense.config.vocab_size, threads=args.threads,
                                        prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                        repeats=args.repeats)
                for row in rows:
                    if row["type"] == gguf_type:
                        row.update(speed[row["model"]])
                write_results(out, rows, args)
    print(render(rows, args))
    if any(row["match"] is False for row in rows):
        sys.exit("llama.cpp's perplexity of an f32 export is more than 1 % from transformers'")


def write_results(out: Path, rows: list, args) -> None:
    import gguf

    try:
        from importlib.metadata import version

        llama_cpp_version = version("llama-cpp-python")
    except Exception:  # noqa: BLE001 (not installed: recorded as unknown)
        llama_cpp_version = None
    (out / "deploy.md").write_text(render(rows, args))
    (out / "deploy.json").write_text(json.dumps({
        "runs": rows, "args": vars(args), "python": platform.python_version(), "torch": torch.__version__,
        "secateur": secateur.__version__, "gguf": getattr(gguf, "__version__", None),
        "llama_cpp_python": llama_cpp_version,
    }, indent=2))


def render(rows: list, args) -> str:
    datasets = list(rows[0]["ppl_transformers"]) if rows else []
    lines = [
        (f"Model: {args.model}; pruned with {args.method} (calibration: {args.nsamples} windows × {args.seqlen} "
         f"tokens from `{args.calib}`, seed 0). Perplexity: first {args.max_windows} windows of {args.eval_seqlen} "
         f"tokens, transformers (fp32, in memory) and llama.cpp (the GGUF) on the same tokens. llama.cpp speed: "
         f"{args.threads} threads, prefill of {args.prompt_tokens} tokens, then decoding of "
         f"{args.decode_tokens} tokens one at a time, median of {args.repeats} runs interleaved across models; weight "
         f"repacking {'on' if args.repack else 'off'}."),
        "",
        "| model | GGUF | arch | MB | " + " | ".join(f"{d} ppl transformers | {d} ppl llama.cpp" for d in datasets)
        + " | f32 match (1 %) | prefill tok/s | decode tok/s |",
        "|---|---|---|---:|" + "---:|---:|" * len(datasets) + "---|---:|---:|",
    ]
    for row in rows:
        match = "" if row["match"] is None else ("yes" if row["match"] else "NO")
        speed = (f"{row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f}" if "prefill_tok_s" in row else "n/a | n/a")
        lines.append(
            f"| {row['model']} | {row['type']} | {row['arch']} | {row['gguf_mb']:.1f} | "
            + " | ".join(f"{row['ppl_transformers'][d]:.3f} | {row['ppl_llama_cpp'][d]:.3f}" for d in datasets)
            + f" | {match} | {speed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
