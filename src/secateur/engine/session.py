"""One block session: what every pruning flow does block by block, written once.

The unstructured engine (`engine/sequential.py`) is a short loop over a `BlockSession`, and
every structured method receives one (`engine/structured.py`). The session owns:

- capturing the first block's inputs and how every block is called (`start_pass`);
- gathering statistics of some linears of block i over every calibration window (`gather`),
  one `LinearStats` per distinct input (q/k/v read the same tensor);
- advancing: block i's outputs become block i+1's inputs (`advance`), with the one NaN/Inf
  check of the activations;
- holding a block on the compute device while it is used and parking it after (`block`);
- the whole model's calibration loss (`calibration_nll`), for searches that score by it;
- timing phases (`phase`: one timer for every flow);
- step checkpoints, for `prune --resume` (`replay`, `complete`): a flow names its steps and
  hands over the state each step produced; a resumed run is given that state back instead of
  recomputing it, and the pass's inputs are read back from disk instead of recomputed.

Like the rest of the engine it knows no method and no architecture: layers come from the
adapter, statistics are `LinearStats`, steps are names and tensors.

Seams for streaming weights from disk and for torch.distributed, each one method with a
default that does what a single process holding the whole model needs:
- `fetch_block` / `release_block` bracket every use of a block (through `block`). With a
  `stream` (a `secateur.models.streaming.StreamedModel`, `prune --stream`) the model is a
  skeleton on the meta device: fetching materializes the block from the checkpoint (or, once
  pruned, from the stream's scratch files), releasing frees it again, keeping what changed.
  Capture materializes the embeddings for the time of the capture, windows go one by one into
  the stream's activation list (on disk with `--offload-activations`), and a flow that needs the
  whole model at once (`calibration_nll`) is refused: at most one block is in memory;
- `reduce_stats` runs after every gather and `reduce_loss` after every loss sum: a distributed
  run all-reduces there, each rank having run its own share of the windows.

Distributed runs (torchrun; `engine/distributed.py`). Every rank holds the whole model and the
whole `input_ids`, but captures and runs only its contiguous share of the windows
(`World.partition`), so `hidden` is this rank's windows. The statistics are all-reduced after
every gather (`World.all_reduce_stats`), losses after every sum, and per-token values a method
needs whole (a median) are gathered by `gather_tokens`. Every rank then prunes every layer
itself, from the same totals: pruning is deterministic on the same hardware and software, so
the ranks keep bitwise the same model without broadcasting weights. That is how the structured
methods run (their solves are small beside their passes). Where the statistics hold Gram or
cross matrices and each layer is solved on its own (SparseGPT, ALPS, TRIM: the unstructured
engine; Putri's FFN refit), `gather(..., owners=True)` takes the owner path instead: each layer (layers sharing an
input share one) gets an owner rank (`World.assign_owners`, balanced by solve cost), its large
sums are reduced to the owner alone (`World.reduce_stats_to`; released elsewhere), the owner
solves, and the result is broadcast (`share_result`): each rank solves about 1/N of the layers,
and the Gram matrices travel once instead of twice. `calibration_nll` shares its windows between the ranks the same way.
Traffic (bytes exchanged) is recorded per completed step in `traffic_bytes`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from secateur.engine.capture import BlockCall, capture_block_inputs, capture_one_by_one, off_cpu, run_block
from secateur.engine.distributed import World
from secateur.errors import SecateurError
from secateur.models.base import Adapter, LinearView
from secateur.stats import OUTPUT_STATISTICS, LinearStats

# Random generator states kept with every step (names no flow's own tensors use).
_RNG_CPU, _RNG_CUDA = "secateur.rng.cpu", "secateur.rng.cuda"


@dataclass
class PruneReport:
    """What a pruning run did, whichever engine ran it."""

    layers: list[dict] = field(default_factory=list)  # name, shape, sparsity, (bias_compensation)
    block_sparsity: list[float] = field(default_factory=list)  # target per block
    owl_outlier_ratios: list[float] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)  # peak RSS of the pruning phase (and CUDA peak)
    warnings: list[str] = field(default_factory=list)
    # Structured methods: parameters before/after, per-block shapes, removed blocks.
    structure: dict | None = None
    world_size: int = 1  # processes that shared the calibration windows (torchrun)
    traffic_bytes: dict[str, dict[str, int]] | None = None  # distributed runs: bytes exchanged per step

    @property
    def sparsity_achieved(self) -> float:
        if self.structure is not None:  # fraction of the decoder blocks' parameters removed
            return 1.0 - self.structure["params_after"] / self.structure["params_before"]
        zeros = sum(layer["zeros"] for layer in self.layers)
        total = sum(layer["params"] for layer in self.layers)
        return zeros / total if total else 0.0


@dataclass
class Step:
    """What a completed step handed over: tensors and JSON values (see `BlockSession.complete`)."""

    tensors: dict[str, torch.Tensor]
    meta: dict


class PhaseTimer:
    """Wall time per phase. CUDA is synchronised at both ends so GPU work is not misattributed;
    a phase opened inside another counts for the outer one only, so totals never overlap."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = {}
        self._depth = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outermost = self._depth == 0
        self._depth += 1
        if outermost:
            self._sync()
            start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if outermost:
                self._sync()
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class SharedInputStats:
    """Hooks that feed each linear's `LinearStats`, computing each statistic once per input.

    q/k/v (and gate/up) receive the very same input tensor; their statistics are identical,
    and for SparseGPT's XᵀX computing them once instead of three times is most of the cost.
    Layers are matched by tensor identity (not address, which can be reused after a free).
    """

    def __init__(self, views: dict[str, LinearView], needs: frozenset[str]):
        self.stats: dict[str, LinearStats] = {}
        self.owner: dict[str, str] = {}  # layer -> layer whose statistics it shares
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._needs = needs
        self._handles = [
            view.module.register_forward_hook(lambda _m, inputs, out, name=name: self._hook(name, inputs[0], out))
            for name, view in views.items()
        ]

    def _hook(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if name not in self.owner:  # first window: find who, if anyone, saw this tensor already
            # Output statistics differ per layer even for a shared input: never share those.
            shared = None if self._needs & OUTPUT_STATISTICS else next(
                (owner for seen, owner in self._seen if seen is x), None)
            self.owner[name] = shared or name
            if shared is None:
                self.stats[name] = LinearStats(x.shape[-1], self._needs)
        self._seen.append((x, name))
        if self.owner[name] == name:
            self.stats[name].update(x, y)

    def end_window(self) -> None:
        self._seen.clear()

    def close(self) -> dict[str, LinearStats]:
        for handle in self._handles:
            handle.remove()
        return {name: self.stats[owner] for name, owner in self.owner.items()}


class BlockSession:
    """The services above for one model, its adapter and its calibration windows.

    `work_dir` (a `secateur.engine.workdir.WorkDir`, or None) is where completed steps are
    kept for a resume; without one, `replay` finds nothing and `complete` writes nothing.
    `world` (a joined `World`, or None: one process) is this process's place among torchrun's.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, input_ids: torch.Tensor | None, *,
                 device: torch.device | str = "cpu", progress: bool = True, work_dir=None,
                 world: World | None = None, stream=None):
        self.model = model
        self.stream = stream
        self.adapter = adapter
        self.input_ids = input_ids  # every window: this rank runs its share (`own_windows`)
        self.world = world or World()
        self.traffic_bytes: dict[str, dict[str, int]] = {}  # step -> bytes exchanged (distributed runs)
        self.device = device
        self.progress = progress
        self.timer = PhaseTimer(device)
        self.warnings: list[str] = []
        self.calls: list[BlockCall] = []
        self.work_dir = work_dir
        self.owner: dict[str, int] = {}  # layer -> the rank that solves it (see `gather`'s owners)
        self._owner_path = False
        self._hidden: list[torch.Tensor] = []  # or, streamed with --offload-activations, a list on disk
        self._held: dict[int, int] = {}  # block index -> how many `block()` uses hold it now
        self._module_names: dict[nn.Module, str] = {}
        # Resume bookkeeping for the current pass's inputs: the file they were last saved to
        # (None: as captured), whether they changed since, and a file to read them back from
        # when next used (set by `replay`, read lazily: replayed steps never touch them).
        self._inputs_file: str | None = None
        self._inputs_changed = False
        self._inputs_to_load: str | None = None

    # --- timing ------------------------------------------------------------------------
    def phase(self, name: str):
        """Time the `with` body under `name` (capture, calibration_forward, pruning, ...)."""
        return self.timer.phase(name)

    def timings_s(self, started: float) -> dict[str, float]:
        """Seconds per phase, rounded, with "total" since `started` (a `time.perf_counter()`)."""
        timings = {name: round(seconds, 3) for name, seconds in self.timer.totals.items()}
        timings.setdefault("calibration_forward", 0.0)
        return timings | {"total": round(time.perf_counter() - started, 3)}

    # --- blocks on the device (the streaming seam) ---------------------------------------
    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block `index`, on the compute device while the `with` lasts. Nested uses of the same
        block share one fetch and one release."""
        held = self._held.get(index, 0)
        block = self.fetch_block(index) if held == 0 else self.adapter.blocks()[index]
        self._held[index] = held + 1
        try:
            yield block
        finally:
            self._held[index] -= 1
            if self._held[index] == 0:
                del self._held[index]
                self.release_block(index, block)

    def fetch_block(self, index: int) -> nn.Module:
        """Make block `index` ready to run on the compute device and return it.
        Streamed: its weights are read here."""
        block = self.adapter.blocks()[index]
        if self.stream is not None:
            self.stream.materialize(block)
        return block.to(self.device)

    def release_block(self, index: int, block: nn.Module) -> None:
        """Done with block `index` for now (it may have been pruned meanwhile). Streamed: its
        memory is freed here, what changed kept in the stream's scratch files."""
        if off_cpu(self.device):
            block.to("cpu")
        if self.stream is not None:
            self.stream.release(block)

    # --- the distributed seam ------------------------------------------------------------
    def reduce_stats(self, stats: dict[str, LinearStats]) -> dict[str, LinearStats]:
        """Statistics of this process's windows -> statistics of all windows. Layers sharing an
        input share one `LinearStats` object: reduce each object once. Seam: torch.distributed
        all-reduces the sums here; one process has nothing to add."""
        return self.world.all_reduce_stats(stats)

    def reduce_loss(self, total: float, count: int) -> tuple[float, int]:
        """A summed loss and its token count over this process's windows -> over all windows.
        Seam: torch.distributed all-reduces here (one exchange); one process has nothing to add."""
        if not self.world.distributed:
            return total, count
        summed = self.world.all_reduce_sum(torch.tensor([float(total), float(count)], dtype=torch.float64))
        return float(summed[0]), int(summed[1])

    def gather_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values (dim 0) of this process's windows -> of all windows, in window order,
        on the CPU: for what is not a sum (a median). One process has nothing to add."""
        return self.world.all_gather_cat(values).cpu()

    def describe_world(self, report: PruneReport) -> None:
        """Put the run's process count and, distributed, its traffic per step (with what was
        exchanged after the last step, e.g. a search's losses, as "after steps") in `report`."""
        report.world_size = self.world.size
        if self.world.distributed:
            rest = self.world.traffic.take()
            report.traffic_bytes = dict(self.traffic_bytes) | ({"after steps": rest} if rest["total"] else {})

    def own_windows(self) -> torch.Tensor:
        """The calibration windows this process runs: all of them, or its share under torchrun."""
        if not self.world.distributed:
            return self.input_ids
        share = self.world.partition(len(self.input_ids))
        return self.input_ids[share.start:share.stop]

    # --- passes over the blocks ------------------------------------------------------------
    def start_pass(self) -> None:
        """(Re)capture the first block's inputs, and every block's call, from the model as it is now."""
        with self.phase("capture"):
            if self.stream is None:
                self._hidden, self.calls = capture_block_inputs(self.adapter, self.own_windows(), self.device)
            else:
                self.close()
                self._hidden = self.stream.activation_list()
                with self.stream.materialized(self.stream.front()):
                    self.calls = capture_one_by_one(self.adapter, self.own_windows(), self.device, self._hidden)
        self._inputs_file, self._inputs_changed, self._inputs_to_load = None, False, None

    def close(self) -> None:
        """Let go of the pass's inputs (activations on disk are removed)."""
        closing = getattr(self._hidden, "close", None)
        if closing is not None:
            closing()
        self._hidden = []

    @property
    def hidden(self) -> list[torch.Tensor]:
        """The inputs of the next block to run, one (1, seqlen, hidden) tensor per window (this
        process's windows), on the CPU."""
        if self._inputs_to_load is not None:  # a resumed pass: the interrupted run's inputs
            loaded = self.work_dir.load_inputs(self._inputs_to_load)
            self._inputs_to_load = None
            self.close()
            self._hidden = [] if self.stream is None else self.stream.activation_list()
            for x in loaded:
                self._hidden.append(x)
        return self._hidden

    @torch.no_grad()
    def gather(self, index: int, views: dict[str, LinearView], needs: frozenset[str],
               advance: bool = False, owners: bool = False) -> dict[str, LinearStats]:
        """Statistics of `views` (layers of block `index`) over every calibration window. With
        `advance`, the same pass also replaces the inputs by the block's outputs. With `owners`
        (distributed runs): each layer's Gram and cross matrices are summed on its owner rank only
        (`self.owner[name]`; None elsewhere), the rest on every rank; the owner solves the layer
        (`solves`) and hands the result to the others (`share_result`)."""
        hidden = self.hidden
        with self.phase("calibration_forward"), self.block(index) as block:
            gatherer = SharedInputStats(views, needs)
            try:
                for position, x in enumerate(hidden):
                    out = run_block(block, x.to(self.device), self.calls[index])
                    gatherer.end_window()
                    if advance:
                        hidden[position] = self._checked(out, index).to(x.device)
            finally:
                stats = gatherer.close()
        self._inputs_changed |= advance
        missing = sorted(set(views) - set(stats))
        if missing:
            raise SecateurError(f"layers {missing} were never called by their block; the adapter lists wrong layers")
        self._owner_path = owners and self.world.distributed
        if self._owner_path:
            self.owner = self.world.assign_owners(stats, {name: view.out_features for name, view in views.items()})
            stats = self.world.reduce_stats_to(self.owner, stats)
        else:
            self.owner = dict.fromkeys(stats, self.world.rank)
            stats = self.reduce_stats(stats)
        for name, stat in stats.items():
            stat.check_finite(self.layer_name(views[name]))
        return stats

    def solves(self, name: str) -> bool:
        """Whether this process solves layer `name` of the last `gather` (every process does,
        but on the owner path)."""
        return self.owner.get(name, self.world.rank) == self.world.rank

    def share_result(self, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The solving rank's `tensor` (a pruned weight, a bias, or None) for layer `name` of the
        last `gather`, on every rank, bitwise, on the CPU; off the owner path every rank has its
        own already."""
        if not self._owner_path:
            return tensor
        shared = self.world.broadcast_tensor(tensor, src=self.owner[name])
        return None if shared is None else shared.cpu()

    @torch.no_grad()
    def advance(self, index: int, observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Run block `index` on every window; its outputs become the next block's inputs.
        `observe(input, output)` sees each window's pair (e.g. for block influence)."""
        hidden = self.hidden
        with self.phase("calibration_forward"), self.block(index) as block:
            for position, x in enumerate(hidden):
                out = self._checked(run_block(block, x.to(self.device), self.calls[index]), index)
                if observe is not None:
                    observe(x.to(self.device), out)
                hidden[position] = out.to(x.device)
        self._inputs_changed = True

    @staticmethod
    def _checked(out: torch.Tensor, index: int) -> torch.Tensor:
        if not torch.isfinite(out).all():
            raise SecateurError(f"block {index} produced NaN or Inf activations on the calibration text; "
                                "use --dtype float32, or check the model and the calibration data")
        return out

    def layer_name(self, view: LinearView) -> str:
        """The layer's name in the model (model.layers.3.mlp.down_proj), for messages and reports."""
        if view.module not in self._module_names:
            self._module_names = {module: name for name, module in self.model.named_modules()}
        return self._module_names[view.module]

    # --- whole-model loss -------------------------------------------------------------------
    @torch.no_grad()
    def calibration_nll(self, windows: int = 1) -> float:
        """Mean next-token NLL of the whole model on the first `windows` calibration windows
        (the whole model goes to the device; used by searches that score by perplexity). Under
        torchrun the ranks share those windows."""
        if self.stream is not None:
            raise SecateurError("this method scores candidates by the whole model's calibration loss, which needs "
                                "the whole model in memory: it does not run with --stream")
        self.model.to(self.device)
        total, count = 0.0, 0
        scored = self.input_ids[:windows]
        share = self.world.partition(len(scored), allow_empty=True)
        with self.phase("search_forward"):
            for ids in scored[share.start:share.stop]:
                ids = ids.unsqueeze(0).to(self.device)
                logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum")
                total += float(loss)
                count += ids.shape[1] - 1
        if off_cpu(self.device):
            self.model.to("cpu")
        total, count = self.reduce_loss(total, count)
        value = total / count
        if not math.isfinite(value):
            raise SecateurError("calibration loss is NaN or Inf; check the model and the calibration data")
        return value

    # --- step checkpoints (resume) ------------------------------------------------------------
    def replay(self, step: str) -> Step | None:
        """The state step `step` handed to `complete` in the interrupted run this one resumes, or
        None: compute it (and then `complete` it). Steps replay in the order they completed.

        A flow calls it where the step would start; on a replay it redoes the step's effect on
        the model from the saved state and moves on, without gathering or advancing: the pass's
        inputs are read back from disk when the first step that is not replayed uses them."""
        if self.work_dir is None:
            return None
        record = self.work_dir.replay(step)
        if record is None:
            return None
        self._inputs_file = self._inputs_to_load = record.inputs
        self._inputs_changed = False
        self.warnings[:] = record.warnings
        tensors = dict(record.tensors)
        torch.set_rng_state(tensors.pop(_RNG_CPU))  # what comes next draws what it drew in the interrupted run
        if _RNG_CUDA in tensors:
            torch.cuda.set_rng_state(tensors.pop(_RNG_CUDA), self.device)
        return Step(tensors, record.meta)

    def complete(self, step: str, tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> None:
        """Step `step` is done: keep what a resumed run needs to redo its effect (`tensors`, and
        JSON values in `meta`), with the pass's inputs when they changed since the last step and
        the random generators' states. Call it once the step's changes to the model are made (and
        the block advanced, if it is)."""
        if self.world.distributed:
            self.traffic_bytes[step] = self.world.traffic.take()
        if self.work_dir is None:
            return
        if self._inputs_changed:
            self._inputs_file = self.work_dir.save_inputs(self.hidden)
            self._inputs_changed = False
        tensors = dict(tensors or {}) | {_RNG_CPU: torch.get_rng_state()}
        if torch.device(self.device).type == "cuda":
            tensors[_RNG_CUDA] = torch.cuda.get_rng_state(self.device)
        self.work_dir.complete(step, tensors, meta or {}, inputs=self._inputs_file, warnings=self.warnings)
