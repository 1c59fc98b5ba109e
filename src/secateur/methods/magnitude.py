"""Magnitude pruning: remove the weights of smallest |W_ij|, no calibration data.

The Wanda and SparseGPT papers' magnitude baseline uses one threshold per matrix, so the
default comparison group is the whole layer (`scope="layer"`); `scope="row"` compares
within each output row like Wanda. The method's own scope overrides the target's for
unstructured sparsity; N:M groups are fixed by the pattern and unaffected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.errors import SecateurError
from secateur.masks import prune_mask
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats

SCOPES = ("layer", "row")


@register
@dataclass
class Magnitude:
    name: ClassVar[str] = "magnitude"
    needs: ClassVar[frozenset[str]] = frozenset()

    scope: str = "layer"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise SecateurError(f"magnitude: unknown scope {self.scope!r}; accepted: {', '.join(SCOPES)}")

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        if target.kind == "unstructured":
            target = dataclasses.replace(target, scope=self.scope)
        mask = prune_mask(weight.abs(), target)
        return PruneResult(weight.masked_fill(mask, 0.0))
