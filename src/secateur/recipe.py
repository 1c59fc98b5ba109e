"""A pruning recipe: a frozen, validated, YAML-serialisable description of one prune.

Every CLI flag of `secateur prune` that changes what is computed is a field here
with the same name (dashes → underscores), so `--recipe file.yaml` and flags are
interchangeable and the recipe saved next to a checkpoint reproduces it. An llm-compressor
recipe (`NAME_stage:` keys) is read too, through the field-by-field mapping in secateur.interop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from secateur.allocation import OWL_MAX_SPARSITY
from secateur.errors import SecateurError
from secateur.methods.base import SparsityTarget

# Per-block (OWL) and per-row (TRIM, secateur.trim) allocations; "owl+trim" does both.
ALLOCATIONS = ("uniform", "owl", "trim", "owl+trim")
_NM = re.compile(r"^(\d+):(\d+)$")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_patterns(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(p, str) and p for p in value)


def _is_options(value) -> bool:
    # Keys are names; a number among the values is finite (YAML's .nan/.inf is no option value).
    return isinstance(value, dict) and all(isinstance(k, str) and k for k in value) and not any(
        isinstance(v, float) and not math.isfinite(v) for v in value.values())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is refused by PyYAML itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 3e-7 as a string: it wants a dot (3.0e-7). Learning rates are written
# the short way, so a number with an exponent and no dot is a float here too (as in YAML 1.2).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str):
    """YAML as recipes read it: safe, and a key given twice is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


# Every field's type, checked before any value is used: what the YAML or the caller gave must
# be exactly this (YAML's "2" is a string, not a number; YAML reads an unquoted 2:4 as 124).
SCHEMA: dict[str, tuple] = {
    "method": (lambda v: isinstance(v, str), "a method name (string)"),
    "sparsity": (_is_number, "a number in [0, 1)"),
    "sparsity_type": (lambda v: isinstance(v, str), "a string: unstructured, or N:M quoted as '2:4'"),
    "allocation": (lambda v: isinstance(v, str), "a string: uniform, owl, trim or owl+trim"),
    "owl_threshold": (_is_number, "a number > 0"),
    "owl_lambda": (_is_number, "a number >= 0"),
    "ignore": (_is_patterns, "a list of glob strings such as 'blocks.0.*'"),
    "method_options": (_is_options, "a mapping of option names to values (numbers finite)"),
    "calib": (lambda v: isinstance(v, str) and bool(v), "a dataset name or a file path (string)"),
    "nsamples": (_is_int, "an integer >= 1"),
    "seqlen": (_is_int, "an integer >= 2"),
    "seed": (_is_int, "an integer >= 0"),
}


def _check_schema(recipe) -> None:
    for name, (valid, accepted) in SCHEMA.items():
        value = getattr(recipe, name)
        if not valid(value):
            raise SecateurError(f"recipe field {name} = {_shown(value)} is invalid; accepted: {accepted}")


def _shown(value) -> str:
    text = repr(value if not isinstance(value, tuple) else list(value))
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Recipe:
    method: str = "wanda"
    sparsity: float = 0.5  # fraction of weights removed (for N:M it is implied by N/M)
    sparsity_type: str = "unstructured"  # "unstructured" or "N:M", e.g. "2:4"
    allocation: str = "uniform"  # "uniform", "owl" (per-block), "trim" (per-row) or "owl+trim"
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
        _check_schema(self)
        from secateur.methods.base import get_method

        method = get_method(self.method, **self.method_options)  # unknown method / option → SecateurError
        structured = getattr(method, "structured", False)
        if structured and (self.sparsity_type != "unstructured" or self.allocation != "uniform"):
            raise SecateurError(
                f"{self.method} is structured: --sparsity is the fraction of decoder-block parameters removed; "
                "--sparsity-type and --allocation apply to unstructured methods only"
            )
        if structured and self.ignore:
            raise SecateurError(f"{self.method} is structured and removes whole units across the model; --ignore "
                                "applies to unstructured and N:M methods only")
        if not 0.0 <= self.sparsity < 1.0:
            raise SecateurError(f"sparsity {self.sparsity} is outside [0, 1); accepted: 0 <= sparsity < 1")
        self.target()  # validates sparsity_type
        if self.allocation not in ALLOCATIONS:
            raise SecateurError(f"unknown allocation {self.allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.sparsity_type != "unstructured":
            raise SecateurError(f"--allocation {self.allocation} works with unstructured sparsity only (N:M fixes "
                                "the ratio of every group); use --allocation uniform")
        if not (self.owl_lambda >= 0 and self.owl_threshold > 0):
            raise SecateurError("owl_lambda must be >= 0 and owl_threshold > 0")
        if self.block_allocation == "owl" and not (self.sparsity - self.owl_lambda >= 0
                                             and self.sparsity + self.owl_lambda <= OWL_MAX_SPARSITY):
            raise SecateurError(
                f"OWL spreads block sparsities over [s - λ, s + λ] = [{self.sparsity - self.owl_lambda:g}, "
                f"{self.sparsity + self.owl_lambda:g}], which leaves [0, {OWL_MAX_SPARSITY}]: blocks would be "
                f"clipped and the mean would miss {self.sparsity:g}; use --owl-lambda <= "
                f"{max(0.0, min(self.sparsity, OWL_MAX_SPARSITY - self.sparsity)):.3g}"
            )
        if self.nsamples < 1 or self.seqlen < 2:
            raise SecateurError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        if not 0 <= self.seed < 2**63:
            raise SecateurError(f"seed {self.seed} is outside [0, 2**63); give a non-negative integer")

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
    def block_allocation(self) -> str:
        """How sparsity is spread over blocks: "owl" (also in "owl+trim") or "uniform"."""
        return "owl" if "owl" in self.allocation.split("+") else "uniform"

    @property
    def row_allocation(self) -> str:
        """How a layer's sparsity is spread over its rows: "trim" (also in "owl+trim") or "uniform"."""
        return "trim" if "trim" in self.allocation.split("+") else "uniform"

    @property
    def nominal_sparsity(self) -> float:
        return self.target().sparsity

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration data: every structured method, every method that
        gathers statistics, OWL (its outlier survey) and TRIM (its Gram matrix), whatever the method."""
        from secateur.methods.base import get_method

        method = get_method(self.method, **self.method_options)
        return getattr(method, "structured", False) or bool(method.needs) or self.allocation != "uniform"

    # --- YAML -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ignore"] = list(self.ignore)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> Recipe:
        """A recipe from its fields, or from a parsed llm-compressor recipe (`source` names it in errors)."""
        from secateur.interop import is_llm_compressor_recipe, recipe_fields

        if is_llm_compressor_recipe(data):
            data = recipe_fields(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SecateurError(f"unknown recipe field(s) {unknown}; accepted: {', '.join(sorted(known))}")
        data = dict(data)
        if isinstance(data.get("ignore"), str):
            data["ignore"] = [data["ignore"]]  # one pattern given as a string
        if isinstance(data.get("ignore"), list):
            data["ignore"] = tuple(data["ignore"])
        elif data.get("ignore", ()) is None:
            data["ignore"] = ()
        if _is_int(data.get("sparsity_type")):
            raise SecateurError(f"recipe field sparsity_type = {data['sparsity_type']} is a number; YAML reads an "
                                "unquoted N:M such as 2:4 as a base-60 number: quote it, sparsity_type: '2:4'")
        if data.get("method_options") is None:
            data.pop("method_options", None)
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise SecateurError(f"recipe file {str(path)!r} does not exist or is not a file; give a YAML file of "
                                "recipe fields")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise SecateurError(f"recipe {path} is not UTF-8 text (byte {error.start}); give a YAML file") from None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None)
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            reason = f"{problem}{where}" if problem else str(error).splitlines()[0]
            raise SecateurError(f"recipe {path} is not valid YAML: {reason}") from None
        except OSError as error:
            raise SecateurError(f"cannot read recipe {path}: {error.strerror or error}") from None
        if data is None:
            raise SecateurError(f"recipe {path} is empty; give recipe fields such as 'method: wanda' (write '{{}}' "
                                "for all defaults)")
        if not isinstance(data, dict):
            raise SecateurError(f"recipe {path} must be a mapping of recipe fields")
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)
