"""Models bigger than memory: hold one module's weights at a time, read from and written to files.

Pruning and evaluation walk a decoder block by block, so only the block at hand needs real
weights. `StreamedModel` builds the model from its config on the meta device (shapes and
dtypes, no storage), then `materialize` reads exactly the tensors of one module from the
checkpoint (safetensors tensor by tensor, or a GGUF dequantized tensor by tensor) and
`release` puts that module back on the meta device, freeing its memory. A module changed while
it was materialized (a pruned block) is kept, on release, in a scratch directory of the stream's
own, and read from there when next materialized: a streamed prune can come back to a block (Putri
prunes FFNs, then heads), and evaluate or save the pruned model, one block in memory at a time.
`write_weights` then writes the model to safetensors shards module by module (`ShardWriter`), so
a pruned checkpoint is never whole in memory either, and `DiskActivations` keeps the per-window
hidden states on disk for runs whose activations do not fit.

Names and values are those of the in-memory path, by construction: checkpoint keys are mapped
to parameter names with transformers' own renaming rules (as `from_pretrained` applies them),
GGUF tensors with transformers' own name map and tensor processors (the Llama Q/K
un-permutation among them), and written names go through transformers' save-time reversal (as
`save_pretrained` applies it); tied weights are read from their source and written once.
Non-persistent buffers (rotary frequencies, Gemma's embedding scale) are computed at init and
not stored in files: they are made real on the CPU once and never released.

This is the load layer: it knows no pruning method and no engine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import mmap
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import Adapter, get_adapter
from secateur.models.loading import (
    ACCEPTED,
    first_line,
    locate_model,
    one_gguf_parse,
    read_checkpoint_config,
    read_checkpoint_tokenizer,
    read_gguf_config,
    unreadable_weights,
    use_sdpa,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB" as transformers counts it (10^9 bytes)


class StreamedModel:
    """A causal LM whose weights stay in their files until a module is materialized.

    `model` is the full module tree on the meta device; `adapter` reads it like any model.
    Use as a context manager (or call `close`) so a GGUF's file mapping is let go and the scratch
    directory of changed modules is removed. `scratch_dir`: where that directory is made (a new
    hidden directory inside it; default: the system's temporary directory). A streamed prune
    needs room there for the pruned blocks (at most the model's size).
    """

    def __init__(self, model: nn.Module, tokenizer, source: str, dtype: torch.dtype, weights: _WeightSource,
                 offload_activations: str | Path | None = None, scratch_dir: str | Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.dtype = dtype
        self.adapter: Adapter = get_adapter(model)
        self.offload_activations = offload_activations
        self._weights = weights
        self.scratch_dir = scratch_dir
        self._scratch: _ScratchTensors | None = None  # made at the first release of a changed module
        # stored name -> (the tensor as materialized, its version counter): what `release` compares
        # with to tell a changed tensor (replaced, or changed in place) from an untouched one.
        self._as_materialized: dict[str, tuple[weakref.ref, int]] = {}
        # {tied parameter: the parameter it shares}, e.g. lm_head.weight -> model.embed_tokens.weight
        self.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self._names_at_open = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        missing = sorted(name for name in self._stored_names() if self._file_name(name) not in weights.names)
        if missing:
            raise SecateurError(f"{source} lacks {len(missing)} of the model's tensors, e.g. {missing[0]}; "
                                "accepted: a checkpoint whose weight files are complete")

    # --- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, spec: str | None, *, dtype: torch.dtype = torch.float32,
             offload_activations: str | Path | None = None, scratch_dir: str | Path | None = None) -> StreamedModel:
        """Open a local checkpoint directory (safetensors, sharded or not), a .gguf file or a
        packaged alias without reading any weight."""
        from transformers import AutoTokenizer

        location = locate_model(spec)
        if location.kind == "directory":
            config = read_checkpoint_config(location.path)
            tokenizer = read_checkpoint_tokenizer(location.path)
            model = _skeleton(config, dtype)
            _load_generation_config(model, location.path)
            weights = _SafetensorsWeights(location.path, model)
        elif location.kind == "gguf":
            with one_gguf_parse():  # config, tokenizer and tensor table share one parse of the file
                config = read_gguf_config(location.path)
                tokenizer = AutoTokenizer.from_pretrained(location.path.parent, gguf_file=location.path.name)
                model = _skeleton(config, dtype)
                weights = _GGUFWeights(location.path, model)
        else:
            raise SecateurError(f"streaming reads weights from local files; {location.source.removeprefix('hub:')!r} "
                                "is a hub id: download it first (huggingface-cli download) and give the directory, "
                                f"or give a .gguf file or an alias; {ACCEPTED}")
        return cls(model, tokenizer, location.source, dtype, weights, offload_activations, scratch_dir)

    def close(self) -> None:
        self._weights.close()
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what is where ------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    def module_name(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules(remove_duplicate=False):
            if candidate is module:
                return name
        raise ValueError("the module given is not part of this streamed model")

    def outside_blocks(self) -> list[nn.Module]:
        """The modules outside the decoder blocks that hold stored tensors (embeddings, positions,
        final norm, LM head, ...), in model order."""
        blocks = self.adapter.blocks()
        inside = {id(module) for module in blocks.modules()}
        return [module for module in self.model.modules()
                if id(module) not in inside and module is not blocks and _own_stored_tensors(module)]

    def front(self) -> list[nn.Module]:
        """What running the model up to the first block needs: everything outside the blocks but
        the LM head (the final norm comes along: it is small, and the base model's forward runs it)."""
        return self._outside_blocks_except(self.model.get_output_embeddings())

    def back(self) -> list[nn.Module]:
        """What turning the last block's output into logits needs: everything outside the blocks
        but the input embeddings (feed `inputs_embeds` instead of ids)."""
        return self._outside_blocks_except(self.model.get_input_embeddings())

    def _outside_blocks_except(self, excluded: nn.Module | None) -> list[nn.Module]:
        skipped = {id(module) for module in excluded.modules()} if excluded is not None else set()
        return [module for module in self.outside_blocks() if id(module) not in skipped]

    # --- materialize / release ---------------------------------------------------------
    def materialize(self, target: nn.Module | str | Iterable[nn.Module]) -> None:
        """Give every stored tensor (parameters and persistent buffers) of `target` (a module of
        `model`, its dotted name, or a list of modules) its value: as last released if it was
        changed (see `release`), else from the files, on the CPU in the run dtype. Tensors already
        real are left alone."""
        entries = [entry for module in self._modules(target) for entry in self._entries(module)]
        wanted = {}
        for owner, leaf, name, _ in entries:
            if _tensor_of(owner, leaf).is_meta:
                wanted[name] = self._file_name(name)
        kept = {name for name in wanted if self._scratch is not None and name in self._scratch.names}
        values = self._scratch.read(sorted(kept)) if kept else {}  # keyed by stored name
        from_files = {wanted[name] for name in wanted if name not in kept}
        real = self._real_tensors(from_files)  # a tied source already loaded is shared, not reread
        read = self._weights.read(sorted(from_files - set(real)), self.dtype)
        values.update({name: real.get(wanted[name], read.get(wanted[name])) for name in wanted if name not in kept})
        for owner, leaf, name, is_parameter in entries:
            if name not in wanted:
                continue
            current = _tensor_of(owner, leaf)
            value = values[name]
            if tuple(value.shape) != tuple(current.shape):
                raise SecateurError(f"{self.source}: tensor {wanted[name]} has shape {list(value.shape)} in the "
                                    f"file but {list(current.shape)} in the model its config describes")
            _set_tensor(owner, leaf, value, is_parameter, current)
            now = _tensor_of(owner, leaf)
            self._as_materialized[name] = (weakref.ref(now), now._version)

    def release(self, target: nn.Module | str | Iterable[nn.Module]) -> None:
        """Put every stored tensor of `target` back on the meta device (same shape and dtype),
        freeing its memory; its current shape is kept, so a sliced module stays sliced. A module
        given here whose tensors changed since they were materialized (replaced, changed in place,
        or added: a compensation bias) is first written whole to the scratch directory, which a
        later `materialize` reads instead of the checkpoint."""
        for module in self._modules(target):
            entries = [entry for entry in self._entries(module) if not _tensor_of(entry[0], entry[1]).is_meta]
            if any(self._changed(name, _tensor_of(owner, leaf)) for owner, leaf, name, _ in entries):
                if self._scratch is None:
                    self._scratch = _ScratchTensors(self.scratch_dir or tempfile.gettempdir())
                self._scratch.write({name: _tensor_of(owner, leaf).detach() for owner, leaf, name, _ in entries})
            for owner, leaf, name, is_parameter in entries:
                current = _tensor_of(owner, leaf)
                _set_tensor(owner, leaf, torch.empty(current.shape, dtype=current.dtype, device="meta"),
                            is_parameter, current)
                self._as_materialized.pop(name, None)
        _return_free_heap()

    def _changed(self, name: str, tensor: torch.Tensor) -> bool:
        seen = self._as_materialized.get(name)
        return seen is None or seen[0]() is not tensor or seen[1] != tensor._version

    @contextlib.contextmanager
    def materialized(self, target: nn.Module | str | Iterable[nn.Module]) -> Iterator[None]:
        """`materialize` for the duration of a `with` block, then `release`."""
        self.materialize(target)
        try:
            yield
        finally:
            self.release(target)

    def copy_outside_blocks(self, writer: ShardWriter) -> None:
        """Write every module outside the blocks to `writer`, one at a time (they are unchanged by
        pruning); the largest then held is one embedding matrix."""
        for module in self.outside_blocks():
            if all(name in self.tied for _, _, name, _ in self._entries(module)):
                continue  # a tied head: written once, as the embedding it shares
            with self.materialized(module):
                writer.add_module(module)

    def write_weights(self, directory: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
        """Write the model as it is now (pruned blocks as last released) to safetensors shards in
        `directory` with config.json, as `save_pretrained` would, one module in memory at a time;
        returns the weight files. A structurally pruned model: `prepare_checkpoint` first, as for
        save_pretrained."""
        writer = ShardWriter(self.model, directory, max_shard_bytes=max_shard_bytes)
        try:
            for block in self.adapter.blocks():
                with self.materialized(block):
                    writer.add_module(block)
            self.copy_outside_blocks(writer)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise

    def activation_list(self):
        """A new, empty list for per-window hidden states: in memory, or on disk under
        `offload_activations` (a `DiskActivations`: `close` it)."""
        return [] if self.offload_activations is None else DiskActivations(self.offload_activations)

    def activation_store(self) -> contextlib.AbstractContextManager:
        """`activation_list` as a context manager (activations on disk are removed on exit)."""
        store = self.activation_list()
        return store if isinstance(store, DiskActivations) else contextlib.nullcontext(store)

    # --- internals ------------------------------------------------------------------------
    def _modules(self, target) -> list[nn.Module]:
        if isinstance(target, str):
            return [self.model.get_submodule(target)]
        if isinstance(target, nn.Module):
            return [target]
        return list(target)

    def _entries(self, module: nn.Module) -> list[tuple[nn.Module, str, str, bool]]:
        """(owner, attribute, name in the files, is a parameter) of every stored tensor under
        `module`. Names are those the module had when the model was opened: removing a block
        renumbers the ones after it, but their weights are still stored under their old names."""
        prefix = self._names_at_open.get(id(module))
        return _stored_entries(module, self.module_name(module) if prefix is None else prefix)

    def _stored_names(self) -> list[str]:
        return [name for _, _, name, _ in _stored_entries(self.model, "")]

    def _file_name(self, name: str) -> str:
        """The parameter whose stored value `name` has: itself, or the source of a tied weight
        when the files hold only that."""
        if name in self.tied and name not in self._weights.names:
            return self.tied[name]
        return name

    def _real_tensors(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The tied sources among `names` that are materialized now (a tied head then shares them)."""
        sources = names & set(self.tied.values())
        found = {}
        for module in self.outside_blocks() if sources else []:
            for owner, leaf, name, _ in self._entries(module):
                if name in sources and not _tensor_of(owner, leaf).is_meta:
                    found[name] = _tensor_of(owner, leaf).detach()
        return found


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of `config` on the meta device, its non-persistent buffers real on the CPU."""
    from transformers import AutoModelForCausalLM

    from secateur.structured import stock_widths_read_quietly
    from secateur.structured.checkpoint import is_recorded, recorded_model_class

    with torch.device("meta"), stock_widths_read_quietly():
        if is_recorded(config):  # a heterogeneous structured checkpoint: the recorded shapes
            model = recorded_model_class(config)._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Buffers computed at init (rotary frequencies, embedding scales) are in no file: make them
    # real, let the model's own initialisation compute them (as from_pretrained does), and cast
    # them to the run dtype as load_model's final `.to(dtype)` does.
    owners = set()
    for name, buffer in list(model.named_non_persistent_buffers()):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        owner._buffers[leaf] = torch.empty_like(buffer, device="cpu")
        owners.add(owner)
    for owner in owners:
        model._init_weights(owner)
    for owner in owners:
        for leaf in owner._non_persistent_buffers_set:
            buffer = owner._buffers.get(leaf)
            if buffer is not None and buffer.is_floating_point():
                owner._buffers[leaf] = buffer.to(dtype)
    use_sdpa(model)
    return model.eval()


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _return_free_heap() -> None:
    """Hand the heap's free memory back to the system. glibc keeps freed blocks of up to 32 MB
    (a block's forward temporaries) in its arenas; block after block they add up to more than a
    block's weights in RSS although nothing uses them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    # from_pretrained reads generation_config.json beside the weights; save_pretrained writes it back.
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(directory)


def _stored_entries(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str, str, bool]]:
    entries = []
    for name, owner in module.named_modules(prefix=prefix, remove_duplicate=False):
        for leaf, value in owner._parameters.items():
            if value is not None:
                entries.append((owner, leaf, f"{name}.{leaf}" if name else leaf, True))
        for leaf, value in owner._buffers.items():
            if value is not None and leaf not in owner._non_persistent_buffers_set:
                entries.append((owner, leaf, f"{name}.{leaf}" if name else leaf, False))
    return entries


def _own_stored_tensors(module: nn.Module) -> bool:
    return any(value is not None for value in module._parameters.values()) or any(
        value is not None and leaf not in module._non_persistent_buffers_set for leaf, value in module._buffers.items()
    )


def _tensor_of(owner: nn.Module, leaf: str) -> torch.Tensor:
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _set_tensor(owner: nn.Module, leaf: str, value: torch.Tensor, is_parameter: bool, current: torch.Tensor) -> None:
    # A new object, never an in-place change: a tied partner elsewhere keeps its own state.
    if is_parameter:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
    else:
        owner._buffers[leaf] = value


# --- where the weights are read from ----------------------------------------------------------


class _WeightSource:
    names: set[str]  # parameter names (as in the model's state dict) the files hold

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _to_run_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


class _SafetensorsWeights(_WeightSource):
    """A checkpoint directory's safetensors files, read with `safe_open` one tensor at a time.

    Each read opens the files it needs and closes them afterwards, so no mapping of a multi-GB
    file stays resident between modules."""

    def __init__(self, directory: Path, model: nn.Module):
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                raise SecateurError(f"cannot read {index}: {first_line(error)}; accepted: the JSON index "
                                    "save_pretrained writes") from None
            files = {key: directory / file for key, file in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            files = {key: directory / SINGLE_FILE for key in _safetensors_keys(directory / SINGLE_FILE)}
        else:
            raise SecateurError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; streaming reads "
                                "safetensors weights only (re-save the checkpoint with save_pretrained)")
        self.location: dict[str, tuple[Path, str]] = {}  # parameter name -> (file, key in the file)
        for key, name in _checkpoint_names(model, list(files)).items():
            self.location[name] = (files[key], key)
        self.names = set(self.location)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name][0], []).append(name)
        values = {}
        for path, wanted in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in wanted:
                        values[name] = _to_run_dtype(handle.get_tensor(self.location[name][1]), dtype)
            except unreadable_weights() as error:
                raise SecateurError(f"cannot read {path}: {first_line(error)} (a missing, truncated or corrupt "
                                    "weights file)") from None
        return values


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except unreadable_weights() as error:
        raise SecateurError(f"cannot read {path}: {first_line(error)} (a truncated or corrupt weights file)") from None


def _checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """{checkpoint key: parameter name}, renamed as `from_pretrained` renames (the family's
    conversion rules, legacy names, a missing or extra base-model prefix). Keys that name no
    tensor of the model are left out, as from_pretrained ignores them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [entry for entry in conversions if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in conversions if isinstance(entry, WeightConverter)]
    state = model.state_dict()  # meta tensors: names only
    names = {}
    for key in keys:
        name, converted_by = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted_by is not None:
            raise SecateurError(f"checkpoint tensor {key} must be converted (merged or split) to load into "
                                f"{type(model).__name__}; streaming reads tensors one by one and supports only "
                                "checkpoints whose tensors map one to one")
        if name in state:
            names[key] = name
    return names


class _GGUFWeights(_WeightSource):
    """A GGUF file, dequantized one tensor at a time with transformers' own name map and tensor
    processors (exactly what `load_model` does for the whole file at once)."""

    def __init__(self, path: Path, model: nn.Module):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)  # within one_gguf_parse: the reader already parsed
            metadata = load_gguf_checkpoint(str(path), return_tensors=False)
            architecture = read_field(self.reader, "general.architecture")[0]
            self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=metadata["config"])
            self.name_map = get_gguf_hf_weights_map(model, self.processor)  # GGUF name -> parameter name
        except unreadable_weights() as error:
            raise SecateurError(f"cannot read the tensors of GGUF {path}: {first_line(error)} (a truncated or "
                                "corrupt file?)") from None
        self.tensors = {self.name_map[t.name]: t for t in self.reader.tensors if t.name in self.name_map}
        self.names = set(self.tensors)

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        import numpy as np
        from gguf import dequantize

        values = {}
        try:
            for name in names:
                stored = self.tensors[name]
                produced: dict[str, torch.Tensor] = {}  # a processor may store a tensor itself (GPT-2's head)
                result = self.processor.process(weights=dequantize(stored.data, stored.tensor_type), name=stored.name,
                                                tensor_key_mapping=self.name_map,
                                                parsed_parameters={"tensors": produced})
                if result.name is not None:
                    produced[self.name_map[result.name]] = torch.from_numpy(np.copy(result.weights))
                values[name] = _to_run_dtype(produced[name], dtype)
        except unreadable_weights() as error:
            raise SecateurError(f"cannot read the tensors of GGUF {self.path}: {first_line(error)} (a truncated "
                                "or corrupt file?)") from None
        finally:
            self._drop_mapped_pages()
        return values

    def _drop_mapped_pages(self) -> None:
        # The reader maps the whole file; pages it touched count as this process's memory until
        # dropped. They are clean file pages: dropping them costs a re-read if ever touched again.
        mapping = getattr(self.reader.data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            with contextlib.suppress(OSError, ValueError):
                mapping.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._drop_mapped_pages()
        self.reader = None
        self.tensors = {}


# --- writing a checkpoint module by module ------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class ShardWriter:
    """Write a model's tensors to safetensors shards as modules are finished, then its config.

    The result is what `model.save_pretrained(directory)` writes (same tensor names, dtypes and
    values; a tied weight once, under the name transformers keeps; config.json and
    generation_config.json), split into shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own), with model.safetensors.index.json when there is more than one.
    Each shard's data goes to disk as it is added: memory holds at most the module being added.

    `directory` must exist (the caller's staging directory); the writer creates only files
    named model*.safetensors*, config.json and generation_config.json there. For a structurally
    pruned model, call `secateur.structured.prepare_checkpoint(model)` before `finish` and
    `write_extra_files(model, directory)` after, as for save_pretrained.
    """

    def __init__(self, model: nn.Module, directory: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise SecateurError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes}")
        self.model = model
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.written: set[str] = set()  # parameter names (state-dict names) written so far
        self._shards: list[_ShardFile] = []
        self._weight_map: dict[str, int] = {}  # saved name -> shard number
        self._total_bytes = 0
        self._finished = False

    def add_module(self, module: nn.Module) -> None:
        """Write every stored tensor of `module` (a module of `model`, with real weights)."""
        prefix = next(name for name, candidate in self.model.named_modules(remove_duplicate=False)
                      if candidate is module)
        self.add({name: _tensor_of(owner, leaf).detach() for owner, leaf, name, _ in _stored_entries(module, prefix)})

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors given by their state-dict names; a tied weight (e.g. lm_head.weight of a
        model with tied embeddings) is skipped, as save_pretrained skips it."""
        from transformers.core_model_loading import revert_weight_conversion

        if self._finished:
            raise RuntimeError("ShardWriter.add after finish")
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        kept = {name: tensor for name, tensor in tensors.items() if name not in tied}
        repeated = sorted(set(kept) & self.written)
        if repeated:
            raise RuntimeError(f"ShardWriter: {repeated[0]} was written already")
        if any(tensor.is_meta for tensor in kept.values()):
            raise RuntimeError("ShardWriter: a tensor to write is on the meta device; materialize it first")
        self.written |= set(kept)
        for saved_name, tensor in revert_weight_conversion(self.model, kept).items():
            tensor = tensor.detach().to("cpu").contiguous()
            size = tensor.numel() * tensor.element_size()
            shard = self._shards[-1] if self._shards else None
            if shard is None or (shard.size and shard.size + size > self.max_shard_bytes):
                if shard is not None:
                    shard.close()
                shard = _ShardFile(self.directory, len(self._shards) + 1)
                self._shards.append(shard)
            shard.append(saved_name, tensor)
            self._weight_map[saved_name] = len(self._shards)
            self._total_bytes += size

    def finish(self) -> list[Path]:
        """Check every tensor of the model was written, name the shards, write the index, config.json
        and generation_config.json; returns the weight files."""
        expected = {name for _, _, name, _ in _stored_entries(self.model, "")}
        expected -= set(getattr(self.model, "all_tied_weights_keys", None) or {})
        unwritten = sorted(expected - self.written)
        if unwritten:
            raise RuntimeError(f"ShardWriter.finish: {len(unwritten)} tensors were never written, e.g. {unwritten[0]}")
        if not self._shards:
            self._shards.append(_ShardFile(self.directory, 1))
        count = len(self._shards)
        files = []
        for number, shard in enumerate(self._shards, start=1):
            name = SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            files.append(shard.finish(self.directory / name))
        if count > 1:
            index = {
                "metadata": {"total_parameters": self._total_parameters(), "total_size": self._total_bytes},
                "weight_map": {saved: files[number - 1].name for saved, number in sorted(self._weight_map.items())},
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")
        self._write_configs()
        self._finished = True
        return files

    def _total_parameters(self) -> int:
        # Counted from names, not objects: streaming replaces tensors, so tied weights are no longer one object.
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        return sum(_tensor_of(owner, leaf).numel() for owner, leaf, name, is_parameter
                   in _stored_entries(self.model, "") if is_parameter and name not in tied)

    def abort(self) -> None:
        """Remove the partial shard data this writer wrote (nothing else)."""
        for shard in self._shards:
            shard.discard()
        self._shards = []

    def _write_configs(self) -> None:
        # What save_pretrained does before writing weights: record dtype and class, then save.
        model = self.model
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.directory)
        if model.can_generate():
            model.generation_config.save_pretrained(self.directory)


class _ShardFile:
    """One safetensors shard written in two steps: tensor data streams to a hidden body file as it
    comes; `finish` writes the header (known only then) and appends the body."""

    def __init__(self, directory: Path, number: int):
        self.body_path = directory / f".model-shard-{number:05d}.body"
        self.body = open(self.body_path, "xb")  # noqa: SIM115 (closed in close/finish/discard)
        self.header: dict[str, dict] = {}
        self.size = 0

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise SecateurError(f"cannot write {name}: dtype {tensor.dtype} has no safetensors code")
        size = tensor.numel() * tensor.element_size()
        if size:
            self.body.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self.header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + size]}
        self.size += size

    def close(self) -> None:
        if not self.body.closed:
            self.body.close()

    def finish(self, path: Path) -> Path:
        self.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors writes it
        with open(path, "xb") as out, open(self.body_path, "rb") as body:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(body, out, 16 * 2**20)
        self.body_path.unlink()
        return path

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.body_path.unlink()


# --- activations on disk -------------------------------------------------------------------------


def check_directory_parent(parent: str | Path, flag: str) -> Path:
    """Refuse a file where secateur is to make a hidden working directory (`flag` names the option)."""
    parent = Path(parent).expanduser()
    if parent.exists() and not parent.is_dir():
        raise SecateurError(f"{flag} {str(parent)!r} is a file; give a directory (secateur writes into a new "
                            "hidden directory inside it and removes that afterwards)")
    return parent


class _HiddenDirectory:
    """A new hidden directory `<parent>/.secateur-<kind>-<random>` (creating `parent` too if
    needed), removed by `remove` with the directories it created; what `remove` finds still in
    them (not written by secateur) is kept."""

    def __init__(self, parent: str | Path, kind: str, flag: str):
        parent = check_directory_parent(parent, flag)
        self._created: list[Path] = []
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self._created.append(directory)
            self.path = parent / f".secateur-{kind}-{secrets.token_hex(6)}"
            self.path.mkdir()
        except OSError as error:
            self.remove()
            raise SecateurError(f"{flag} {str(parent)!r} is not writable ({error.strerror or error}); give a "
                                "writable directory") from None
        self._created.append(self.path)

    def remove(self) -> None:
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: someone else put something there; keep it
                directory.rmdir()
        self._created = []


class _ScratchTensors:
    """Modules changed by a streamed run, between their uses: one safetensors file per release,
    in a hidden directory removed on `close` with every file written there. A name released again
    points to its newest file; a file no name points to any more is deleted at once, so the
    directory holds at most one copy of each changed tensor."""

    def __init__(self, parent: str | Path):
        self._directory = _HiddenDirectory(parent, "changed-modules", "the stream's scratch directory")
        self.names: dict[str, Path] = {}  # stored name -> file holding its latest value
        self._count = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self._directory.path / f"module-{self._count:06d}.safetensors"
        self._count += 1
        _write_safetensors(path, tensors)
        replaced = {self.names[name] for name in tensors if name in self.names}
        self.names.update(dict.fromkeys(tensors, path))
        for old in replaced - set(self.names.values()):
            old.unlink()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        values = {}
        for path in {self.names[name] for name in names}:
            with safe_open(str(path), framework="pt") as handle:
                values.update({name: handle.get_tensor(name) for name in names if self.names[name] == path})
        return values

    def close(self) -> None:
        for path in [*set(self.names.values()), *self._directory.path.glob(".module-*.partial")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.names = {}
        self._directory.remove()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, header first and each tensor's bytes straight from its memory
    (`safetensors.torch.save_file` would first copy every tensor into a bytes object: a second
    block in memory)."""
    header, offset, ordered = {}, 0, []
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise SecateurError(f"cannot write {name}: dtype {tensor.dtype} has no safetensors code")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        ordered.append(tensor)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    staged = path.with_name(f".{path.name}.partial")
    with open(staged, "xb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for tensor in ordered:
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(staged, path)


class DiskActivations:
    """The per-window hidden states as a list on disk: `store[i]`, `store[i] = t`, `append`, `len`,
    iteration, like the Python list the engine keeps in memory.

    One safetensors file per window, in a hidden directory that this store creates under `parent`
    (creating `parent` too if needed) and removes on `close`/exit, with the files it wrote and the
    directories it created; nothing else is touched."""

    def __init__(self, parent: str | Path):
        self._directory = _HiddenDirectory(parent, "activations", "--offload-activations")
        self.directory = self._directory.path
        self._count = 0

    def _path(self, index: int) -> Path:
        return self.directory / f"window-{index:06d}.safetensors"

    def _checked(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"window indices are integers, not {type(index).__name__}")
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(f"window {index} out of range ({self._count} stored)")
        return position

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self._path(self._checked(index)))["hidden"]

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        self._write(self._checked(index), tensor)

    def append(self, tensor: torch.Tensor) -> None:
        self._write(self._count, tensor)
        self._count += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(self._count):
            yield self[index]

    def _write(self, index: int, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        staged = self.directory / f".window-{index:06d}.partial"
        save_file({"hidden": tensor.detach().to("cpu").contiguous()}, str(staged))
        os.replace(staged, self._path(index))  # a window is either its old or its new value

    def close(self) -> None:
        if self.directory.is_dir():
            for index in range(self._count):
                with contextlib.suppress(FileNotFoundError):
                    self._path(index).unlink()
            for staged in self.directory.glob(".window-*.partial"):
                staged.unlink()
        self._count = 0
        self._directory.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
