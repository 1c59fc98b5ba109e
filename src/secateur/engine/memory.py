"""Peak memory of one phase of work (the pruning), not of the whole process.

`ru_maxrss` only ever grows, and loading a GGUF model briefly holds two copies of the
weights, so the process peak says little about pruning. Linux lets a process reset its
own high-water mark (writing 5 to /proc/self/clear_refs); VmHWM then tracks the peak of
the phase alone. Where that is unavailable we fall back to the process peak and say so.
Measurements nest: a phase measured inside another (the pruning inside a benchmark's whole
run) resets the mark, so the outer one first keeps the peak reached so far.
"""

from __future__ import annotations

import resource

import torch

_ACTIVE: list[PeakMemory] = []  # the measurements open now, outermost first


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB → MiB
    except OSError:
        return None
    return None


class PeakMemory:
    """Use as a context manager around a phase; `.result()` gives MiB figures."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.phase_only = False
        self.before_mb = None
        self._carried_mb = 0.0  # the peak before an inner measurement reset the mark

    def __enter__(self):
        if _ACTIVE:
            reached = _status_mb("VmHWM") or 0.0
            for outer in _ACTIVE:
                outer._carried_mb = max(outer._carried_mb, reached)
        _ACTIVE.append(self)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self.phase_only = True
        except OSError:
            self.phase_only = False
        self.before_mb = _status_mb("VmRSS")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self.peak_mb = _status_mb("VmHWM") if self.phase_only else None
        if self.peak_mb is not None:
            self.peak_mb = max(self.peak_mb, self._carried_mb)
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def result(self) -> dict:
        out = {
            "rss_before_mb": None if self.before_mb is None else round(self.before_mb, 1),
            "rss_peak_mb": round(self.peak_mb, 1),
            "rss_peak_scope": "pruning phase" if self.phase_only else "whole process",
        }
        if self.cuda_peak_mb is not None:
            out["cuda_peak_allocated_mb"] = round(self.cuda_peak_mb, 1)
        return out
