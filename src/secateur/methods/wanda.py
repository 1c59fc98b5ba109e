"""Wanda: score |W_ij| · ‖X_:,j‖₂, removing the lowest in each comparison group (a row by default).

A weight matters as much as the input it multiplies: a small weight on a column with large
activations can carry more output than a large weight on a quiet one. No weight update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from secateur.masks import prune_mask
from secateur.methods._scores import wanda_scores
from secateur.methods.base import PruneResult, SparsityTarget, register
from secateur.stats import LinearStats


@register
@dataclass
class Wanda:
    name: ClassVar[str] = "wanda"
    needs: ClassVar[frozenset[str]] = frozenset({"sumsq"})

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult:
        mask = prune_mask(wanda_scores(weight, stats), target)
        return PruneResult(weight.masked_fill(mask, 0.0))
