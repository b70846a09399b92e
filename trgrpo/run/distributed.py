"""The process group of a multi-process run under `torchrun`, and the few collectives the loop needs.

One process per device: `init` joins the group torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with `nccl` on CUDA and `gloo` on CPU. Every
helper here also works without a process group (a single-process run), where it returns its input
unchanged, so callers never branch on whether the run is distributed. What this module does not do:
shard models (learner/fsdp.py) or decide what each rank computes (the loop and the learner do).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# Rank 0 evaluates and writes checkpoints alone while the others wait at their next collective; a
# long evaluation must not trip the backend's watchdog (NCCL's default is 10 minutes).
TIMEOUT = datetime.timedelta(minutes=60)
# Whether `init` joined the default group, and whether it created it. A group vLLM creates for its
# own engine in a one-process run is neither: the run is not distributed and the group is vLLM's.
_joined = _created = False


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    global _joined, _created
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        _created = True
    _joined = True
    return device


def destroy() -> None:
    """Leave the process group `init` joined; a group someone else created (vLLM's) is theirs."""
    global _joined, _created
    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _joined = _created = False


def active() -> bool:
    """Whether this process joined a process group with `init` (the run is distributed, possibly with
    one rank). A group vLLM creates for its own engine does not count."""
    return _joined and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that owns the run directory (logs, run.json, checkpoint metadata)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def share(n: int) -> slice:
    """This rank's contiguous slice of n items (n divisible by the world size, checked in config)."""
    size = n // world_size()
    return slice(rank() * size, (rank() + 1) * size)


def _device() -> torch.device:
    """Where collectives' tensors live: the current CUDA device under nccl, CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Element-wise sum | max | min of a list of floats over ranks (float64, so sums of counts stay exact)."""
    if not active():
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor of the same shape on every rank (a new tensor on t's device)."""
    if not active():
        return t
    out = t.detach().to(_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank: a decision all ranks then take together."""
    return all_reduce([1.0 if flag else 0.0], op="min")[0] == 1.0


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of a 1-D tensor whose length may differ between ranks."""
    if not active():
        return t
    local = t.detach().to(_device())
    size = torch.tensor([local.numel()], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return t
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)]).to(t.device)


def gather_objects(items: list[T]) -> list[T]:
    """Every rank's list, concatenated in rank order (pickled; for records, not tensors)."""
    if not active():
        return items
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def broadcast(value: T) -> T:
    """Rank 0's value on every rank (pickled)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]
