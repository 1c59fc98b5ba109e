"""A pruning recipe: a frozen, validated, YAML-serialisable description of one prune.

Every CLI flag of `secateur prune` that changes what is computed is a field here
with the same name (dashes → underscores), so `--recipe file.yaml` and flags are
interchangeable and the recipe saved next to a checkpoint reproduces it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from secateur.errors import SecateurError
from secateur.methods.base import SparsityTarget

ALLOCATIONS = ("uniform", "owl")
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Recipe:
    method: str = "wanda"
    sparsity: float = 0.5  # fraction of weights removed (for N:M it is implied by N/M)
    sparsity_type: str = "unstructured"  # "unstructured" or "N:M", e.g. "2:4"
    allocation: str = "uniform"  # "uniform" or "owl" (outlier-weighted per-block sparsity)
    owl_threshold: float = 5.0  # OWL's M: a score is an outlier above M × the block's mean score
    owl_lambda: float = 0.08  # OWL's λ: per-block sparsities spread over [s − λ, s + λ]
    ignore: tuple[str, ...] = ()  # glob patterns over "blocks.<i>.<linear name>" left dense
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. {blocksize: 128} for sparsegpt
    # Calibration data.
    calib: str = "wiki-passages"  # a file path or a dataset name (wiki-passages, c4, wikitext2)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        from secateur.methods.base import get_method

        method = get_method(self.method, **self.method_options)  # unknown method / option → SecateurError
        if getattr(method, "structured", False) and (self.sparsity_type != "unstructured" or self.allocation != "uniform"):
            raise SecateurError(
                f"{self.method} is structured: --sparsity is the fraction of decoder-block parameters removed; "
                "--sparsity-type and --allocation owl apply to unstructured methods only"
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise SecateurError(f"sparsity {self.sparsity} is outside [0, 1); accepted: 0 <= sparsity < 1")
        self.target()  # validates sparsity_type
        if self.allocation not in ALLOCATIONS:
            raise SecateurError(f"unknown allocation {self.allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
        if self.allocation == "owl" and self.sparsity_type != "unstructured":
            raise SecateurError("--allocation owl works with unstructured sparsity only (N:M fixes the ratio)")
        if self.owl_lambda < 0 or self.owl_threshold <= 0:
            raise SecateurError("owl_lambda must be >= 0 and owl_threshold > 0")
        if self.nsamples < 1 or self.seqlen < 2:
            raise SecateurError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")

    def target(self, sparsity: float | None = None) -> SparsityTarget:
        """The per-layer target; `sparsity` overrides the uniform one (OWL's per-block values)."""
        if self.sparsity_type == "unstructured":
            return SparsityTarget.unstructured(self.sparsity if sparsity is None else sparsity)
        match = _NM.match(self.sparsity_type)
        if not match:
            raise SecateurError(
                f"unknown sparsity type {self.sparsity_type!r}; accepted: unstructured, or N:M such as 2:4 or 4:8"
            )
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise SecateurError(f"N:M sparsity {self.sparsity_type} needs 0 < N < M (e.g. 2:4, 4:8)")
        return SparsityTarget.n_m(n, m)

    @property
    def nominal_sparsity(self) -> float:
        return self.target().sparsity

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration data: every structured method, every method that
        gathers statistics, and OWL (its outlier survey), whatever the method."""
        from secateur.methods.base import get_method

        method = get_method(self.method, **self.method_options)
        return getattr(method, "structured", False) or bool(method.needs) or self.allocation == "owl"

    # --- YAML -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ignore"] = list(self.ignore)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SecateurError(f"unknown recipe field(s) {unknown}; accepted: {', '.join(sorted(known))}")
        data = dict(data)
        if "ignore" in data:
            data["ignore"] = tuple(data["ignore"] or ())
        if "sparsity_type" in data:
            data["sparsity_type"] = str(data["sparsity_type"])
        if data.get("method_options") is None:
            data.pop("method_options", None)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise SecateurError(f"recipe file {str(path)!r} does not exist; give a YAML file of recipe fields")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SecateurError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise SecateurError(f"recipe {path} must be a mapping of recipe fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)
