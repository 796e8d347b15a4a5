"""Training on more than one process (``torchrun``): DistributedDataParallel.

Under ``torchrun --nproc_per_node N`` (one machine) or with ``--nnodes``/``--node_rank``
and a rendezvous address (several), every process runs the same lowbit command. The
process group starts on first use, with gloo (lowbit fine-tunes on the CPU). Each training
step splits its batch between the processes and DDP averages their gradients, so N
processes take the same steps as one; decisions that depend on timing (auto's candidate
search) are taken by process 0 and sent to the others, and only process 0 verifies and
writes files.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside ``torchrun``."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():  # lowbit trains on the CPU: gloo (NCCL takes GPU tensors only)
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True in the process that verifies and writes (rank 0), and outside ``torchrun``."""
    return world()[0] == 0


def from_main(value: T) -> T:
    """Process 0's ``value`` in every process (unchanged outside ``torchrun``)."""
    rank, size = world()
    if size == 1:
        return value
    import torch.distributed as dist

    box: list[Any] = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(value: float) -> float:
    """The sum of ``value`` over every process."""
    rank, size = world()
    if size == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def shard(idx: Any, rank: int, size: int) -> Any:
    """This process's part of one step's sample indices: every ``size``-th, after
    repeating the first few so that each process gets as many (DDP averages equal
    shares)."""
    import torch

    if size == 1:
        return idx
    padded = idx[torch.arange(-(-len(idx) // size) * size) % len(idx)]
    return padded[rank::size]


def wrap(module: Any) -> Any:
    """``module`` in DistributedDataParallel when there is more than one process."""
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)
