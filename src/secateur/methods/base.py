"""What a pruning method is, to the engine.

A method is a small object with two duties (the split llm-compressor uses):
  1. say which input statistics it needs (`needs`, names from `secateur.stats`);
  2. given one layer's weight, bias and statistics, return the pruned weight and bias.

It sees plain tensors only: `weight` is always (out_features, in_features) float32,
whatever the architecture stores (GPT-2's Conv1D is transposed by its adapter).
It knows no architecture, no module, no block: the engine and adapters do that. A method
that treats layers differently by their role in the block (STADE's `layers=out`) sets
`takes_layer_info = True` and receives a `LayerInfo` as keyword `layer`; the others keep the
four-argument `prune` and never see it (`prune_layer` is the engine's one call site).

Any per-layer method also accepts the option `refine=<refiner>` (e.g. `refine=dsnot`): a
refiner improves the mask the method chose, given the dense weight and the statistics it asks
for. `get_method` then returns a `RefinedMethod`, which the engine sees as one more method.

Any per-layer method also accepts `block_fit=<rounds>` (with `block_fit_lr`, `block_fit_windows`):
after each decoder block is pruned, its kept weights are fitted to the dense block's outputs
(the regional optimisation of Wanda++, `secateur.engine.regional`), the mask held fixed.
`get_method` then returns a `BlockFitMethod`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from secateur.errors import SecateurError
from secateur.stats import LinearStats


@dataclass(frozen=True)
class SparsityTarget:
    """How many weights of one layer to remove, and in which comparison groups.

    kind "unstructured": remove floor(sparsity · group size) weights in each group, the
    group being one output row (scope "row") or the whole matrix (scope "layer").
    kind "nm": in every run of `m` consecutive input columns of a row, remove `n`.
    `row_counts` (unstructured only; TRIM's per-row allocation, secateur.trim) overrides both
    scopes: row i loses exactly row_counts[i] weights.
    """

    kind: str  # "unstructured" | "nm"
    sparsity: float  # fraction removed; for N:M it is n / m
    n: int = 0
    m: int = 0
    scope: str = "row"  # "row" | "layer" (unstructured only)
    row_counts: tuple[int, ...] | None = None  # weights to remove in each output row

    @staticmethod
    def unstructured(sparsity: float, scope: str = "row") -> SparsityTarget:
        return SparsityTarget("unstructured", float(sparsity), scope=scope)

    @staticmethod
    def n_m(n: int, m: int) -> SparsityTarget:
        return SparsityTarget("nm", n / m, n=n, m=m)

    def check_layer(self, in_features: int, where: str) -> None:
        if self.kind == "nm" and in_features % self.m:
            raise SecateurError(
                f"{self.n}:{self.m} sparsity needs the input width of every targeted layer to be a multiple "
                f"of {self.m}, but {where} has {in_features}; use an M that divides it, or --ignore the layer"
            )


@dataclass(frozen=True)
class LayerInfo:
    """What the engine tells a method about the layer being pruned, beyond its tensors."""

    role: str  # secateur.roles.ROLE_NORMED ("normed") or ROLE_OUT ("out"), from the adapter
    # For a method that declares `regional = True` (Wanda++): the root mean square over the
    # calibration windows of ∂‖block output‖₂ / ∂W, (out, in) float32 (secateur.engine.regional).
    regional_grad: torch.Tensor | None = None


@dataclass
class PruneResult:
    weight: torch.Tensor  # (out, in), same shape as given, pruned entries exactly 0
    bias: torch.Tensor | None = None  # new bias (out,), or None to leave the bias as it was


class Method(Protocol):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]  # statistics the engine must gather for each layer
    # Optional (read with getattr, False when absent). True: before pruning each block the engine
    # computes its regional gradients (passed as `LayerInfo.regional_grad`, so the method also sets
    # `takes_layer_info`), and after, fits the block's kept weights to the dense block's outputs
    # with the method's `iterations` rounds of `ro_samples` windows at learning rate `ro_lr`
    # (secateur.engine.regional.RegionalPlan).
    regional: ClassVar[bool]

    def prune(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LinearStats, target: SparsityTarget
    ) -> PruneResult: ...


class Refiner(Protocol):
    """Improves a method's mask on one layer (DSnoT): `result` is what the method returned for
    the dense `weight` and `bias`; the refined result keeps the target's sparsity and groups."""

    needs: frozenset[str]

    def refine(
        self, weight: torch.Tensor, bias: torch.Tensor | None, result: PruneResult, stats: LinearStats,
        target: SparsityTarget,
    ) -> PruneResult: ...


REFINE_OPTION = "refine"
# block_fit=K: K rounds of regional optimisation after each block (0: none); the learning rate and
# windows per round default to what `benchmarks/methods.py`'s block-fit ablation chose under P0.
BLOCK_FIT_DEFAULTS = {"block_fit": 0, "block_fit_lr": 3e-4, "block_fit_windows": 32}
REFINERS: dict[str, Refiner] = {}  # filled by the modules that define them (register_refiner)


def register_refiner(name: str, refiner: Refiner) -> None:
    """Make `refiner` available to every per-layer method as option `refine=<name>`."""
    REFINERS[name] = refiner


@dataclass(frozen=True)
class MethodWrapper:
    """A per-layer method with something done around it (a refiner of its mask): to the engine,
    one more method, named as the method and needing its statistics plus `extra_needs`."""

    method: Method
    takes_layer_info: ClassVar[bool] = True  # passed on to the method that asks for it

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def extra_needs(self) -> frozenset[str]:
        return frozenset()

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs | self.extra_needs


@dataclass(frozen=True)
class RefinedMethod(MethodWrapper):
    """A per-layer method followed by a refiner of its mask (`refine=<name>`)."""

    refiner: str = ""

    @property
    def extra_needs(self) -> frozenset[str]:
        return REFINERS[self.refiner].needs

    def prune(self, weight, bias, stats, target, layer: LayerInfo | None = None) -> PruneResult:
        result = prune_layer(self.method, weight, bias, stats, target, layer)
        return REFINERS[self.refiner].refine(weight, bias, result, stats, target)


@dataclass(frozen=True)
class BlockFitMethod(MethodWrapper):
    """A per-layer method whose pruned blocks are then fitted to the dense ones (`block_fit=K`).

    Each layer is pruned exactly as the method alone prunes it; after the whole block is pruned,
    the engine runs K rounds of `windows` random calibration windows of regional optimisation
    (`secateur.engine.regional`: one RMSprop step per window at learning rate `lr` on the
    block's kept weights, fitting its outputs to the dense block's, pruned weights held at zero,
    undone if the block's error on those windows ends higher). It is Wanda++'s second half
    without its regional gradients, so it composes with any mask (SparseGPT, ALPS, RIA, …).
    """

    rounds: int = 0
    windows: int = BLOCK_FIT_DEFAULTS["block_fit_windows"]
    lr: float = BLOCK_FIT_DEFAULTS["block_fit_lr"]
    regional: ClassVar[bool] = True  # read by RegionalPlan.of: the block-level fit ...
    regional_gradients: ClassVar[bool] = False  # ... without the regional gradients
    lr_option: ClassVar[str] = "block_fit_lr"

    @property
    def iterations(self) -> int:  # the names RegionalPlan reads (Wanda++'s options)
        return self.rounds

    @property
    def ro_samples(self) -> int:
        return self.windows

    @property
    def ro_lr(self) -> float:
        return self.lr

    def __getattr__(self, name: str):
        # The layer result is the inner method's, so TRIM may rank by its first scores.
        if name == "trim_scores":
            return getattr(self.method, name)
        raise AttributeError(name)

    def prune(self, weight, bias, stats, target, layer: LayerInfo | None = None) -> PruneResult:
        return prune_layer(self.method, weight, bias, stats, target, layer)


def _block_fit(name: str, method: Method, options_given: dict) -> Method:
    """`method` wrapped in a `BlockFitMethod` when the block-fit options given ask for rounds."""
    rounds, lr, windows = (options_given.get(key, BLOCK_FIT_DEFAULTS[key]) for key in BLOCK_FIT_DEFAULTS)
    for key, value, ok in (("block_fit", rounds, isinstance(rounds, int) and rounds >= 0),
                           ("block_fit_windows", windows, isinstance(windows, int) and windows >= 1),
                           ("block_fit_lr", lr, isinstance(lr, int | float) and lr > 0 and lr < float("inf"))):
        if isinstance(value, bool) or not ok:
            raise SecateurError(f"option {key}={value!r} of method {name!r}: block_fit is a number of rounds >= 0, "
                                "block_fit_windows an integer >= 1, block_fit_lr a finite number > 0 (defaults "
                                f"{BLOCK_FIT_DEFAULTS})")
    if not rounds:
        if set(options_given) - {"block_fit"}:
            raise SecateurError(f"option(s) {sorted(set(options_given) - {'block_fit'})} of method {name!r} set "
                                "the block fit, which runs only with block_fit=<rounds> >= 1")
        return method
    if getattr(method, "regional", False):
        raise SecateurError(f"method {name!r} fits its blocks itself (its own iterations, ro_lr options); "
                            "block_fit is for the other per-layer methods")
    return BlockFitMethod(method, rounds=rounds, windows=windows, lr=float(lr))


def prune_layer(
    method: Method,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: LinearStats | None,
    target: SparsityTarget,
    layer: LayerInfo,
) -> PruneResult:
    """Call `method.prune`, passing `layer` only to a method that declares `takes_layer_info`."""
    if getattr(method, "takes_layer_info", False):
        return method.prune(weight, bias, stats, target, layer=layer)
    return method.prune(weight, bias, stats, target)


class StructuredMethod:
    """Base of the methods that remove whole units (neurons, KV groups, blocks) across the
    model: the structured engine calls `prune_model(session, sparsity)`; there is no per-layer
    `prune`, because what one layer loses depends on every other."""

    needs: ClassVar[frozenset[str]] = frozenset()  # they gather their own statistics in the session
    structured: ClassVar[bool] = True

    def prune(self, weight, bias, stats, target):
        raise SecateurError(f"{self.name} is a structured method: it prunes whole models (secateur.prune), "
                            "not one layer")


METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available by its `name` (CLI --method, recipe `method`)."""
    METHODS[cls.name] = cls
    return cls


def _method_class(name: str) -> type:
    from secateur import methods as _all  # noqa: F401  (importing the package registers every method)

    if not isinstance(name, str) or name not in METHODS:
        raise SecateurError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_option_names(name: str) -> set[str]:
    """The recipe parameters (`--method-option KEY=VALUE`) that method `name` accepts."""
    cls = _method_class(name)
    wrappers = {REFINE_OPTION, *BLOCK_FIT_DEFAULTS}
    return set(_option_fields(cls)) | (wrappers if not getattr(cls, "structured", False) else set())


def _option_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _refined(name: str, method: Method, refiner) -> RefinedMethod:
    if not isinstance(refiner, str) or refiner not in REFINERS:
        raise SecateurError(f"option refine={refiner!r} of method {name!r} is not a refiner; accepted: "
                            f"{', '.join(sorted(REFINERS))}")
    # A refiner swaps weights within the N:M groups of memory order, which a method that reorders
    # the input columns before choosing its groups (RIA's permute) does not keep.
    if getattr(method, "permutes_columns", False):
        raise SecateurError(f"refine={refiner} keeps N:M groups in memory order, which {name}'s column "
                            "permutation moves; use one or the other")
    return RefinedMethod(method, refiner)


def _check_option_type(method: str, field: dataclasses.Field, value) -> None:
    """An option must have the type of its default (an int is fine where a float is expected)."""
    default = field.default
    if default is dataclasses.MISSING or default is None:
        return
    kind = type(default)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SecateurError(f"option {field.name}={value!r} of method {method!r} must be a {kind.__name__} "
                            f"(default {default!r})")


def get_method(name: str, **options) -> Method:
    """Instantiate a registered method; `options` are its recipe parameters (e.g. blocksize)."""
    cls = _method_class(name)
    fields = _option_fields(cls)
    accepted = method_option_names(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise SecateurError(
            f"unknown option(s) {unknown} for method {name!r}; accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    refiner = options.pop(REFINE_OPTION, None)
    fit_options = {key: options.pop(key) for key in BLOCK_FIT_DEFAULTS if key in options}
    for key, value in options.items():
        _check_option_type(name, fields[key], value)
    try:
        method = cls(**options)
    except (TypeError, ValueError) as error:  # a method's own range check
        raise SecateurError(f"method {name!r}: {error}") from None
    method = method if refiner is None else _refined(name, method, refiner)
    return _block_fit(name, method, fit_options)
