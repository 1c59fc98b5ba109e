"""Tiny random models of every supported family, built offline in a fraction of a second.

Widths are multiples of 8 so that 2:4 and 4:8 patterns fit; weights are drawn with a
std large enough that logits differ clearly between tokens and between pruned and
unpruned models. Not a test module: tests import the helpers below.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2", "gpt_neox"]

HIDDEN = 64
FFN = 128
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 256

_CORPUS = """\
The gardener walked along the hedge with a pair of secateurs, cutting the dead wood
so that the living branches would have more light. Pruning a tree is an old craft:
take away what does not help, keep what carries the fruit. A large language model is
pruned in much the same way. Most of its weights are small and many can be set to zero
without harming what it says. Magnitude pruning removes the smallest weights; Wanda
also looks at how large the inputs are; SparseGPT updates the remaining weights to
repair the damage. In 2024 and 2025 people measured perplexity on WikiText-2 and C4,
and counted accuracy on questions such as: Which way does the river flow? 0123456789.
"""

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]


@functools.cache
def _trained_tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 384) with <pad>=0, <bos>=1, <eos>=2."""
    # A fresh wrapper each call (cheap) so one test's edits cannot leak into another.
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def _config(arch: str) -> PretrainedConfig:
    tokenizer = tiny_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    llama_like = {
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        **ids,
    }
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "mistral":
        return MistralConfig(**llama_like, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "qwen3":
        # head_dim deliberately != hidden/heads, so geometry must read it from the config.
        return Qwen3Config(**llama_like, head_dim=32)
    if arch == "gemma3_text":
        return Gemma3TextConfig(
            **{**llama_like, "num_hidden_layers": 3},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,  # shorter than test inputs, so the sliding mask matters
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=FFN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=HIDDEN, n_inner=FFN, n_layer=2, n_head=HEADS, n_positions=MAX_POSITIONS, **ids
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    raise ValueError(f"no tiny config for {arch!r}; known: {TINY_ARCHS}")


def build_tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 eval-mode CausalLM of family `arch` (2 blocks; 3 for gemma3_text)."""
    return model_from_config(_config(arch), seed)


def model_from_config(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode CausalLM of `config` with the tiny models' seeded random weights."""
    config._attn_implementation = "eager"  # tiny inputs: eager is exact and supports every family
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or ".ln_" in name:
                param.add_(0.1 * noise)  # keep norms near their identity init
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)  # non-zero, so bias handling is really exercised
            else:
                param.copy_(0.15 * noise)
    return model.eval()


def save_tiny(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer as a Hugging Face checkpoint; returns the directory."""
    path = Path(directory)
    build_tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
