"""Saving and loading structurally pruned models.

After slicing, blocks may differ in FFN width and head count. `finalize_config` decides
how the config describes the model:

- every block has the same shape and the family's config can express it: the standard
  fields are rewritten (`adapter.uniform_config`) and a plain
  `AutoModelForCausalLM.from_pretrained(DIR)` loads the checkpoint, no remote code;
- otherwise every linear whose shape (or presence of a bias) differs from what the stock
  model would build is recorded (`config.secateur_linear_shapes`), so is every
  width/head-count attribute the forward reads (`config.secateur_module_attrs`), and
  `auto_map` points to a small `modeling_secateur.py` (written by `write_extra_files`) whose
  class subclasses the stock one and rebuilds those linears after `__init__`. `secateur.models.load_model`
  applies the same records in-process, without remote code.

Beside the records, such a checkpoint also states its per-block shapes in transformers' own
`per_layer_config` field (transformers 5, `HeterogeneousConfigMixin`): a sparse mapping from
block index to the config attributes that differ there (`intermediate_size`,
`num_attention_heads`, `num_key_value_heads`, ...), which other tools read without knowing
secateur (transformers' own `get_head_shapes` reads per-block KV heads from it). The stock
modeling classes still build one width for the whole model, so the config also sets
`allow_global_per_layer_attribute_access` (without it the stock `__init__` cannot read the
global width and loading fails) and the secateur records stay the authority that rebuilds the
linears. Families whose config cannot state a block's shape (GPT-2, OPT, GPT-NeoX derive the
head size from the head count) get no `per_layer_config`; neither does a config transformers'
own validation refuses.

Biases count as shape: a compensated layer carries a bias and its siblings do not (FLAP
compensates o_proj and down_proj only), so a config flag that would give every sibling one
(Llama's `attention_bias`) is turned on only when all of them really have one
(`Adapter.bias_flag_values`); otherwise the biased layers are recorded like sliced ones, even
when every block has the same shape.

Whether the uniform config really reproduces the model is checked, not assumed: a
skeleton of the stock model is built on the meta device and compared module by module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from secateur.errors import SecateurError
from secateur.models.base import Adapter, get_adapter
from secateur.structured._rebuild import (
    ATTRS_KEY,
    SHAPES_KEY,
    rebuild_recorded_shapes,
    stock_widths_read_quietly,
)

MODELING_FILE = "modeling_secateur.py"
AUTO_CLASS = "modeling_secateur.SecateurForCausalLM"

_MODELING_CLASS = '''

from transformers import {stock} as _StockForCausalLM  # noqa: E402


def _use_stock_weight_names() -> None:
    # transformers renames some checkpoint keys per class name (e.g. GPT-NeoX's embed_out ->
    # lm_head) and skips those renames for remote code unless the class registers them.
    try:
        from transformers import conversion_mapping
    except ImportError:
        return
    mapping = conversion_mapping.get_checkpoint_conversion_mapping(_StockForCausalLM.__name__)
    if mapping is None:
        mapping = conversion_mapping.get_checkpoint_conversion_mapping("{model_type}")
    conversion_mapping.register_checkpoint_conversion_mapping("SecateurForCausalLM", mapping or [], overwrite=True)


class SecateurForCausalLM(_StockForCausalLM):
    """{stock} whose recorded linears have their structurally pruned shapes."""

    def __init__(self, config, *args, **kwargs):
        _use_stock_weight_names()
        with stock_widths_read_quietly():
            super().__init__(config, *args, **kwargs)
        rebuild_recorded_shapes(self, config)
'''


def is_recorded(config) -> bool:
    """Whether `config` comes from a heterogeneous structured checkpoint."""
    return bool(getattr(config, SHAPES_KEY, None) or getattr(config, ATTRS_KEY, None))


def finalize_config(model: nn.Module, adapter: Adapter | None = None) -> bool:
    """Describe the model's current shapes in its config; True when the stock fields suffice."""
    adapter = adapter or get_adapter(model)
    config = model.config
    _clear_records(config)
    # A bias flag is on only when every layer it governs has a bias; the layers given one alone
    # (a compensated o_proj beside bias-free q/k/v) differ from the stock model and are recorded.
    for flag, value in adapter.bias_flag_values().items():
        setattr(config, flag, value)
    shapes = adapter.block_shapes()
    if len(set(shapes)) == 1:
        fields = adapter.uniform_config(shapes[0])
        if fields is not None:
            candidate = copy.deepcopy(config)
            for key, value in fields.items():
                setattr(candidate, key, value)
            if _is_valid(candidate) and _differences(model, adapter, candidate) == ({}, {}):
                for key, value in fields.items():
                    setattr(config, key, value)
                return True
    linear_shapes, module_attrs = _differences(model, adapter, config)
    setattr(config, SHAPES_KEY, linear_shapes)
    setattr(config, ATTRS_KEY, module_attrs)
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModelForCausalLM": AUTO_CLASS}
    return False


def prepare_checkpoint(model: nn.Module, adapter: Adapter | None = None) -> bool:
    """Call before `model.save_pretrained`; returns True when no remote code is needed."""
    return finalize_config(model, adapter)


def write_extra_files(model: nn.Module, directory: str | Path) -> None:
    """Call after `model.save_pretrained(directory)`: adds `modeling_secateur.py` and the
    `per_layer_config` field of config.json when the config (as left by `prepare_checkpoint`)
    needs them."""
    if is_recorded(model.config):
        write_modeling_file(directory, model)
        write_per_layer_config(model, directory)


# Set in a config with `per_layer_config` so that code reading one width for the whole model
# (every stock modeling class, secateur's adapters) reads the stock value instead of failing.
ALLOW_GLOBAL_KEY = "allow_global_per_layer_attribute_access"


def per_layer_config(model: nn.Module, adapter: Adapter | None = None) -> dict[str, dict] | None:
    """transformers' serialised `per_layer_config` of the model's current block shapes: {block
    index: {config attribute: value}} for the blocks that differ from the config's global values,
    or None when the family's config cannot state a block's shape, no block differs, or
    transformers does not know the field or refuses the result."""
    adapter = adapter or get_adapter(model)
    config = model.config
    overrides: dict[int, dict] = {}
    for index, shape in enumerate(adapter.block_shapes()):
        fields = adapter.uniform_config(shape)  # the family's names for this block's shape
        if fields is None:
            return None  # e.g. GPT-2's head size is hidden/heads: a per-block head count would lie
        changed = {key: value for key, value in fields.items() if getattr(config, key, None) != value}
        if changed:
            overrides[index] = changed
    if not overrides or not hasattr(type(config), "per_layer_config"):
        return None
    candidate = copy.deepcopy(config)
    _clear_records(candidate)
    setattr(candidate, ALLOW_GLOBAL_KEY, True)
    with stock_widths_read_quietly():  # validation reads the global widths, as loading will
        try:
            candidate.per_layer_config = overrides  # transformers checks and normalises the overrides
        except (ValueError, TypeError):
            return None
        if not _is_valid(candidate):
            return None
        return candidate.to_dict().get("per_layer_config") or None


def write_per_layer_config(model: nn.Module, directory: str | Path) -> bool:
    """Add `per_layer_config` (and the flag that lets the stock classes read global widths) to the
    saved config.json; False when the model's shapes cannot be stated that way."""
    stated = per_layer_config(model)
    if stated is None:
        return False
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data[ALLOW_GLOBAL_KEY] = True
    data["per_layer_config"] = stated
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def save_structured(
    model: nn.Module, tokenizer, directory: str | Path, adapter: Adapter | None = None
) -> Path:
    """Save a structurally pruned model (and tokenizer, if given) as a loadable checkpoint."""
    directory = Path(directory)
    prepare_checkpoint(model, adapter)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_extra_files(model, directory)
    return directory


def write_modeling_file(directory: str | Path, model: nn.Module) -> Path:
    """Write the self-contained `modeling_secateur.py` (torch and transformers only)."""
    source = Path(__file__).with_name("_rebuild.py").read_text()
    path = Path(directory) / MODELING_FILE
    stock = _stock_class(model).__name__
    path.write_text(source + _MODELING_CLASS.format(stock=stock, model_type=model.config.model_type))
    return path


def load_structured_checkpoint(
    directory: str | Path, config, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a heterogeneous checkpoint without remote code: the stock class, subclassed
    in-process to apply the recorded shapes after `__init__`, loads it with from_pretrained
    (so transformers' own key renames, tying and dtype handling all apply)."""
    with stock_widths_read_quietly():
        model = recorded_model_class(config).from_pretrained(Path(directory), config=config, dtype=dtype)
    return model.eval()


def recorded_model_class(config) -> type:
    """The stock class of a heterogeneous checkpoint's config, subclassed in-process to give the
    recorded linears their shapes after `__init__` (build it under `stock_widths_read_quietly`)."""
    from transformers import AutoModelForCausalLM

    stock_config = copy.deepcopy(config)
    _clear_records(stock_config)
    with torch.device("meta"):
        stock_class = _stock_class(AutoModelForCausalLM.from_config(stock_config))
    return _rebuilding_class(stock_class)


def _rebuilding_class(stock_class: type) -> type:
    # Same name and module as the stock class: transformers looks up checkpoint key renames
    # by class name and treats classes outside its own modules as custom code.
    def __init__(self, config, *args, **kwargs):
        stock_class.__init__(self, config, *args, **kwargs)
        rebuild_recorded_shapes(self, config)

    namespace = {
        "__init__": __init__,
        "__module__": stock_class.__module__,
        "__qualname__": stock_class.__qualname__,
        "_secateur_rebuilds": True,
    }
    return type(stock_class.__name__, (stock_class,), namespace)


# --- internals ------------------------------------------------------------------------


def _clear_records(config) -> None:
    for key in (SHAPES_KEY, ATTRS_KEY):
        if hasattr(config, key):
            delattr(config, key)
    if getattr(config, "is_heterogeneous", False):  # loaded from a checkpoint with per_layer_config
        config.per_layer_config = None
    config.__dict__.pop(ALLOW_GLOBAL_KEY, None)
    auto_map = getattr(config, "auto_map", None)
    if auto_map and auto_map.get("AutoModelForCausalLM") == AUTO_CLASS:
        rest = {k: v for k, v in auto_map.items() if k != "AutoModelForCausalLM"}
        if rest:
            config.auto_map = rest
        else:
            delattr(config, "auto_map")


def _is_valid(config) -> bool:
    """Whether the config class accepts these values (e.g. LlamaConfig wants hidden % heads == 0
    even with an explicit head_dim); save_pretrained would refuse otherwise."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 (huggingface_hub's validation error is a bare Exception)
        return False
    return True


def _stock_class(model: nn.Module) -> type:
    """The transformers class a model is (or subclasses, when loaded with remote code)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.models.") and "_secateur_rebuilds" not in cls.__dict__:
            return cls
    raise SecateurError(f"{type(model).__name__} is not a transformers model class")


def _linear_shape(module: nn.Module) -> list | None:
    if isinstance(module, Conv1D):
        return [module.weight.shape[1], module.weight.shape[0], module.bias is not None]
    if isinstance(module, nn.Linear):
        return [module.weight.shape[0], module.weight.shape[1], module.bias is not None]
    return None


def _differences(model: nn.Module, adapter: Adapter, config) -> tuple[dict, dict]:
    """Linear shapes and shape attributes of `model` that a stock model built from
    `config` would not have."""
    stock_config = copy.deepcopy(config)
    _clear_records(stock_config)
    with torch.device("meta"):
        stock = _stock_class(model)._from_config(stock_config)
    stock_modules = dict(stock.named_modules())
    linear_shapes: dict[str, list] = {}
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is not None and _linear_shape(stock_modules.get(name)) != shape:
            linear_shapes[name] = shape
    names = {id(module): name for name, module in model.named_modules()}
    module_attrs: dict[str, dict] = {}
    for block in adapter.blocks():
        for relative, attrs in adapter.shape_attributes(block).items():
            path = f"{names[id(block)]}.{relative}"
            stock_module = stock_modules.get(path)
            changed = {a: v for a, v in attrs.items() if getattr(stock_module, a, None) != v}
            if changed:
                module_attrs[path] = changed
    return linear_shapes, module_attrs
