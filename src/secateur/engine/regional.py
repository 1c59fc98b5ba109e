"""Block-level ("regional") gradients and weight fitting, for methods that look past one layer.

A per-layer method sees one linear's weight and input statistics. Some methods (Wanda++) also
want to know how each weight moves the whole decoder block's output, and to repair the pruned
block against the dense one. Backpropagating through the whole model would cost the whole
model's activations; through one block, on one window at a time, it costs one block's
activations for one window: the "regional" gradients of Wanda++. This module offers those
services to the sequential engine, knowing no method and no architecture (the block is run by
`run_block` with the call the session captured; the layers are the adapter's `LinearView`s):

- `regional_gradients`: per targeted linear, the root mean square over the calibration windows
  of the gradient of ‖block(X_n)‖₂ (the ℓ2 norm of the block's output on window n) with respect
  to its weight;
- `block_outputs`: the block's outputs on some windows (the dense targets of a fit), leaving the
  session's inputs as they are;
- `regional_optimize`: RMSprop steps on the targeted weights, one window per step, fitting the
  pruned block's outputs to the dense block's (summed squared error) with the pruned weights held
  at zero; undone if it leaves the block's error on those windows higher than before.

A method asks for these by declaring `regional = True` and the settings `RegionalPlan.of` reads
(see `secateur.methods.base.Method`); the engine then runs `RegionalPlan.prepare` before pruning a
block and `RegionalPlan.optimize` after. `block_fit=K` on any per-layer method
(`secateur.methods.base.BlockFitMethod`) declares the fit alone (`regional_gradients = False`): no
gradient pass, the method's own masks, then the same fit.

Memory: the gradient pass holds one window's activations and graph, plus one float64
weight-shaped accumulator (and the gradient) per targeted linear. The fit holds the dense outputs
of the windows it uses (as much as that many of the session's inputs) and, per targeted linear,
float32 master weights, RMSprop's square averages, the gradient and a copy of the weights before
the fit (to undo it).

Distributed runs (torchrun): the gradient sums and window counts are all-reduced, so every rank
prunes from the same bits. The fit's steps are sequential (one window each, as the paper), so
they are not shared out: the fit's windows (inputs and dense outputs) are gathered, rank 0 fits,
and its weights are broadcast, so the ranks stay bitwise identical even where a GPU's backward
pass is not deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from secateur.engine.capture import BlockCall, run_block
from secateur.errors import SecateurError
from secateur.models.base import LinearView

__all__ = [
    "RegionalFit", "RegionalPlan", "RegionalState", "block_outputs", "fit_schedule", "regional_gradients",
    "regional_optimize",
]

# The start of the warning a block whose fit was undone leaves in the report: tests and tools match it.
FIT_UNDONE = "regional optimisation raised the block's output error"


# --- the plan a method declares ----------------------------------------------------------------
@dataclass(frozen=True)
class RegionalPlan:
    """What a regional method asks of the engine for every block: its regional gradients before
    pruning (unless `gradients` is False), then `rounds` rounds of regional optimisation, each on
    `samples` windows drawn at random (one RMSprop step per window, learning rate `lr`).
    `rounds = 0`: gradients only."""

    rounds: int
    samples: int
    lr: float
    gradients: bool = True  # False: the fit alone (a BlockFitMethod), no regional gradients
    lr_option: str = "ro_lr"  # the option that sets `lr`, named when a fit is undone

    @staticmethod
    def of(method) -> RegionalPlan | None:
        """The plan of `method`, or None for a method that does not declare `regional = True`.
        A wrapper (refine=, TRIM) runs its inner method's declaration."""
        inner = method
        while inner is not None and not getattr(inner, "regional", False):
            inner = getattr(inner, "method", None)
        if inner is None:
            return None
        return RegionalPlan(rounds=inner.iterations, samples=inner.ro_samples, lr=inner.ro_lr,
                            gradients=getattr(inner, "regional_gradients", True),
                            lr_option=getattr(inner, "lr_option", "ro_lr"))

    def prepare(self, session, index: int, block: nn.Module, views: dict[str, LinearView]) -> RegionalState:
        """Before pruning block `index` (still dense): its regional gradients and, for the fit,
        the dense outputs of the windows the fit will use."""
        if not views:  # every layer of the block --ignore'd: nothing to score or fit
            return RegionalState({}, [], [], [])
        schedule = fit_schedule(len(session.input_ids), self.samples, self.rounds, seed=index)
        own = _own_range(session)
        positions = [window - own.start for window in sorted(set(schedule)) if window in own]
        targets = block_outputs(session, index, block, positions)
        gradients = regional_gradients(session, index, block, views) if self.gradients else {}
        return RegionalState(gradients, schedule, positions, targets)

    def optimize(self, session, index: int, block: nn.Module, views: dict[str, LinearView],
                 state: RegionalState) -> RegionalFit | None:
        """After pruning: fit the block's targeted weights to the dense outputs `prepare` kept,
        the pruned weights staying zero. Returns what the fit did (None without rounds)."""
        if not state.schedule:
            return None
        kept = {name: view.get_weight() != 0 for name, view in views.items()}
        fit = regional_optimize(session, index, block, views, state.positions, state.targets, kept,
                                state.schedule, self.lr)
        if fit.reverted:
            message = (f"block {index}: {FIT_UNDONE} on its windows "
                       f"({fit.error_before:.4g} -> {fit.error_after:.4g}); the block keeps its pruned weights "
                       f"without it (lower {self.lr_option})")
            session.warnings.append(message)
        return fit


@dataclass
class RegionalState:
    """What `RegionalPlan.prepare` computed for one block: the regional gradient of each targeted
    linear ((out, in) float32), the fit's steps (global window indices) and, for this rank's
    windows among them (`positions` in the session's inputs), the dense block's outputs."""

    gradients: dict[str, torch.Tensor]
    schedule: list[int]
    positions: list[int]
    targets: list[torch.Tensor]


@dataclass(frozen=True)
class RegionalFit:
    """What one regional optimisation did: the block's summed squared output error against the
    dense block on the fit's windows, before and after, and whether the fit was undone."""

    steps: int
    error_before: float
    error_after: float
    reverted: bool


def fit_schedule(windows: int, samples: int, rounds: int, seed: int) -> list[int]:
    """The windows of the fit's steps, in order: `rounds` rounds of min(samples, windows)
    distinct windows drawn at random (a generator of its own, seeded by `seed`: the same on
    every rank and on a resumed run, and the global random state is left alone)."""
    if windows <= 0 or rounds <= 0 or samples <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    count = min(samples, windows)
    return [int(w) for _ in range(rounds) for w in torch.randperm(windows, generator=generator)[:count]]


# --- gradients ------------------------------------------------------------------------------------
def regional_gradients(session, index: int, block: nn.Module, views: dict[str, LinearView]) -> dict[str, torch.Tensor]:
    """Per targeted linear, G = sqrt(Σ_n g_n² / N) with g_n = ∂‖block(X_n)‖₂ / ∂W over the N
    calibration windows (all ranks'): an (out, in) float32 matrix, as `view.get_weight()` orients
    the weight, on the weight's device. Nothing of the block changes."""
    weights = {name: view.module.weight for name, view in views.items()}
    # float64 sums, as the statistics': each window's float32 g² is added in float64, so the order of
    # the additions (one process, or the ranks' sums) all but never changes the total (engine/distributed.py).
    sums = {name: torch.zeros(w.shape, dtype=torch.float64, device=w.device) for name, w in weights.items()}
    call = _autograd_call(session.calls[index])
    hidden = session.hidden
    with session.phase("regional_gradients"), torch.enable_grad(), _only_trainable(block, weights.values()):
        for x in hidden:
            out = run_block(block, _autograd_tensor(x.to(session.device)), call)
            loss = out.float().norm()  # ‖f(X_n)‖₂ over the whole window (Frobenius)
            if not torch.isfinite(loss):
                raise SecateurError(f"block {index}: the regional loss is NaN or Inf on a calibration window; "
                                    "use --dtype float32, or check the model and the calibration data")
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for name, grad in zip(weights, grads, strict=True):
                if grad is not None:  # None: the output does not depend on that weight (gradient 0)
                    sums[name].add_(grad.float().square())  # float32 square, float64 sum
            del out, loss, grads  # free this window's graph before the next
    count = session.world.all_reduce_sum(len(hidden))
    gradients = {}
    for name, view in views.items():
        total = session.world.all_reduce_sum(sums.pop(name))  # one layer at a time: no second copy of all
        rms = total.div_(count).sqrt_().float()
        gradients[name] = rms.T if view.transposed else rms
    return gradients


# --- forward passes that leave the session's inputs alone ------------------------------------------
@torch.no_grad()
def block_outputs(session, index: int, block: nn.Module, positions: Sequence[int]) -> list[torch.Tensor]:
    """The block's outputs on this rank's windows at `positions` of the session's inputs, as the
    block is now, stored where the inputs are (the CPU). The session's inputs are not changed."""
    hidden = session.hidden
    outputs = []
    with session.phase("calibration_forward"):
        for position in positions:
            x = hidden[position]
            outputs.append(run_block(block, x.to(session.device), session.calls[index]).to(x.device))
    return outputs


@torch.no_grad()
def _squared_error(block: nn.Module, call: BlockCall, inputs, targets, device) -> float:
    """Σ over the windows of ‖block(x) − target‖², in float64."""
    total = 0.0
    for x, target in zip(inputs, targets, strict=True):
        out = run_block(block, x.to(device), call)
        total += float((out.float() - target.to(device).float()).square().sum(dtype=torch.float64))
    return total


# --- regional optimisation -------------------------------------------------------------------------
def regional_optimize(session, index: int, block: nn.Module, views: dict[str, LinearView],
                      positions: Sequence[int], targets: Sequence[torch.Tensor], kept: dict[str, torch.Tensor],
                      schedule: Sequence[int], lr: float) -> RegionalFit:
    """Fit the targeted weights of block `index` so that its outputs approach `targets`.

    `positions` are this rank's windows among the fit's (positions in the session's inputs),
    `targets` the dense block's outputs on them (`block_outputs`), `kept` per layer the (out, in)
    boolean mask of the weights that may change (the others stay exactly zero: their gradient is
    masked, so RMSprop never moves them, and they are masked again after every step).
    `schedule` lists the global window of each step. Each step: the summed squared error
    ‖block(X_n) − target_n‖² of one window, its gradient, one RMSprop step (torch's defaults:
    α = 0.99, ε = 1e-8, no momentum; one optimiser for all steps, as the paper's reference)
    on float32 master weights, written back to the block in its dtype. If the block's error on
    the fit's windows ends higher than it began, the weights are put back as they were.
    Deterministic: same data and hardware, same weights."""
    own = _own_range(session)
    windows = sorted(set(schedule))
    inputs = [session.hidden[position] for position in positions]
    if session.world.distributed:  # every rank's share of the fit's windows, in window order, on every rank
        inputs = [x.unsqueeze(0) for x in session.gather_tokens(_stacked(inputs, session))]
        targets = [y.unsqueeze(0) for y in session.gather_tokens(_stacked(targets, session))]
    elif len(positions) != len(windows) or any(p + own.start != w for p, w in zip(positions, windows, strict=True)):
        raise ValueError("positions must be the session's inputs of every window in the schedule")
    if len(inputs) != len(windows):
        raise ValueError(f"{len(windows)} windows in the schedule but {len(inputs)} inputs")
    step_of = {window: i for i, window in enumerate(windows)}
    fit = None
    with session.phase("regional_optimization"):
        if session.world.is_main:
            fit = _fit(session, index, block, views, inputs, targets, kept, [step_of[w] for w in schedule], lr)
        if session.world.distributed:  # rank 0's weights, bitwise, everywhere
            for view in views.values():
                view.set_weight(session.world.broadcast_tensor(view.get_weight().contiguous(), src=0))
            fit = session.world.broadcast_object(fit, src=0)
    return fit


def _fit(session, index, block, views, inputs, targets, kept, steps, lr) -> RegionalFit:
    device = session.device
    call = session.calls[index]
    modules = {name: view.module for name, view in views.items()}
    # Masks and master weights in the module's stored layout (GPT-2's Conv1D is (in, out)).
    keep = {name: (kept[name].T if views[name].transposed else kept[name]).to(device) for name in views}
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    masters = {name: module.weight.detach().float().clone().mul_(keep[name]) for name, module in modules.items()}
    optimizer = torch.optim.RMSprop(list(masters.values()), lr=lr)
    error_before = _squared_error(block, call, inputs, targets, device)
    train_call = _autograd_call(call)
    parameters = [module.weight for module in modules.values()]
    with torch.enable_grad(), _only_trainable(block, parameters):
        for step in steps:
            out = run_block(block, _autograd_tensor(inputs[step].to(device)), train_call)
            loss = (out.float() - targets[step].to(device).float()).square().sum()
            if not torch.isfinite(loss):
                break  # diverged: the check below undoes the fit
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            del out, loss
            for (name, master), grad in zip(masters.items(), grads, strict=True):
                master.grad = torch.zeros_like(master) if grad is None else grad.float().mul_(keep[name])
            optimizer.step()
            with torch.no_grad():
                for name, master in masters.items():
                    master.mul_(keep[name])
                    modules[name].weight.copy_(master)
    error_after = _squared_error(block, call, inputs, targets, device)
    reverted = not error_after <= error_before  # NaN included
    if reverted:
        with torch.no_grad():
            for name, module in modules.items():
                module.weight.copy_(before[name])
    return RegionalFit(len(steps), error_before, error_after, reverted)


# --- helpers --------------------------------------------------------------------------------------
def _own_range(session) -> range:
    """The global indices of the windows this rank holds (all of them in one process)."""
    count = len(session.input_ids)
    return session.world.partition(count) if session.world.distributed else range(count)


def _stacked(tensors: Sequence[torch.Tensor], session) -> torch.Tensor:
    """Windows (1, seq, hidden) as one (k, seq, hidden) tensor; a rank without any of the fit's
    windows sends an empty one of the right shape."""
    if tensors:
        return torch.cat([t.reshape(1, *t.shape[-2:]) for t in tensors])
    sample = session.hidden[0]
    return sample.new_empty((0, *sample.shape[-2:]))


@contextmanager
def _only_trainable(block: nn.Module, parameters) -> Iterator[None]:
    """Within the `with`: only `parameters` require gradients in `block` (no graph is kept for
    norms and biases); every flag is put back after."""
    flags = {param: param.requires_grad for param in block.parameters()}
    chosen = {id(param) for param in parameters}
    try:
        for param in flags:
            param.requires_grad_(id(param) in chosen)
        yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


def _autograd_tensor(value):
    """`value` usable in a graph: the session captures inputs under inference mode, and autograd
    refuses to save an inference tensor for the backward pass (rotary cos/sin, masks), so those
    are cloned outside it. Containers are walked; everything else is returned as is."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, tuple):
        return tuple(_autograd_tensor(v) for v in value)
    if isinstance(value, list):
        return [_autograd_tensor(v) for v in value]
    if isinstance(value, dict):
        return {k: _autograd_tensor(v) for k, v in value.items()}
    return value


def _autograd_call(call: BlockCall) -> BlockCall:
    return BlockCall(_autograd_tensor(call.args), _autograd_tensor(call.kwargs))
