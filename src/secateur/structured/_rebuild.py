"""Rebuild the linears of a stock model at the shapes a structured checkpoint records.

This file is copied verbatim into every heterogeneous checkpoint as the head of its
`modeling_secateur.py`, so it imports only torch and transformers (never secateur) and
knows no model family: the config lists module paths and shapes, nothing else.
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn
from transformers.pytorch_utils import Conv1D

SHAPES_KEY = "secateur_linear_shapes"  # {module path: [out_features, in_features, has_bias]}
ATTRS_KEY = "secateur_module_attrs"  # {module path: {attribute: value}}
# transformers' logger for reads of a global width on a config with `per_layer_config`.
_HETEROGENEITY_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


@contextlib.contextmanager
def stock_widths_read_quietly():
    """Build the stock model without transformers' warning that it reads global widths of a config
    with `per_layer_config`: it does (the stock classes know one width per model), and
    `rebuild_recorded_shapes` then gives every recorded linear its own shape, so the warning
    would only alarm. transformers warns once per attribute, so later reads stay quiet too."""
    logger = logging.getLogger(_HETEROGENEITY_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def rebuild_recorded_shapes(model: nn.Module, config) -> None:
    """Replace each recorded linear by a fresh one of its recorded shape (same class) and
    set each recorded module attribute. Weights are left uninitialised: load them next."""
    for path, (out_features, in_features, has_bias) in (getattr(config, SHAPES_KEY, None) or {}).items():
        old = model.get_submodule(path)
        device, dtype = old.weight.device, old.weight.dtype
        if isinstance(old, Conv1D):
            new = Conv1D(out_features, in_features).to(device=device, dtype=dtype)
            if not has_bias:
                new.bias = None
        elif isinstance(old, nn.Linear):
            new = nn.Linear(in_features, out_features, bias=bool(has_bias), device=device, dtype=dtype)
        else:
            raise TypeError(f"{path} is a {type(old).__name__}, not a linear layer; cannot reshape it")
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
    for path, attrs in (getattr(config, ATTRS_KEY, None) or {}).items():
        module = model.get_submodule(path)
        for attr, value in attrs.items():
            setattr(module, attr, value)
