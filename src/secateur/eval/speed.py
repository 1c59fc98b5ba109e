"""Latency of a causal LM: prefill time for a prompt and decode speed, batch 1.

Warm-up runs first (allocator, kernels), then `repeats` timed runs; the median is the
figure and min/max the spread. Compare models by ratios measured in the same process,
interleaved (`compare_latency`), because a shared machine's speed drifts.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _prefill_seconds(model, input_ids) -> float:
    _sync(input_ids.device)
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=True)
    _sync(input_ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def _decode_tokens_per_second(model, input_ids, new_tokens: int) -> float:
    """Greedy decoding of exactly `new_tokens` tokens after the prompt, with the KV cache;
    the prompt's prefill is timed separately and subtracted."""
    prefill = _prefill_seconds(model, input_ids)
    _sync(input_ids.device)
    start = time.perf_counter()
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(input_ids.device)
    elapsed = time.perf_counter() - start - prefill
    return new_tokens / max(elapsed, 1e-9)


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def speedups(latency: dict, model: str, reference: str) -> dict:
    """`model` against `reference` from one `compare_latency` result: > 1 means faster."""
    return {
        "prefill_speedup": latency[reference]["prefill_s"]["median"] / latency[model]["prefill_s"]["median"],
        "decode_speedup": latency[model]["decode_tok_s"]["median"] / latency[reference]["decode_tok_s"]["median"],
    }


def compare_latency(models: dict, *, vocab_size: int, prompt_tokens: int = 512, decode_tokens: int = 64,
                    repeats: int = 3, warmup: int = 1, device="cpu", seed: int = 0) -> dict:
    """Prefill seconds and decode tokens/s for each model, runs interleaved model by model so
    drift hits all of them alike. Returns {name: {"prefill_s": {...}, "decode_tok_s": {...}}}."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=generator).to(device)
    short_prompt = prompt[:, :16]  # decode speed with a short context: the per-token cost itself
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            _prefill_seconds(model, prompt)
            _decode_tokens_per_second(model, short_prompt, 4)
    prefill = {name: [] for name in models}
    decode = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            prefill[name].append(_prefill_seconds(model, prompt))
            decode[name].append(_decode_tokens_per_second(model, short_prompt, decode_tokens))
    return {name: {"prefill_s": _summary(prefill[name]), "decode_tok_s": _summary(decode[name]),
                   "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens} for name in models}
