"""What defines one MLP classifier run before it is trained: hyperparameter ranges and draws, the
learning-rate schedule, the run plan (seeds, saved steps, data order).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from learned_opt.recipes import GPT_RECIPE, SGD, SupervisedRanges
from learned_opt.seeding import checkpoint_steps, stream
from learned_opt.tasks import Task

from ..seeding import log_uniform, seeded_init


HParamRanges = SupervisedRanges  # the corpus's name for them


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
    u_scale = rng.random()  # drawn last: ranges without a scale draw every other value as before
    lo, hi = ranges.sgd_lr if optimizer == SGD else ranges.adam_lr
    hp = {
        "optimizer": optimizer,
        "lr": log_uniform(lo, hi, u_lr),
        "momentum": momentum,
        "weight_decay": 0.0 if no_wd else log_uniform(*ranges.weight_decay, u_wd),
        "batch_size": int(batch_size),
        "epochs": int(n_epochs),
    }
    if tuple(ranges.init_scale) != (1.0, 1.0):
        hp["init_scale"] = log_uniform(*ranges.init_scale, u_scale)
    if gpt_recipe:
        hp.update(GPT_RECIPE)
    if epochs is not None:
        hp["epochs"] = int(epochs)
    hp.update(schedule="cosine-per-epoch", adam_beta2=ranges.adam_beta2, adam_eps=ranges.adam_eps)
    return hp


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
        """The initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``, times
        the run's ``init_scale`` where its ranges draw one."""
        return seeded_init(task, self.seed) * self.hparams.get("init_scale", 1.0)


def plan_runs(
    run_ids: Sequence[int], *, base_seed: int, num_examples: int, ranges: HParamRanges = HParamRanges(),
    gpt_recipe: bool = False, epochs: int | None = None, num_checkpoints: int = 200,
) -> list[RunPlan]:
    return [
        RunPlan(r, base_seed + r, sample_hparams(base_seed + r, ranges, gpt_recipe=gpt_recipe, epochs=epochs),
                num_examples, num_checkpoints)
        for r in run_ids
    ]
