"""Data-parallel training across processes started by ``torchrun`` (one per GPU, any number of nodes).

``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; without them training runs in one process.
Backend: NCCL on CUDA, gloo on the CPU (how the tests run two processes on one machine).
"""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that validates, writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The process's place in a ``torchrun`` job, or a one-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group; each process of a CUDA job takes the GPU of its local rank."""
    if not world.active:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise InputError(f"Local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                             "start at most one process per GPU (torchrun --nproc_per_node).")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    global _waits
    if not dist.is_initialized():  # the default timeout for training's collectives: a lost peer is noticed soon
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # the main process prepares the data and validates while the others wait: far longer than that
    _waits = dist.new_group(backend="gloo", timeout=WAIT_FOR_MAIN)
    return device


WAIT_FOR_MAIN = timedelta(hours=3)
_waits = None  # the process group of barriers, with the WAIT_FOR_MAIN timeout


def stop(world: World) -> None:
    global _waits
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
    _waits = None


def barrier(world: World) -> None:
    """Wait until every process gets here (at most WAIT_FOR_MAIN: the main process's preparation or validation)."""
    if world.active:
        dist.barrier(group=_waits)


def _tensor(values, dtype) -> torch.Tensor:
    """A tensor where the backend can reduce it (NCCL: the current GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor(values, dtype=dtype, device=device)


def mean(world: World, value: float) -> float:
    """Mean of a number over all processes."""
    if not world.active:
        return value
    t = _tensor([value], torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world.size
