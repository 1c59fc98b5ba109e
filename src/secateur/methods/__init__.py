"""Pruning methods, one file each; importing this package registers them all."""

from secateur.methods import (  # noqa: F401
    alps,
    block_drop,
    dsnot,
    flap,
    magnitude,
    putri,
    ria,
    sparsefw,
    sparsegpt,
    stade,
    wanda,
    wanda_pp,
    wanda_sp,
)
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
