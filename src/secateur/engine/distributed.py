"""Calibration over several processes (torchrun), in plain torch.distributed.

Why this is possible at all: calibration windows are independent, and every statistic a
method reads is a plain sum (secateur.stats). So N processes ("ranks") can each take a
contiguous share of the windows, gather `LinearStats` on it, and add their sums; what the
ranks must then agree on — a layer's pruned weight, a block's kept units — is computed once,
on one rank, and broadcast, so every rank holds bitwise the same model and re-runs the pruned
block on its own windows. No framework beyond torch.distributed: gloo on CPU, NCCL on CUDA.

`World` is this process's place among the others, read from the variables torchrun sets.
Without torchrun (or with WORLD_SIZE=1) it is a single process and every operation is a
no-op that returns its input, so the engine calls these functions unconditionally.

Determinism. A sum over ranks is never left to the backend's reduction, whose order of
additions depends on its algorithm and on which rank receives: the rank that needs it
receives the others' buffers and adds them in rank order, ((t₀ + t₁) + t₂) + …. So the total
has the same bits whichever rank owns it, and an all-reduce (that sum on rank 0, then a
broadcast) leaves the same bits on every rank. Against one process only the float64 order of
additions differs (each rank's windows first, then the ranks' sums), and usually not even the
result: each window adds a float32 sum (24 significant bits) into float64 (53), which is exact
in any order while an entry's per-window values stay within a factor of about 2³⁰/windows of
each other. Then statistics, masks and weights are bitwise those of one process (so on the
tiny Llama and on a SmolLM2-135M block, tests/test_distributed.py); otherwise totals differ by
float64 rounding (~1e-16 relative), and a mask could flip only where two scores tie within it.
This holds while statistics are added one window at a time, as the engine does: sums over
batches of several windows would be float32 sums, and batch boundaries must then fall on
rank boundaries.

Traffic: see `Traffic` for what the per-block byte counts mean.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from secateur.errors import SecateurError
from secateur.stats import KNOWN_STATISTICS, LinearStats

# (cols, cols) and (cols, out) sums: reduced only to the rank that solves with them.
LARGE_SUMS = ("cross", "gram")
# Vectors of one value per column or output (plus the token count): cheap, every rank gets them.
SMALL_SUMS = tuple(sorted(KNOWN_STATISTICS - set(LARGE_SUMS)))

# What a broadcast tensor's header can describe: its dtype (by index here) and up to _MAX_DIMS sizes.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8
_HEADER = 3 + _MAX_DIMS  # present?, dtype index, number of dimensions, sizes


class Traffic:
    """Bytes this rank has exchanged through collectives, by kind, since the last `take`.

    Convention: the payload this rank sends or receives, each message counted once at each end.
    A point-to-point send or receive counts the tensor's bytes (a rank-order sum: every rank
    sends its buffer once, the owner receives N − 1 of them); a broadcast counts the tensor's
    bytes on every rank, the source included, however the backend forwards it; an all-gather
    counts the gathered result. Headers (shapes, pickled object sizes) are included. So an
    all-reduce of S bytes between 2 ranks counts 2S on each: S towards rank 0, S back.
    """

    def __init__(self) -> None:
        self._bytes: dict[str, int] = {}

    def add(self, kind: str, nbytes: int) -> None:
        self._bytes[kind] = self._bytes.get(kind, 0) + int(nbytes)

    def take(self) -> dict[str, int]:
        """The bytes since the previous call, by kind ("reduce", "broadcast", "all_gather") and
        "total"; the count then starts again from zero (call it once per block)."""
        taken = dict(sorted(self._bytes.items()))
        taken["total"] = sum(taken.values())
        self._bytes.clear()
        return taken


class World:
    """This process's rank among `size` processes, and the collectives the engine needs.

    Every rank must make the same calls in the same order with tensors of the same shapes (the
    engine does: every rank runs the same blocks with the same layers). A single-process World
    (size 1) makes every call a no-op.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1}")
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.device = torch.device("cpu")  # the backend's device, set by `init`
        self.traffic = Traffic()
        self._joined = False  # whether `init` created the process group (and `close` destroys it)

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # --- joining -----------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """The World torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
        a single process when WORLD_SIZE is unset or 1. `init` joins through the same variables
        of os.environ (torch's env:// rendezvous); `environ` only replaces them for checking."""
        env = os.environ if environ is None else environ
        if not env.get("WORLD_SIZE"):
            return cls()
        size = _env_int(env, "WORLD_SIZE", 1)
        if size == 1:
            return cls()
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise SecateurError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start distributed runs "
                                "with torchrun (torchrun --nproc_per_node N -m secateur prune ...)")
        _env_int(env, "MASTER_PORT", 1, 65535)
        return cls(_env_int(env, "RANK", 0, size - 1), size, _env_int(env, "LOCAL_RANK", 0))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the checkpoint, results and logs."""
        return self.rank == 0

    def init(self, device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> torch.device:
        """Join the other ranks and return this rank's compute device.

        `device` is what the user asked for. On CUDA every rank takes cuda:LOCAL_RANK (one GPU per
        process; an index in `device` is replaced) and the backend is NCCL; on the CPU it is gloo.
        `timeout_s` bounds every collective: a rank that dies or diverges stops the others then.
        """
        requested = torch.device(device)
        if not self.distributed:
            self.device = requested
            return requested
        if requested.type == "cuda":
            if not torch.cuda.is_available() or not dist.is_nccl_available():
                raise SecateurError("distributed runs on CUDA need CUDA and NCCL, which this torch lacks; "
                                    "use --device cpu (gloo)")
            if self.local_rank >= torch.cuda.device_count():
                raise SecateurError(f"LOCAL_RANK {self.local_rank} has no GPU (this machine has "
                                    f"{torch.cuda.device_count()}): start at most that many processes per machine")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            backend = "nccl"
        elif requested.type == "cpu":
            self.device, backend = requested, "gloo"
        else:
            raise SecateurError(f"distributed runs accept --device cpu (gloo) or cuda (NCCL), not {requested.type}")
        if dist.is_initialized():  # a program embedding secateur joined already: use its group as it is
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.size):
                raise SecateurError(f"the process group already joined is rank {dist.get_rank()} of "
                                    f"{dist.get_world_size()}, but RANK/WORLD_SIZE say {self.rank} of {self.size}")
            return self.device
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=self.size,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=self.device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as error:  # DistStoreError and friends: unreachable or timed out
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SecateurError(f"rank {self.rank} could not join the other {self.size - 1} processes at "
                                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {reason}") from None
        self._joined = True
        return self.device

    def close(self) -> None:
        """Leave the process group `init` joined (after a final barrier, so no rank exits while
        another still needs it)."""
        if self._joined and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        self._joined = False

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # --- who does what -----------------------------------------------------------------
    def partition(self, n_items: int, *, allow_empty: bool = False) -> range:
        """The items (calibration windows) this rank takes: a contiguous block, the first
        n_items mod size ranks taking one more, so every item is taken exactly once and in order.

        A rank with no window would have no statistics to add (the engine creates them on the
        first window), so that is refused unless `allow_empty` (e.g. sharing out search
        candidates, where an idle rank simply contributes nothing).
        """
        if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 0:
            raise ValueError(f"n_items must be an integer >= 0, got {n_items!r}")
        if n_items < self.size and not allow_empty:
            raise SecateurError(f"{n_items} calibration windows cannot be shared by {self.size} processes (each "
                                f"needs one at least): give --nsamples {self.size} or more, or start fewer processes")
        base, extra = divmod(n_items, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def assign_owners(self, stats: Mapping[str, LinearStats],
                      out_features: Mapping[str, int] | None = None) -> dict[str, int]:
        """The rank that solves each layer of one block.

        Layers sharing one `LinearStats` (q/k/v read the same input) share its owner, since its
        Gram matrix is reduced to that rank alone. Largest estimated solve first, each statistic
        goes to the least loaded rank (ties: the lowest), so the ranks finish a block together.
        A layer's estimated cost is cols²·(cols + out): factorising its (cols, cols) Gram matrix
        and updating its `out` rows (SparseGPT's shape; `out` defaults to cols). Deterministic:
        every rank computes the same assignment from the same names and shapes.
        """
        if not self.distributed:
            return {name: 0 for name in stats}
        out_features = out_features or {}
        groups = _shared_groups(stats)
        costs = [sum(obj.cols ** 2 * (obj.cols + out_features.get(name, obj.cols)) for name in names)
                 for obj, names in groups]
        load = [0] * self.size
        owners: dict[str, int] = {}
        for position in sorted(range(len(groups)), key=lambda i: -costs[i]):  # stable: name order among equals
            owner = min(range(self.size), key=lambda rank: (load[rank], rank))
            load[owner] += costs[position]
            owners.update(dict.fromkeys(groups[position][1], owner))
        return owners

    # --- statistics ------------------------------------------------------------------------
    def all_reduce_stats(self, stats: Mapping[str, LinearStats]) -> Mapping[str, LinearStats]:
        """Replace every rank's partial sums (count and every statistic) by the totals over all
        ranks, in place; a `LinearStats` shared by several layers is reduced once. Every rank
        ends with the same bits. Returns `stats`."""
        if not self.distributed:
            return stats
        groups = _shared_groups(stats)
        self._all_reduce_small([obj for obj, _ in groups])
        for obj, _ in groups:
            for name in LARGE_SUMS:
                if getattr(obj, name) is not None:
                    self._sum_in_rank_order(getattr(obj, name), owner=0)
                    self._broadcast_into(getattr(obj, name), src=0)
        return stats

    def reduce_stats_to(self, owners: int | Mapping[str, int], stats: Mapping[str, LinearStats]
                        ) -> Mapping[str, LinearStats]:
        """Like `all_reduce_stats` for the count and the small sums, but the Gram and cross
        matrices are summed only on each layer's owner (`owners[name]`, or one rank for all).
        On the other ranks those fields are released (set to None): they held partial sums that
        nothing needs, and a 7B model's down_proj Gram matrix is about 1 GB. Returns `stats`."""
        owner_of = dict.fromkeys(stats, owners) if isinstance(owners, int) else dict(owners)
        groups = _shared_groups(stats)
        for _, names in groups:
            chosen = {owner_of.get(name) for name in names}
            if len(chosen) != 1 or not all(isinstance(o, int) and 0 <= o < self.size for o in chosen):
                raise ValueError(f"layers {names} share one statistics object, so they need one owner in "
                                 f"0..{self.size - 1}; got {sorted(map(str, chosen))}")
        if not self.distributed:
            return stats
        self._all_reduce_small([obj for obj, _ in groups])
        for obj, names in groups:
            owner = owner_of[names[0]]
            for name in LARGE_SUMS:
                if getattr(obj, name) is not None:
                    self._sum_in_rank_order(getattr(obj, name), owner)
                    if self.rank != owner:
                        setattr(obj, name, None)
        return stats

    def _all_reduce_small(self, objects: Sequence[LinearStats]) -> None:
        """All counts and small sums of `objects` in one buffer, one all-reduce, unpacked in place.
        Counts travel as float64, exact below 2⁵³ tokens."""
        parts = []
        for obj in objects:
            parts.append(torch.tensor([float(obj.count)], dtype=torch.float64, device=self.device))
            parts += [getattr(obj, name).reshape(-1).to(self.device, torch.float64)
                      for name in SMALL_SUMS if getattr(obj, name) is not None]
        if not parts:
            return
        buffer = torch.cat(parts)
        self._sum_in_rank_order(buffer, owner=0)
        self._broadcast_into(buffer, src=0)
        offset = 0
        for obj in objects:
            obj.count = int(buffer[offset].item())
            offset += 1
            for name in SMALL_SUMS:
                value = getattr(obj, name)
                if value is not None:
                    value.copy_(buffer[offset:offset + value.numel()].view_as(value))
                    offset += value.numel()

    # --- sums, broadcasts, gathers ------------------------------------------------------------
    def all_reduce_sum(self, value):
        """The sum over ranks of a float, an int or a tensor (e.g. a calibration loss and its
        token count, stacked in one float64 tensor to make one exchange), the same on every
        rank. A tensor is summed in place when it is contiguous and on the backend's device;
        use the returned value."""
        if isinstance(value, bool):
            raise TypeError("all_reduce_sum takes a number or a tensor, not a bool")
        if not self.distributed:
            return value
        if isinstance(value, torch.Tensor):
            total = value if value.device == self.device and value.is_contiguous() else value.to(self.device).contiguous()
            self._sum_in_rank_order(total, owner=0)
            self._broadcast_into(total, src=0)
            return total if total is value else total.to(value.device)
        if isinstance(value, int):
            return int(self.all_reduce_sum(torch.tensor([value], dtype=torch.int64, device=self.device)).item())
        if isinstance(value, float):
            return float(self.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=self.device)).item())
        raise TypeError(f"all_reduce_sum takes a float, an int or a tensor, not {type(value).__name__}")

    def broadcast_tensor(self, tensor: torch.Tensor | None, src: int) -> torch.Tensor | None:
        """Rank `src`'s tensor (or None) on every rank, bitwise. The other ranks pass anything
        (None): the shape and dtype travel in a small header first, so they need not know them
        (a kept-indices tensor of unknown length, a bias the method may or may not return).
        `src` gets its own tensor back; the others get it on the backend's device."""
        if not self.distributed:
            return tensor
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.device)
        if self.rank == src and tensor is not None:
            if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
                raise ValueError(f"cannot broadcast a {tensor.dtype} tensor of {tensor.dim()} dimensions")
            header[:3] = torch.tensor([1, _DTYPES.index(tensor.dtype), tensor.dim()])
            header[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        self._broadcast_into(header, src)
        present, dtype_index, ndim, *sizes = header.tolist()
        if not present:
            return None
        if self.rank == src:
            payload = tensor.to(self.device).contiguous()
        else:
            payload = torch.empty(sizes[:ndim], dtype=_DTYPES[dtype_index], device=self.device)
        # Not every backend sends bool; its bytes are those of uint8.
        self._broadcast_into(payload.view(torch.uint8) if payload.dtype == torch.bool else payload, src)
        return tensor if self.rank == src else payload

    def broadcast_object(self, obj, src: int):
        """Rank `src`'s picklable object on every rank (plans, lists of kept units, warnings).
        Tensors inside are pickled: send large tensors with `broadcast_tensor`."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src, device=self.device)
        self.traffic.add("broadcast", _pickled_size(box[0]))
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable object, in rank order, on every rank (e.g. each rank's share of
        search candidates with its scores)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        self.traffic.add("all_gather", sum(map(_pickled_size, gathered)))
        return gathered

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor concatenated along dim 0 in rank order, on every rank; the ranks'
        lengths may differ, the other dimensions must not. With windows partitioned in order,
        per-token values (e.g. residual norms for a median) come out exactly as one process
        would list them. Returned on the backend's device."""
        if not self.distributed:
            return tensor
        work = tensor.to(self.device).contiguous()
        lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([work.shape[0]], dtype=torch.int64, device=self.device))
        lengths = [int(length.item()) for length in lengths]
        padded = torch.zeros((max(lengths), *work.shape[1:]), dtype=work.dtype, device=self.device)
        padded[:work.shape[0]] = work
        pieces = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(pieces, padded)
        self.traffic.add("all_gather", self.size * (8 + _nbytes(padded)))
        return torch.cat([piece[:length] for piece, length in zip(pieces, lengths, strict=True)])

    def assert_identical(self, value, what: str) -> None:
        """Stop with one clear error, on every rank, if the ranks hold different `value`s
        (tensors, or lists/dicts of them, or picklable objects), compared by a SHA-256 digest.
        For decisions every rank computes itself from identical sums: a different CPU or GPU
        could round differently, and ranks that disagree on a block's shape would otherwise hang."""
        if not self.distributed:
            return
        digests = self.all_gather_object(_digest(value))
        if len(set(digests)) > 1:
            differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
            raise SecateurError(f"the {self.size} processes disagree on {what} (ranks {differing} differ from "
                                "rank 0): run every rank on the same hardware, software and thread count")

    # --- the two exchanges everything above is made of ------------------------------------------
    def _sum_in_rank_order(self, tensor: torch.Tensor, owner: int) -> None:
        """On `owner`, replace `tensor` by Σ over ranks added in rank order, ((t₀ + t₁) + t₂) + …;
        every other rank sends its `tensor` and leaves it unchanged."""
        if not tensor.is_contiguous():
            raise ValueError("collectives need contiguous tensors")
        work = tensor if tensor.device == self.device else tensor.to(self.device)
        nbytes = _nbytes(work)
        if self.rank != owner:
            dist.send(work, owner)
            self.traffic.add("reduce", nbytes)
            return
        incoming = torch.empty_like(work)
        if owner <= 1:
            # t₁ + t₀ == t₀ + t₁ bitwise (float addition is commutative): rank 0 or 1 can start
            # from its own buffer and still add in rank order.
            for source in (rank for rank in range(self.size) if rank != owner):
                dist.recv(incoming, source)
                work.add_(incoming)
        else:
            total = torch.empty_like(work)
            dist.recv(total, 0)
            for source in range(1, self.size):
                if source == owner:
                    total.add_(work)
                else:
                    dist.recv(incoming, source)
                    total.add_(incoming)
            work.copy_(total)
        self.traffic.add("reduce", (self.size - 1) * nbytes)
        if work is not tensor:
            tensor.copy_(work)

    def _broadcast_into(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s (same shape and dtype everywhere)."""
        work = tensor if tensor.device == self.device else tensor.to(self.device)
        dist.broadcast(work, src)
        self.traffic.add("broadcast", _nbytes(work))
        if work is not tensor:
            tensor.copy_(work)


def _shared_groups(stats: Mapping[str, LinearStats]) -> list[tuple[LinearStats, list[str]]]:
    """Each distinct statistics object with the layers that use it, in sorted layer-name order
    (the same on every rank whatever order the dict was built in)."""
    groups: dict[int, tuple[LinearStats, list[str]]] = {}
    for name in sorted(stats):
        groups.setdefault(id(stats[name]), (stats[name], []))[1].append(name)
    return list(groups.values())


def _env_int(env: Mapping[str, str], name: str, minimum: int, maximum: int | None = None) -> int:
    text = env.get(name, "")
    accepted = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    try:
        value = int(text)
    except ValueError:
        raise SecateurError(f"{name}={text!r} is not {accepted} (torchrun sets it)") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise SecateurError(f"{name}={text!r} is not {accepted} (torchrun sets it)")
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _pickled_size(obj) -> int:
    """What torch's object collectives send for `obj`: its pickle and an 8-byte length."""
    return len(pickle.dumps(obj)) + 8


def _digest(value) -> str:
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()


def _feed(hasher, value) -> None:
    if isinstance(value, torch.Tensor):
        hasher.update(repr((value.dtype, tuple(value.shape))).encode())
        hasher.update(value.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    elif isinstance(value, list | tuple):
        hasher.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, dict):
        hasher.update(f"dict{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(hasher, key)
            _feed(hasher, value[key])
    else:
        hasher.update(pickle.dumps(value))
