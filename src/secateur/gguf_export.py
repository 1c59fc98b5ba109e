"""Write a (pruned) model as one GGUF file, the format llama.cpp runs and transformers can load.

A checkpoint is only deployed once it runs where people run small models, and on CPUs that is
llama.cpp. This module writes the file with the `gguf` package's writer, from the model in memory
and its tokenizer, without llama.cpp's converter script: the adapter says where the blocks and
linears are (so GPT-2's transposed Conv1D needs no special case) and gguf's own TensorNameMap
names each tensor; what is left is what llama.cpp's model loaders (src/models/*.cpp) expect of
each architecture, recorded in `_Arch`:

- llama and deci rotate adjacent pairs of each head's query/key rows, Hugging Face rotates the
  two halves: their Q and K rows (and biases) are interleaved per head; qwen2, qwen3 and gemma3
  rotate halves like Hugging Face and are written as they are;
- Gemma 3's RMSNorm multiplies by (1 + w), llama.cpp's by w: Gemma norms are written as w + 1;
  its embedding scale (sqrt(hidden)) is implied by the architecture, its attention scale is
  fixed by it (so a `query_pre_attn_scalar` llama.cpp would not use is refused), and which
  blocks slide is written as a per-block array because block removal shifts the pattern;
- llama.cpp reads some biases and not others per architecture (`_Arch.biases`); a bias it
  would ignore is never dropped silently.

Uneven structured checkpoints (blocks of different FFN widths or head counts) need per-layer
arrays for `feed_forward_length` and the head counts. llama.cpp parses such arrays for every
architecture, but only some build their tensors per layer; of the families secateur prunes, the
Llama-like ones without QK norms (llama, mistral, qwen2) are written as llama.cpp's `deci`
architecture (Llama with per-layer widths and head counts, optional biases on every linear),
which is also the way out for biases their own architecture ignores. qwen3, gemma3 and gpt2
have no such architecture and are refused with one line.

Tensor types: f32, f16, bf16, q8_0 and q4_0. Norms, biases and every other 1-D tensor stay f32
(as llama.cpp keeps them); a 2-D tensor whose rows are not a multiple of the 32-value block of
q8_0/q4_0 (a pruned FFN width, say) is written in f16 instead, and the result says which.

The file is written beside its destination under a hidden name and renamed into place when
complete, so an interrupted export leaves nothing and the previous file, if any, intact. An
existing file is replaced only with `overwrite=True` and only if it is a GGUF whose metadata
carries `secateur.version` (every file written here does).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import Adapter, get_adapter
from secateur.outputs import STAGING_MARK, check_file_location, owner_alive, probe_writable

VERSION_KEY = "secateur.version"
RECIPE_KEY = "secateur.recipe"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_TYPE = "f16"
_QUANT_BLOCK = 32  # values per q8_0 / q4_0 block: a row must be a whole number of blocks


# --------------------------------------------------------------------------- what llama.cpp reads


@dataclass(frozen=True)
class _Arch:
    """One llama.cpp architecture, as its model loader and graph read it."""

    name: str  # gguf.MODEL_ARCH member name
    rotates_adjacent_pairs: bool = False  # llama.cpp's "normal" rope: Q/K rows are interleaved per head
    biases: frozenset[str] = frozenset({"attn_q", "attn_k", "attn_v"})  # tensor kinds whose bias it reads
    per_layer_shapes: bool = False  # builds each block at its own FFN width and head counts
    attention_is_hidden_wide: bool = False  # q and o are (hidden x hidden): heads * head_dim == hidden
    norm_offset: float = 0.0  # added to every norm weight (Gemma's 1 + w)

    @property
    def gguf_arch(self):
        import gguf

        return getattr(gguf.MODEL_ARCH, self.name)

    @property
    def label(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


_EVERY_LINEAR = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
_LLAMA = _Arch("LLAMA", rotates_adjacent_pairs=True, biases=_EVERY_LINEAR)
_DECI = _Arch("DECI", rotates_adjacent_pairs=True, biases=_EVERY_LINEAR, per_layer_shapes=True)
_QWEN2 = _Arch("QWEN2", attention_is_hidden_wide=True)
_QWEN3 = _Arch("QWEN3")
_GEMMA3 = _Arch("GEMMA3", norm_offset=1.0)
_GPT2 = _Arch("GPT2", attention_is_hidden_wide=True,
              biases=frozenset({"attn_norm", "ffn_norm", "output_norm", "attn_qkv", "attn_output", "ffn_up",
                                "ffn_down"}))


@dataclass(frozen=True)
class _Family:
    native: _Arch
    fallback: _Arch | None  # written as this when the native architecture cannot express the model
    activations: tuple[str, ...]  # the config's activation values llama.cpp's graph computes
    # Gemma's SentencePiece files hold runs of spaces as user-defined tokens spelled with spaces, which
    # transformers' GGUF reader respells as runs of "▁" in normal tokens; they are written back as found.
    space_runs_as_text: bool = False


FAMILIES: dict[str, _Family] = {
    "llama": _Family(_LLAMA, _DECI, ("silu",)),
    "mistral": _Family(_LLAMA, _DECI, ("silu",)),  # llama.cpp runs Mistral as llama
    "qwen2": _Family(_QWEN2, _DECI, ("silu",)),
    "qwen3": _Family(_QWEN3, None, ("silu",)),
    "gemma3_text": _Family(_GEMMA3, None, ("gelu_pytorch_tanh",), space_runs_as_text=True),
    "gpt2": _Family(_GPT2, None, ("gelu_new", "gelu_pytorch_tanh")),
}


def _family(model: nn.Module) -> _Family:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise SecateurError(f"{model_type} cannot be exported to GGUF: llama.cpp has no architecture for it here; "
                            f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def check_exportable(model: nn.Module, tokenizer) -> None:
    """What can be refused before a model is pruned: the family, its activation and attention,
    and the tokenizer (a pruned model's shapes are checked when it is exported)."""
    family = _family(model)
    _check_config(model.config, family)
    _vocabulary(tokenizer, _vocab_rows(model), family)


# --------------------------------------------------------------------------- the plan


@dataclass
class GgufExport:
    """What was (or would be) written: llama.cpp architecture, tensor types, and notes for the user."""

    path: Path | None
    arch: str
    gguf_type: str
    notes: list[str] = field(default_factory=list)
    tensor_types: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    arch: _Arch
    calls: list[tuple[str, tuple]]  # GGUFWriter method and arguments, in order
    tensors: dict[str, torch.Tensor]  # GGUF name -> float32 tensor in GGUF layout
    notes: list[str]


def plan_gguf(model: nn.Module, tokenizer, *, name: str | None = None, recipe_yaml: str | None = None) -> _Plan:
    """Everything about the file that can be refused, decided in memory before anything is written."""
    family = _family(model)
    config = model.config
    _check_config(config, family)
    adapter = get_adapter(model)
    shapes = adapter.block_shapes()
    head_dim = adapter.geometry().head_dim
    hf_tensors = _hf_tensors(model, adapter)
    notes: list[str] = []

    arch, why_not = family.native, _cannot_express(family.native, shapes, head_dim, hf_tensors, adapter)
    if why_not and family.fallback is not None:
        fallback_why = _cannot_express(family.fallback, shapes, head_dim, hf_tensors, adapter)
        if fallback_why is None:
            notes.append(f"written as llama.cpp architecture '{family.fallback.label}' because {why_not}: "
                         "llama.cpp loads it; transformers' GGUF loader does not")
            arch, why_not = family.fallback, None
    if why_not:
        raise SecateurError(f"{config.model_type} cannot be exported to GGUF: {why_not}")

    tensors = _gguf_tensors(hf_tensors, arch, len(shapes), head_dim)
    vocabulary = _vocabulary(tokenizer, _vocab_rows(model), family)
    calls: list[tuple[str, tuple]] = [("add_string", (VERSION_KEY, _secateur_version()))]
    calls += [("add_name", (name,))] if name else []
    calls += [("add_string", (RECIPE_KEY, recipe_yaml))] if recipe_yaml else []
    calls += _hyperparameters(arch, config, shapes, head_dim, notes)
    calls += vocabulary
    return _Plan(arch=arch, calls=calls, tensors=tensors, notes=notes)


def _check_config(config, family: _Family) -> None:
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or \
        getattr(config, "activation_function", None)
    if activation not in family.activations:
        raise SecateurError(f"{config.model_type} with activation {activation!r} cannot be exported to GGUF: llama.cpp "
                            f"computes {' or '.join(family.activations)} for this architecture")
    if config.model_type == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise SecateurError("gpt2 with scale_attn_by_inverse_layer_idx cannot be exported to GGUF: llama.cpp scales "
                            "every block's attention alike")
    if config.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
        raise SecateurError("gemma3 with attn_logit_softcapping cannot be exported to GGUF: llama.cpp's gemma3 has none")
    _rope_scaling(config)  # refuses a scaling llama.cpp would not reproduce


def _vocab_rows(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _hf_tensors(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """Every parameter by its Hugging Face name (a tied lm_head once, under the embedding's name),
    block linears as (out, in) whatever the family stores."""
    tensors = {name: param.detach() for name, param in model.named_parameters()}
    names = {id(module): name for name, module in model.named_modules()}
    for block in adapter.blocks():
        for linear, view in adapter.linears(block).items():
            tensors[f"{names[id(block)]}.{linear}.weight"] = view.get_weight()
    return tensors


def _gguf_name(name_map, hf_name: str) -> str | None:
    base, _, suffix = hf_name.rpartition(".")
    mapped = name_map.get_name(base)
    return None if mapped is None else f"{mapped}.{suffix}"


def _kind(gguf_name: str) -> str:
    """'blk.3.attn_q.bias' -> 'attn_q'; 'output_norm.weight' -> 'output_norm'."""
    return re.sub(r"^blk\.\d+\.", "", gguf_name).rpartition(".")[0]


def _cannot_express(arch: _Arch, shapes, head_dim: int, hf_tensors: dict, adapter: Adapter) -> str | None:
    """Why `arch` cannot hold this model, or None."""
    import gguf

    if not arch.per_layer_shapes and len(set(shapes)) > 1:
        return (f"its blocks differ in FFN width or head count and llama.cpp's {arch.label} builds every block "
                "alike")
    if arch.attention_is_hidden_wide:
        hidden = adapter.geometry().hidden_size
        if any(shape.num_heads * head_dim != hidden for shape in shapes):
            return f"llama.cpp's {arch.label} needs heads x head size = hidden size ({hidden}), and heads were removed"
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, len(shapes))
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch.gguf_arch]}
    for hf_name in hf_tensors:
        mapped = _gguf_name(name_map, hf_name)
        if mapped is None or re.sub(r"^blk\.\d+\.", "blk.{bid}.", mapped.rpartition(".")[0]) not in known:
            return f"llama.cpp's {arch.label} has no tensor for {hf_name}"
        if mapped.endswith(".bias") and _kind(mapped) not in arch.biases:
            return f"llama.cpp's {arch.label} ignores the bias of {hf_name.rpartition('.')[0]}"
    if arch.per_layer_shapes and any(shape.num_heads == 0 or shape.ffn_width == 0 for shape in shapes):
        return "a block without attention or FFN is not written"
    return None


def _gguf_tensors(hf_tensors: dict, arch: _Arch, num_blocks: int, head_dim: int) -> dict[str, torch.Tensor]:
    import gguf

    name_map = gguf.get_tensor_name_map(arch.gguf_arch, num_blocks)
    tensors = {}
    for hf_name, tensor in hf_tensors.items():
        name = _gguf_name(name_map, hf_name)
        value = tensor.detach().to("cpu", torch.float32)
        if arch.rotates_adjacent_pairs and _kind(name) in ("attn_q", "attn_k"):
            value = _interleave_halves(value, head_dim)
        if arch.norm_offset and _kind(name).endswith("norm"):
            value = value + arch.norm_offset
        tensors[name] = value.contiguous()
    return tensors


def _interleave_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from Hugging Face's [first half | second half] rotary layout to the
    [x0, y0, x1, y1, ...] pairs llama.cpp's normal rope rotates (works on weights and biases)."""
    heads = rows.shape[0] // head_dim
    rest = rows.shape[1:]
    return rows.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows.shape)


# --------------------------------------------------------------------------- hyperparameters


def _rope_scaling(config) -> tuple[str, float] | None:
    """('linear', factor) or None; other scalings are refused (llama.cpp would compute others)."""
    parameters = _rope_parameters(config, "full_attention")
    kind = (parameters or {}).get("rope_type", "default")
    if kind == "default":
        return None
    if kind == "linear":
        return "linear", float(parameters["factor"])
    raise SecateurError(f"{config.model_type} with rope scaling {kind!r} cannot be exported to GGUF; supported: none, "
                        "linear")


def _rope_parameters(config, layer_type: str) -> dict | None:
    parameters = getattr(config, "rope_parameters", None) or {}
    if layer_type in parameters and isinstance(parameters[layer_type], dict):  # per layer type (Gemma 3)
        return parameters[layer_type]
    return parameters if "rope_type" in parameters or "rope_theta" in parameters else None


def _per_block(values: list[int]):
    return values[0] if len(set(values)) == 1 else values


def _hyperparameters(arch: _Arch, config, shapes, head_dim: int, notes: list[str]) -> list[tuple[str, tuple]]:
    calls = [
        ("add_context_length", (_context_length(config),)),
        ("add_embedding_length", (config.hidden_size,)),
        ("add_block_count", (len(shapes),)),
        ("add_feed_forward_length", (_per_block([s.ffn_width for s in shapes]),)),
        ("add_head_count", (_per_block([s.num_heads for s in shapes]),)),
        ("add_vocab_size", (config.vocab_size,)),
    ]
    if arch is _GPT2:  # LayerNorm, learned positions, one KV head per query head
        return calls + [("add_layer_norm_eps", (float(config.layer_norm_epsilon),))]
    calls += [
        ("add_head_count_kv", (_per_block([s.num_kv_heads for s in shapes]),)),
        ("add_key_length", (head_dim,)),
        ("add_value_length", (head_dim,)),
        ("add_layer_norm_rms_eps", (float(config.rms_norm_eps),)),
        ("add_rope_dimension_count", (head_dim,)),
        ("add_rope_freq_base", (float(_rope_parameters(config, "full_attention")["rope_theta"]),)),
    ]
    scaling = _rope_scaling(config)
    if scaling is not None:
        import gguf

        calls += [("add_rope_scaling_type", (gguf.RopeScalingType.LINEAR,)), ("add_rope_scaling_factor", (scaling[1],))]
    if arch is _GEMMA3:
        calls += _gemma3_hyperparameters(config, shapes, head_dim)
    else:
        window = _sliding_window(config)
        if window is not None and window < _context_length(config):
            notes.append(f"{config.model_type}'s sliding window ({window} tokens) is not written: llama.cpp's "
                         f"{arch.label} attends to the whole context, so outputs match up to {window} tokens")
    return calls


def _context_length(config) -> int:
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def _sliding_window(config) -> int | None:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def _gemma3_hyperparameters(config, shapes, head_dim: int) -> list[tuple[str, tuple]]:
    # llama.cpp fixes Gemma 3's attention scale: 1/sqrt(head_dim), except 1/sqrt(hidden/heads) for
    # the 62-block (27B) model; a model whose query_pre_attn_scalar says otherwise is refused.
    fixed = hidden_over_heads = config.hidden_size / shapes[0].num_heads
    if len(shapes) != 62:
        fixed = head_dim
    wanted = config.query_pre_attn_scalar
    if not math.isclose(fixed, wanted, rel_tol=1e-6):
        raise SecateurError(f"gemma3 with query_pre_attn_scalar {wanted} cannot be exported to GGUF: llama.cpp scales "
                            f"attention by 1/sqrt({fixed:g}) for {len(shapes)} blocks "
                            f"(hidden/heads = {hidden_over_heads:g}, head size {head_dim})")
    sliding = _rope_parameters(config, "sliding_attention") or {}
    if sliding.get("rope_type", "default") != "default":
        raise SecateurError("gemma3 with rope scaling on its sliding-window blocks cannot be exported to GGUF: "
                            "llama.cpp scales only the global blocks")
    layer_types = list(getattr(config, "layer_types", None) or [])
    calls = [("add_rope_freq_base_swa", (float(sliding.get("rope_theta", 10000.0)),))]
    if config.sliding_window and "sliding_attention" in layer_types:
        calls += [("add_sliding_window", (int(config.sliding_window),)),
                  ("add_sliding_window_pattern", ([kind == "sliding_attention" for kind in layer_types],))]
    if getattr(config, "final_logit_softcapping", None):
        calls.append(("add_final_logit_softcapping", (float(config.final_logit_softcapping),)))
    return calls


# --------------------------------------------------------------------------- tokenizer


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def _vocabulary(tokenizer, rows: int, family: _Family) -> list[tuple[str, tuple]]:
    """The tokenizer as llama.cpp's vocabulary keys: byte-level BPE ("gpt2") or SentencePiece-style
    BPE with byte fallback ("llama"), with token types, special ids, BOS/EOS behaviour and the chat
    template. Anything else is refused: llama.cpp would tokenize differently."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SecateurError("the tokenizer has no fast (tokenizers) backend, so its vocabulary cannot be written to "
                            "GGUF; save the checkpoint with a tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise SecateurError(f"a {model.get('type')} tokenizer cannot be written to GGUF; supported: byte-level BPE "
                            "and SentencePiece-style BPE")
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if not byte_level and not model.get("byte_fallback"):
        raise SecateurError("a BPE tokenizer that is neither byte-level nor byte-fallback cannot be written to GGUF")
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows or max(vocab.values()) >= rows:
        raise SecateurError(f"the tokenizer has {len(vocab)} tokens but the model only {rows} embedding rows")
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    by_id = {index: token for token, index in vocab.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    merge_rank = {m.replace(" ", "", 1): rank for rank, m in reversed(list(enumerate(merges)))}
    tokens, types, scores = [], [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:  # embedding rows no token reaches (padded vocabularies)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        elif family.space_runs_as_text and not byte_level and len(token) > 1 and set(token) == {"\u2581"}:
            tokens.append(" " * len(token))
            types.append(gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        else:
            tokens.append(token)
            byte = not byte_level and _BYTE_TOKEN.match(token)
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
            # SentencePiece merges the adjacent pair whose result scores highest: the merge rank, negated.
            scores.append(-1.0 - merge_rank[token] if token in merge_rank else 0.0)
    calls: list[tuple[str, tuple]] = [
        ("add_tokenizer_model", ("gpt2" if byte_level else "llama",)),
        ("add_tokenizer_pre", (_pre_tokenizer(spec) if byte_level else "default",)),
        ("add_token_list", (tokens,)),
        ("add_token_types", ([int(t) for t in types],)),
    ]
    if not byte_level:
        calls.append(("add_token_scores", (scores,)))
        calls.append(("add_add_space_prefix", (_adds_space_prefix(tokenizer),)))
    if merges:
        calls.append(("add_token_merges", (merges,)))
    for method, attribute in (("add_bos_token_id", "bos_token_id"), ("add_eos_token_id", "eos_token_id"),
                              ("add_unk_token_id", "unk_token_id"), ("add_pad_token_id", "pad_token_id")):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            calls.append((method, (value,)))
    adds_bos, adds_eos = _adds_special_tokens(tokenizer)
    calls += [("add_add_bos_token", (adds_bos,)), ("add_add_eos_token", (adds_eos,))]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        calls.append(("add_chat_template", (template,)))
    return calls


# tokenizers' ByteLevel pre-tokenizer splits with GPT-2's expression, which llama.cpp calls "gpt-2".
_GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before BPE."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's expression
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in _named_splits().items():
            if pattern == regex:
                return name
        if pattern == _GPT2_SPLIT:
            return "gpt-2"
    raise SecateurError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) matches none llama.cpp "
                        "knows, so llama.cpp would split text differently; it is not written to GGUF")


def _named_splits() -> dict[str, str]:
    """llama.cpp pre-tokenizer names by the expression they split with, as transformers' GGUF reader
    maps them back (so a file written here reads back with the same split)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {}
    return dict(GGUF_PRE_TOKENIZER_SPLITS)


def _adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, seen by encoding (the flags are not stored alike everywhere)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return adds_bos, adds_eos


def _adds_space_prefix(tokenizer) -> bool:
    pieces = tokenizer.tokenize("a")
    return bool(pieces) and pieces[0].startswith("\u2581")


# --------------------------------------------------------------------------- tensor types


def _quantization(gguf_type: str):
    import gguf

    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}
    if gguf_type not in types:
        raise SecateurError(f"unknown GGUF type {gguf_type!r}; accepted: {', '.join(GGUF_TYPES)}")
    return types[gguf_type]


def _file_type(gguf_type: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]


def _encode(name: str, tensor: torch.Tensor, gguf_type: str, notes: list[str]):
    """(data, raw type) of one tensor: 1-D stays f32; rows that are not whole quantization blocks
    fall back to f16."""
    import gguf
    from gguf.quants import quantize

    values = tensor.numpy()
    if values.ndim < 2 or gguf_type == "f32":
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    qtype = _quantization(gguf_type)
    if gguf_type in ("q8_0", "q4_0") and values.shape[-1] % _QUANT_BLOCK:
        notes.append(f"{name} has rows of {values.shape[-1]} values, not a multiple of {_QUANT_BLOCK}: written in f16")
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        data = values.astype(np.float16)
        if not np.isfinite(data).all():
            raise SecateurError(f"{name} has weights beyond float16's range (|w| > 65504); export with --type bf16 "
                                "or f32")
        return data, qtype
    return quantize(values, qtype), qtype


# --------------------------------------------------------------------------- files


def export_gguf(model: nn.Module, tokenizer, out: str | Path, *, gguf_type: str = DEFAULT_TYPE,
                overwrite: bool = False, name: str | None = None, recipe_yaml: str | None = None,
                inputs: dict | None = None) -> GgufExport:
    """Write `model` and `tokenizer` to the GGUF file `out`; returns what was written."""
    _quantization(gguf_type)
    target = check_gguf_destination(out, overwrite=overwrite, inputs=inputs)
    plan = plan_gguf(model, tokenizer, name=name, recipe_yaml=recipe_yaml)
    result = GgufExport(path=target, arch=plan.arch.label, gguf_type=gguf_type, notes=list(plan.notes))
    encoded = {}
    for tensor_name, tensor in plan.tensors.items():  # every tensor converted before the file is created
        data, qtype = _encode(tensor_name, tensor, gguf_type, result.notes)
        encoded[tensor_name] = (data, qtype)
        result.tensor_types[tensor_name] = qtype.name

    def write(path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, plan.arch.label)
        for method, args in plan.calls:
            getattr(writer, method)(*args)
        writer.add_file_type(_file_type(gguf_type))
        if gguf_type in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, (data, qtype) in encoded.items():
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomically(target, write, overwrite=overwrite)
    return result


def check_gguf_destination(out: str | Path, *, overwrite: bool, inputs: dict | None = None,
                           inside: Path | None = None, flag: str = "--out") -> Path:
    """Refuse an unusable GGUF destination before any work: not an input, not inside --out or a
    directory secateur manages, a `.gguf` name in an existing writable directory, and an existing
    file there only with `overwrite` and only if secateur wrote it."""
    shown = str(out)
    if not shown.endswith(".gguf"):
        raise SecateurError(f"{flag} {shown!r} is not a .gguf file name; give a file such as model.gguf")
    target = check_file_location(out, inputs, inside, flag, "model.gguf")
    _remove_dead_staging(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise SecateurError(f"{flag} {shown!r} already exists; pass --overwrite to replace it (secateur replaces "
                                "only GGUF files it wrote)")
        if target.is_symlink() or not target.is_file() or not is_secateur_gguf(target):
            raise SecateurError(f"{flag} {shown!r} was not written by secateur (no {VERSION_KEY} in its metadata); it "
                                "is not replaced: delete it yourself or choose another file")
    probe_writable(target.parent, flag, shown)
    return target


def _staging_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.{STAGING_MARK}[0-9a-f]{{8}}$")


def _remove_dead_staging(target: Path) -> None:
    """Partial files of killed exports to the same destination (a live export holds a lock on its own)."""
    if not target.parent.is_dir():
        return
    pattern = _staging_pattern(target)
    for path in target.parent.iterdir():
        if pattern.match(path.name) and path.is_file() and not path.is_symlink() and not owner_alive(path):
            path.unlink(missing_ok=True)


def _write_atomically(target: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    staging = target.with_name(f".{target.name}.{STAGING_MARK}{secrets.token_hex(4)}")
    lock = os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tells a concurrent export that this partial file is alive
        write(staging)
        # Checked again now: the destination may have appeared or changed while the file was written.
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise SecateurError(f"{target} appeared while the GGUF was written (another run?); it was not "
                                    "replaced: rerun with --overwrite or another file")
            if target.is_symlink() or not is_secateur_gguf(target):
                raise SecateurError(f"{target} was replaced meanwhile by a file secateur did not write; it was not "
                                    "replaced")
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


def is_secateur_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file whose metadata has `secateur.version`. Reads only the keys (and
    skips the values), so a large vocabulary costs milliseconds."""
    try:
        with open(path, "rb") as handle:
            return VERSION_KEY in _metadata_keys(handle)
    except (OSError, ValueError, struct.error):
        return False


# GGUF value types (gguf.GGUFValueType): fixed sizes; 8 = string, 9 = array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _metadata_keys(handle) -> list[str]:
    def read(fmt: str):
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("truncated")
        return struct.unpack(fmt, data)[0]

    def string() -> bytes:
        length = read("<Q")
        if length > 1 << 24:
            raise ValueError("implausible string")
        data = handle.read(length)
        if len(data) != length:
            raise ValueError("truncated")
        return data

    def skip(value_type: int) -> None:
        if value_type in _FIXED_SIZES:
            handle.seek(_FIXED_SIZES[value_type], os.SEEK_CUR)
        elif value_type == 8:
            handle.seek(read("<Q"), os.SEEK_CUR)
        elif value_type == 9:
            item_type, count = read("<I"), read("<Q")
            if item_type in _FIXED_SIZES:
                handle.seek(_FIXED_SIZES[item_type] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(item_type)
        else:
            raise ValueError(f"unknown GGUF value type {value_type}")

    if handle.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    read("<I")  # version
    read("<Q")  # tensor count
    keys = []
    for _ in range(read("<Q")):
        keys.append(string().decode("utf-8", "replace"))
        skip(read("<I"))
    return keys


def _secateur_version() -> str:
    from secateur import __version__

    return __version__
