"""The processes of a run: one, or several started by ``torchrun`` (torch.distributed).

``torchrun --nproc_per_node N -m bnnops.train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`processes` reads them, and
:func:`process_group` joins the group (gloo on the CPU, nccl on CUDA) for the run.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Processes", "all_reduce_sum", "broadcast_buffers", "process_group", "processes", "resolve_device"]


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` in [0, ``world_size``), ``local_rank`` on its
    machine (the GPU it takes). Rank 0 writes the run's files and prints."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def processes() -> Processes:
    """This process's place, from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (a single
    process without them).

    Raises:
        ValueError for values that are not integers, or a rank outside [0, WORLD_SIZE).
    """
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {e}") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected 0 <= RANK < WORLD_SIZE")
    return Processes(rank, world, local)


def resolve_device(name: str, procs: Processes) -> torch.device:
    """The device ``--device name`` means for this process: ``cuda`` in a multi-process run is
    ``cuda:<LOCAL_RANK>``.

    Raises:
        ValueError for a name torch does not parse, CUDA without a visible GPU, or a GPU index
        beyond those visible.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device torch knows ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: torch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu"
            )
        if device.index is None and procs.world_size > 1:
            device = torch.device("cuda", procs.local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: process {procs.rank} needs GPU {device.index}, but torch sees "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    elif device.type != "cpu" and procs.world_size > 1:
        raise ValueError(f"--device {name}: a multi-process run trains on cpu (gloo) or cuda (nccl)")
    return device


@contextmanager
def process_group(procs: Processes, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the body (gloo on the CPU, nccl on CUDA) unless there
    is one process or the group already exists; leave it afterwards if it was joined here."""
    joined = procs.world_size > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm running statistics: each process updates
    its own from its part of the batch)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def all_reduce_sum(values: list[float | int | torch.Tensor], device: torch.device) -> list[float]:
    """The sums over the processes of each value (as float64: counts stay exact below 2**53)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return t.tolist()
