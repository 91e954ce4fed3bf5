"""Data parallelism with ``torch.distributed`` (launched by ``torchrun``): process-group setup,
the device of each rank, and the few reductions the trainer and the metrics need.

Nothing here starts a process group by itself except :func:`init_from_env`, which a script
calls once under ``torchrun`` (it reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and picks NCCL
for CUDA and gloo for CPU). Every other function works unchanged in a single process: there
``rank() == 0``, ``world_size() == 1`` and the reductions return their input.

A run with ``world_size() == 1`` (plain ``python`` or ``torchrun --nproc-per-node 1``) takes
exactly the single-process code paths, so its results are bitwise those of a plain run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "init_from_env",
    "is_distributed",
    "rank",
    "rank_slice",
    "resolve_device",
    "shutdown",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine, from ``torchrun``'s ``LOCAL_RANK`` (0 when not set)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device a job runs on; never CUDA unless asked for.

    ``None`` or ``"cpu"``: CPU. ``"auto"``: CUDA when available, else CPU. Under a process group,
    a bare ``"cuda"`` (or ``"auto"`` resolving to it) means ``cuda:LOCAL_RANK``, one GPU per rank;
    an explicit ``"cuda:N"`` is kept as given.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was requested but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank() if is_distributed() else 0)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was requested but MPS is not available; use 'cpu'")
    return dev


def init_from_env(device: str | torch.device | None = None, backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment; a no-op without one.

    Returns True when a process group of more than one rank is active afterwards. The backend
    defaults to NCCL when ``device`` is CUDA and gloo otherwise; for CUDA the rank's GPU
    (``cuda:LOCAL_RANK``) becomes the current device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("torch was built without torch.distributed; run in one process")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    wants_cuda = dev is not None and torch.device(dev).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if wants_cuda else "gloo"))
    if wants_cuda:
        torch.cuda.set_device(local_rank())
    return is_distributed()


def shutdown() -> None:
    """Leave the process group (at the end of a torchrun script; a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()  # free collective work still referenced from cycles (e.g. of a DDP module)
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def _reduce(t: Tensor, op: Any) -> Tensor:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces GPU tensors only
        out = t.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
        dist.all_reduce(out, op=op)
        return out.to(t.device)
    out = t.clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_max(t: Tensor) -> Tensor:
    """Elementwise maximum of ``t`` over ranks (``t`` itself in one process)."""
    return _reduce(t, dist.ReduceOp.MAX) if is_distributed() else t


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process); for
    small picklable records of our own making (skip logs, top-k tables), never user data."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself in one process).

    gloo and NCCL both reduce float64 and int64, so counters and float64 accumulators keep
    their precision.
    """
    return _reduce(t, dist.ReduceOp.SUM) if is_distributed() else t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable Python objects of our own making only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_slice(n: int, *, rank_: int | None = None, world: int | None = None) -> slice:
    """The contiguous part of ``range(n)`` this rank owns; parts differ by at most one item and
    concatenate, in rank order, to ``range(n)``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))
