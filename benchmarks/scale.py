"""Benchmark: memory at scale — a synthetic Llama-shaped checkpoint bigger than what streaming may hold.

Builds (once, cached under --checkpoint) a random-weight fp32 Llama checkpoint saved as several
safetensors shards — by default hidden 2048, 12 blocks, FFN 5632, 16 heads, SmolLM2's
49,152-token vocabulary and tokenizer, untied embeddings: 3.27 GB of weights — and measures, each
run in a fresh subprocess, the peak RSS of:

- `in-memory`: load the whole model (load_model) and compute its perplexity;
- `streamed`: open it as a StreamedModel (one block in memory at a time) and compute the same
  perplexity.

Beside each figure go the terms of the issue's bound, "one block's weights in fp32 + its
statistics + the calibration activations + the embeddings + 20 %", with the interpreter's own
baseline (Python, torch, transformers, tokenizer) measured before any weight is read, and the
check that the streamed peak is under 40 % of the checkpoint's size. Prune rows (in-memory vs
--stream) are one more entry in MODES each.

Run alone (the figures are the machine's memory, and the in-memory row holds 3.3 GB):

    .venv/bin/python benchmarks/scale.py --data-dir ../shared/data --out benchmarks/results/scale
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from common import benchmark_parser

BYTES_FP32 = 4
DEFAULT_SHAPE = {"hidden": 2048, "blocks": 12, "ffn": 5632, "heads": 16, "vocab_from": "smollm2-135m"}


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


def checkpoint_terms(directory: Path, *, windows: int, seqlen: int) -> dict:
    """The sizes (MiB) the memory bound is made of, read from the checkpoint's config and index."""
    config = json.loads((directory / "config.json").read_text())
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    block = attention + 3 * hidden * ffn + 2 * hidden
    index = directory / "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    size = json.loads(index.read_text())["metadata"]["total_size"] if index.is_file() else files[0].stat().st_size
    mib = 2**20
    return {
        "checkpoint_mb": size / mib,
        "shards": len(files),
        "block_fp32_mb": block * BYTES_FP32 / mib,
        "embeddings_mb": vocab * hidden * BYTES_FP32 / mib,  # one matrix: input embeddings or LM head
        "activations_mb": windows * seqlen * hidden * BYTES_FP32 / mib,
        "logits_mb": seqlen * vocab * BYTES_FP32 / mib,  # one window's logits (perplexity only)
        "statistics_mb": 0.0,  # perplexity gathers none; prune rows add theirs
    }


# --- what each child process measures ---------------------------------------------------------


def _perplexity_in_memory(spec: dict) -> dict:
    from secateur.eval import perplexity
    from secateur.models import load_model

    loaded = load_model(spec["model"])
    return perplexity(loaded.model, loaded.tokenizer, spec["dataset"], seqlen=spec["seqlen"],
                      max_windows=spec["windows"], data_dir=spec["data_dir"])


def _perplexity_streamed(spec: dict) -> dict:
    from secateur.eval import perplexity
    from secateur.models.streaming import StreamedModel

    with StreamedModel.open(spec["model"], offload_activations=spec.get("offload")) as stream:
        return perplexity(stream, stream.tokenizer, spec["dataset"], seqlen=spec["seqlen"],
                          max_windows=spec["windows"], data_dir=spec["data_dir"])


MODES = {"in-memory": _perplexity_in_memory, "streamed": _perplexity_streamed}
# The terms of each streamed mode's bound. The bound (block + statistics + activations +
# embeddings) is pruning's; perplexity also holds one window's logits beside the LM head. A mode
# that holds the whole model has none.
BOUND_TERMS = {"streamed": ("block_fp32_mb", "statistics_mb", "activations_mb", "embeddings_mb", "logits_mb")}


def child(spec: dict) -> dict:
    """Run one mode and return its perplexity with the peak RSS of that work (what the
    interpreter and libraries hold before it is the baseline, measured apart)."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (library code counts in the baseline)

    import secateur.eval  # noqa: F401
    from secateur.engine.memory import PeakMemory

    with PeakMemory() as memory:
        result = MODES[spec["mode"]](spec)
    figures = memory.result()
    figures["rss_peak_scope"] = "this run's work" if memory.phase_only else "whole process"
    return {"mode": spec["mode"], "perplexity": result["perplexity"], **figures}


def measure(spec: dict) -> dict:
    """`child(spec)` in a fresh interpreter, so no earlier run's memory counts."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['mode']} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the report ---------------------------------------------------------------------------------


def bound_mb(mode: str, terms: dict, baseline_mb: float) -> float | None:
    """A streamed mode's bound: its terms (BOUND_TERMS) × 1.2, plus what the interpreter held
    before any weight was read; None for a mode that holds the whole model."""
    if mode not in BOUND_TERMS:
        return None
    return 1.2 * sum(terms[term] for term in BOUND_TERMS[mode]) + baseline_mb


def render(rows: list[dict], terms: dict, args) -> str:
    lines = [
        (f"Synthetic Llama checkpoint: {terms['checkpoint_mb']:.0f} MiB of fp32 weights in {terms['shards']} "
         f"safetensors shards. Perplexity on `{args.dataset}`, {args.max_windows} windows of {args.eval_seqlen} "
         "tokens. Peak RSS of each run's work (fresh process; `baseline` = interpreter and libraries before any "
         "weight is read)."),
        "",
        (f"Bound terms: one block fp32 {terms['block_fp32_mb']:.0f} MiB, embeddings {terms['embeddings_mb']:.0f} "
         f"MiB (one matrix), activations {terms['activations_mb']:.1f} MiB, statistics {terms['statistics_mb']:.0f} "
         f"MiB, one window's logits {terms['logits_mb']:.0f} MiB."),
        "",
        "| run | perplexity | baseline MiB | peak RSS MiB | peak / checkpoint | bound MiB | within bound |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        bound = bound_mb(row["mode"], terms, row["rss_before_mb"])
        lines.append(
            f"| {row['mode']} | {row['perplexity']:.3f} | {row['rss_before_mb']:.0f} | {row['rss_peak_mb']:.0f} | "
            f"{row['rss_peak_mb'] / terms['checkpoint_mb']:.1%} | "
            + ("— | — |" if bound is None else f"{bound:.0f} | {'yes' if row['rss_peak_mb'] <= bound else 'no'} |")
        )
    lines += ["", "Bound = 1.2 × (" + "; ".join(f"{mode}: {' + '.join(t.removesuffix('_mb') for t in names)}"
                                                  for mode, names in BOUND_TERMS.items()) + ") + baseline."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = benchmark_parser(__doc__.splitlines()[0])
    parser.set_defaults(out="benchmarks/results/scale", datasets="wikitext2")
    parser.add_argument("--checkpoint", default=None,
                        help="where the synthetic checkpoint is built, reused when present (default: "
                             "~/.cache/secateur/scale/llama-HIDDEN-BLOCKS-FFN, outside the repository)")
    parser.add_argument("--hidden", type=int, default=DEFAULT_SHAPE["hidden"])
    parser.add_argument("--blocks", type=int, default=DEFAULT_SHAPE["blocks"])
    parser.add_argument("--ffn", type=int, default=DEFAULT_SHAPE["ffn"])
    parser.add_argument("--heads", type=int, default=DEFAULT_SHAPE["heads"])
    parser.add_argument("--shard-mb", type=int, default=1000, help="shard size of the synthetic checkpoint")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--offload-activations", default=None, help="streamed runs keep activations on disk here")
    args = parser.parse_args()
    args.dataset = args.datasets.split(",")[0]
    out = Path(args.out)
    checkpoint = Path(args.checkpoint or f"~/.cache/secateur/scale/llama-{args.hidden}-{args.blocks}-{args.ffn}")
    checkpoint = checkpoint.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if not (checkpoint / "config.json").is_file():
        from secateur.models import load_model

        tokenizer = load_model(DEFAULT_SHAPE["vocab_from"]).tokenizer
        print(f"building {checkpoint} ...", file=sys.stderr)
        build_checkpoint(checkpoint, hidden=args.hidden, blocks=args.blocks, ffn=args.ffn, heads=args.heads,
                         tokenizer=tokenizer, shard_bytes=args.shard_mb * 10**6)
    terms = checkpoint_terms(checkpoint, windows=args.max_windows, seqlen=args.eval_seqlen)
    rows = []
    for mode in args.modes.split(","):
        spec = {"mode": mode, "model": str(checkpoint), "dataset": args.dataset, "data_dir": args.data_dir,
                "seqlen": args.eval_seqlen, "windows": args.max_windows, "offload": args.offload_activations}
        rows.append(measure(spec))
        print(f"done {mode}: peak {rows[-1]['rss_peak_mb']:.0f} MiB", file=sys.stderr)
    for row in rows:
        row["bound_mb"] = bound_mb(row["mode"], terms, row["rss_before_mb"])
    streamed = [row for row in rows if row["mode"] in BOUND_TERMS]
    summary = {
        "terms_mb": terms, "runs": rows, "args": vars(args), "bound_terms": BOUND_TERMS,
        "streamed_peak_below_40pct": all(row["rss_peak_mb"] < 0.4 * terms["checkpoint_mb"] for row in streamed),
        "python": platform.python_version(), "torch": torch.__version__,
    }
    (out / "scale.json").write_text(json.dumps(summary, indent=2))
    (out / "scale.md").write_text(render(rows, terms, args))
    print(render(rows, terms, args))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
