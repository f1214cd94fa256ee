"""What the corpus builders draw besides :mod:`learned_opt.seeding`'s streams: seeded inits and
log-uniform draws."""

from __future__ import annotations

import math

import torch

from learned_opt.tasks import Task


def seeded_init(task: Task, seed: int) -> torch.Tensor:
    """A run's initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``,
    without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.layout().flatten_module(task.build_model())


def log_uniform(lo: float, hi: float, u: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
