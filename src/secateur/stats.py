"""Calibration statistics of one linear layer's inputs, kept as mergeable sums.

Every statistic is a plain sum (count, sum, sum of squares, XᵀX), never a running
mean, so two `LinearStats` gathered on different shards of the calibration data
(other processes, other disk-streamed chunks) combine exactly with `merge` — the
same thing a torch.distributed all-reduce of the tensors would do.

Sums are float64: 128 windows of 2048 tokens is 262k rows, and a float32 sum of
squares over that many rows loses the low digits that STADE's variance needs.
Each batch is first reduced in float32 (fast matmul), then added in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from secateur.errors import SecateurError

# Names a method may ask for in `Method.needs`. The first three are of the layer's inputs X;
# "out_sumsq" (Σ y², per output) and "cross" (XᵀY) also need its outputs Y.
KNOWN_STATISTICS = frozenset({"sum", "sumsq", "gram", "out_sumsq", "cross"})
OUTPUT_STATISTICS = frozenset({"out_sumsq", "cross"})


@dataclass
class LinearStats:
    """Sums over the calibration tokens seen by one linear layer (inputs of width `cols`)."""

    cols: int
    needs: frozenset[str]
    count: int = 0
    sum: torch.Tensor | None = field(default=None, repr=False)  # (cols,)  Σ x
    sumsq: torch.Tensor | None = field(default=None, repr=False)  # (cols,)  Σ x²
    gram: torch.Tensor | None = field(default=None, repr=False)  # (cols, cols)  XᵀX
    out_sumsq: torch.Tensor | None = field(default=None, repr=False)  # (out,)  Σ y²
    cross: torch.Tensor | None = field(default=None, repr=False)  # (cols, out)  XᵀY

    def __post_init__(self) -> None:
        unknown = set(self.needs) - KNOWN_STATISTICS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN_STATISTICS)}")

    @property
    def needs_outputs(self) -> bool:
        return bool(self.needs & OUTPUT_STATISTICS)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add a batch of inputs `x` (..., cols) and, for output statistics, outputs `y` (..., out)."""
        rows = x.detach().reshape(-1, self.cols).float()
        self.count += rows.shape[0]
        if "sum" in self.needs:
            self.sum = _add(self.sum, rows.sum(0))
        if "sumsq" in self.needs:
            self.sumsq = _add(self.sumsq, rows.square().sum(0))
        if "gram" in self.needs:
            self.gram = _add(self.gram, rows.T @ rows)
        if self.needs_outputs:
            outputs = y.detach().reshape(rows.shape[0], -1).float()
            if "out_sumsq" in self.needs:
                self.out_sumsq = _add(self.out_sumsq, outputs.square().sum(0))
            if "cross" in self.needs:
                self.cross = _add(self.cross, rows.T @ outputs)

    def merge(self, other: LinearStats) -> LinearStats:
        """Combine with statistics of the same layer gathered on other data."""
        if other.cols != self.cols or other.needs != self.needs:
            raise ValueError("can only merge statistics of the same layer and kind")
        merged = LinearStats(self.cols, self.needs, self.count + other.count)
        for name in _SUMS:
            a, b = getattr(self, name), getattr(other, name)
            setattr(merged, name, b if a is None else a if b is None else a + b)
        return merged

    def check_finite(self, where: str) -> None:
        for name in _SUMS:
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise SecateurError(
                    f"calibration statistics of {where} contain NaN or Inf ({name}); the model overflows on "
                    "the calibration text: use a float32 --dtype, or check the model and the text"
                )
        if self.count == 0 and self.needs:
            raise SecateurError(f"{where} saw no calibration tokens; check the calibration data")

    # Derived quantities, in float64. Methods read these, never the raw sums' meaning.
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def variance(self) -> torch.Tensor:
        """Population variance per input column (E[x²] − E[x]², clamped at 0)."""
        mean = self.mean()
        return (self.sumsq / self.count - mean.square()).clamp_min(0.0)

    def column_norm(self) -> torch.Tensor:
        """‖X_:,j‖₂ over all calibration tokens (Wanda's activation norm)."""
        return self.sumsq.sqrt()


_SUMS = ("sum", "sumsq", "gram", "out_sumsq", "cross")


def _add(total: torch.Tensor | None, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(torch.float64)
    return batch if total is None else total.add_(batch)
