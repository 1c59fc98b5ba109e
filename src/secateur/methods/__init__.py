"""Pruning methods, one file each; importing this package registers them all."""

from secateur.methods import block_drop, flap, magnitude, putri, sparsegpt, stade, wanda, wanda_sp  # noqa: F401
from secateur.methods.base import (
    METHODS,
    Method,
    PruneResult,
    SparsityTarget,
    get_method,
    method_option_names,
    register,
)

__all__ = ["METHODS", "Method", "PruneResult", "SparsityTarget", "get_method", "method_option_names", "register"]
