"""Processes: torchrun's environment, the process group, the few collectives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins
the default process group (NCCL on CUDA, gloo on CPU) and each rank runs on
``cuda:LOCAL_RANK`` or the CPU. A single process needs no process group and
every helper here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Ranks:
    """This process's place: rank, world size, local rank and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes logs and checkpoints (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise SystemExit(f"the environment variable {name}={value!r} is not an integer")


def setup(device: Optional[str], backend: Optional[str] = None) -> Ranks:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device and, for
    more than one process, join the process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: this PyTorch sees no CUDA device")
        if dev.index is None:  # each rank takes its own GPU
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    ranks = Ranks(rank, world, local_rank, dev)
    if world > 1:
        ranks.backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(ranks.backend,
                                    device_id=dev if ranks.backend == "nccl" else None)
    return ranks


def teardown(ranks: Ranks) -> None:
    """Leave the process group (if this process joined one)."""
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (gloo reduces on the CPU)."""
    if ranks.distributed:
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any, ranks: Ranks) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    out: list = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def broadcast_buffers(model: nn.Module, ranks: Ranks) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at each forward, so after a step each rank holds rank
    0's statistics updated by its own last batch; evaluation and checkpoints
    use rank 0's on every rank.
    """
    if ranks.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def parameters_identical(model: nn.Module, ranks: Ranks) -> bool:
    """Whether every rank holds exactly rank 0's parameters (bit for bit)."""
    if not ranks.distributed:
        return True
    same = True
    with torch.no_grad():
        for p in model.parameters():
            theirs = p.detach().clone()
            dist.broadcast(theirs, src=0)
            same = same and torch.equal(theirs, p.detach())
    flag = torch.tensor([0 if same else 1], device=ranks.device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
