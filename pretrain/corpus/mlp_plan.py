"""What defines one MLP classifier run before it is trained: hyperparameter ranges and draws, the
learning-rate schedule, the run plan (seeds, saved steps, data order).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from learned_opt.tasks import Task

from ..seeding import checkpoint_steps, log_uniform, seeded_init, stream


SGD, ADAM = "sgd-nesterov", "adam"
OPTIMIZERS = (SGD, ADAM)


@dataclass(frozen=True)
class HParamRanges:
    """Where each run's hyperparameters are drawn from (see the table in :mod:`pretrain.corpus`)."""

    optimizers: tuple[str, ...] = OPTIMIZERS  # drawn uniformly
    sgd_lr: tuple[float, float] = (0.01, 0.3)  # log-uniform; contains G.pt's 0.1
    adam_lr: tuple[float, float] = (3e-4, 1e-2)  # log-uniform
    momentum: tuple[float, float] = (0.8, 0.95)  # uniform; SGD momentum or Adam beta1
    weight_decay: tuple[float, float] = (1e-5, 1e-3)  # log-uniform; contains G.pt's 5e-4
    p_no_weight_decay: float = 0.1  # probability of weight decay 0
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    epochs: tuple[int, ...] = (5, 10, 15, 20, 25)
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        unknown = set(self.optimizers) - set(OPTIMIZERS)
        if unknown or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of {OPTIMIZERS}, got {self.optimizers}")
        for name in ("sgd_lr", "adam_lr", "weight_decay"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0 <= self.momentum[0] <= self.momentum[1] < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or not self.epochs or min(self.epochs) < 1:
            raise ValueError("batch_sizes and epochs need at least one positive value each")


GPT_RECIPE = {"optimizer": SGD, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "epochs": 25}


def sample_hparams(
    seed: int, ranges: HParamRanges = HParamRanges(), *, gpt_recipe: bool = False, epochs: int | None = None
) -> dict:
    """The hyperparameters of the run with this seed (same seed, same result)."""
    rng = random.Random(seed)
    # every value is drawn in a fixed order, so one setting never shifts the others
    optimizer = rng.choice(ranges.optimizers)
    u_lr, momentum = rng.random(), rng.uniform(*ranges.momentum)
    no_wd, u_wd = rng.random() < ranges.p_no_weight_decay, rng.random()
    batch_size, n_epochs = rng.choice(ranges.batch_sizes), rng.choice(ranges.epochs)
    lo, hi = ranges.sgd_lr if optimizer == SGD else ranges.adam_lr
    hp = {
        "optimizer": optimizer,
        "lr": log_uniform(lo, hi, u_lr),
        "momentum": momentum,
        "weight_decay": 0.0 if no_wd else log_uniform(*ranges.weight_decay, u_wd),
        "batch_size": int(batch_size),
        "epochs": int(n_epochs),
    }
    if gpt_recipe:
        hp.update(GPT_RECIPE)
    if epochs is not None:
        hp["epochs"] = int(epochs)
    hp.update(schedule="cosine-per-epoch", adam_beta2=ranges.adam_beta2, adam_eps=ranges.adam_eps)
    return hp


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """G.pt's schedule: cosine annealing to 0 over ``epochs``, stepped once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass
class RunPlan:
    """Everything that defines one run before it is trained."""

    run_id: int
    seed: int
    hparams: dict
    num_examples: int  # training examples per epoch
    num_checkpoints: int = 200

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.hparams["batch_size"])  # last batch may be partial

    @property
    def total_steps(self) -> int:
        return self.hparams["epochs"] * self.steps_per_epoch

    def checkpoint_steps(self) -> torch.Tensor:
        return checkpoint_steps(self.total_steps, self.num_checkpoints, stream(self.seed, 1))

    def data_order(self) -> torch.Generator:
        """The generator whose successive ``randperm(num_examples)`` calls give each epoch's order."""
        return stream(self.seed, 2)

    def init(self, task: Task) -> torch.Tensor:
        """The initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``."""
        return seeded_init(task, self.seed)


def plan_runs(
    run_ids: Sequence[int], *, base_seed: int, num_examples: int, ranges: HParamRanges = HParamRanges(),
    gpt_recipe: bool = False, epochs: int | None = None, num_checkpoints: int = 200,
) -> list[RunPlan]:
    return [
        RunPlan(r, base_seed + r, sample_hparams(base_seed + r, ranges, gpt_recipe=gpt_recipe, epochs=epochs),
                num_examples, num_checkpoints)
        for r in run_ids
    ]
