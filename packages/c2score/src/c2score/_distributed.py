"""The few ``torch.distributed`` operations a C2 pass split across ``torchrun`` ranks needs.

Kept inside this package (not shared with the other FaCT packages) so that ``fact-c2score``
installs and works alone. Without an initialised process group of more than one rank every
function is the single-process identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(n: int) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
    r, w = rank_and_world()
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; ``t`` itself in one process)."""
    if rank_and_world()[1] == 1:
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces GPU tensors only
        out = t.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (small bookkeeping records of our own only)."""
    if rank_and_world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()
