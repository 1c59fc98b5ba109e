"""Weight scores that several methods and the OWL allocation share."""

from __future__ import annotations

import torch

from secateur.stats import LinearStats


def wanda_scores(weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    """|W_ij| · ‖X_:,j‖₂ as a float32 (out, in) matrix (Wanda's score)."""
    return weight.abs().float() * stats.column_norm().to(torch.float32)
