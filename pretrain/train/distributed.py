"""Ranks and devices under ``torchrun``: setup, means over ranks, rank 0's file work, and per-rank RNG states."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from learned_opt.collectives import all_ranks
from learned_opt.errors import ConfigError, TrainingError
from learned_opt.options import parse_device

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # whether this module initialised the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job when there is one (gloo on CPU, NCCL on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    elif dev.type == "cpu" and dist.get_backend() == "nccl":
        raise ConfigError("the process group is NCCL's, which cannot reduce the CPU tensors of this job: "
                          "initialise it with backend 'gloo' (or 'cpu:gloo,cuda:nccl') before calling")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def on_main(info: DistInfo, work: Callable[[], T], what: str) -> T | None:
    """``work()`` on rank 0 only (its result there, None elsewhere); if it raises, every rank raises: rank 0
    its error, the others a :class:`TrainingError` that points to it. A failure on rank 0 alone (a held
    lock, a full disk) would otherwise leave the other ranks waiting in their next collective."""
    error, result = None, None
    if info.is_main:
        try:
            result = work()
        except Exception as exc:  # re-raised below, on this rank and (as a TrainingError) on every other
            error = exc
    if not all_ranks(error is None, info.device):
        if error is not None:
            raise error
        raise TrainingError(f"{what} failed on rank 0; its error says why")
    return result


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks, on the CPU (reduced on the device: NCCL needs CUDA tensors)."""
    if info.world == 1:
        return value.cpu()
    on_device = value.to(info.device)
    dist.all_reduce(on_device)
    return on_device.cpu() / info.world


def rng_states(info: DistInfo) -> dict:
    """The global torch RNG state of every rank (dropout draws from it)."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    if info.world == 1:
        return {"ranks": [mine]}
    gathered: list = [None] * info.world
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def restore_rng(states: dict, info: DistInfo, seed: int) -> None:
    ranks = states.get("ranks", [])
    if len(ranks) == info.world:
        mine = ranks[info.rank]
        torch.set_rng_state(mine["cpu"])
        if info.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], info.device)
    else:  # another world size: a fresh, still deterministic stream per rank
        torch.manual_seed(seed + 1000 * (info.rank + 1))
