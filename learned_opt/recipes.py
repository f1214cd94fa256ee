"""The one table of training recipes: the baselines every comparison uses, and the ranges a
supervised corpus draws its runs' hyperparameters from.

* :data:`GPT_RECIPE` — G.pt's SGD recipe (Peebles et al. 2022): Nesterov momentum 0.9, lr 0.1,
  weight decay 5e-4, batch 128, cosine annealing stepped per epoch over 25 epochs;
* :data:`ADAM_BASELINE` — Adam, lr 1e-3, batch 128, constant learning rate;
* :data:`LOPT_BASELINE` — the learned optimizer (:class:`~learned_opt.LearnedOptimizer`), lr 1.0
  (the step size it was meta-trained with), batch 128, its shipped weights;
* :class:`SupervisedRanges` — the corpus's per-run draws (the table in :mod:`pretrain.corpus`);
* :data:`PPO_BASELINE` and :data:`PPO_STEPS` — PPO's default hyperparameters (the control baseline
  of ``eval`` and ``demo``, and the fixed ones of a control corpus) and its step structure;
* :class:`PPORanges` — a control corpus's per-run draws (the table in
  :mod:`pretrain.corpus.ppo_family`); a :class:`~learned_opt.tasks.ControlTask` may set its own as
  ``corpus_ranges``.

Hyperparameter dicts use the corpus's keys (``optimizer``, ``lr``, ``momentum`` — SGD's momentum or
Adam's beta1 —, ``weight_decay``, ``batch_size``, ``epochs``, ``schedule``, ``adam_beta2``,
``adam_eps``; the learned optimizer's ``weights``: None for the shipped ones, a registry name, a
manifest path or a :class:`~learned_opt.lopt.LoadedRule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SGD, ADAM = "sgd-nesterov", "adam"
OPTIMIZERS = (SGD, ADAM)  # what a supervised corpus draws from
LOPT = "learned"  # LearnedOptimizer: a baseline only, never drawn by a corpus

ADAM_LR = 1e-3
BATCH_SIZE = 128
# A per-epoch cosine over this many nominal epochs stays 1 to within 1e-15 over any run evaluated:
# a constant learning rate for trainers that always apply the cosine.
CONSTANT_LR_EPOCHS = 10**9

GPT_RECIPE = {"optimizer": SGD, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": BATCH_SIZE, "epochs": 25}
SGD_BASELINE = {**GPT_RECIPE, "schedule": "cosine-per-epoch", "adam_beta2": 0.999, "adam_eps": 1e-8}
ADAM_BASELINE = {"optimizer": ADAM, "lr": ADAM_LR, "momentum": 0.9, "weight_decay": 0.0, "batch_size": BATCH_SIZE,
                 "epochs": CONSTANT_LR_EPOCHS, "schedule": "constant", "adam_beta2": 0.999, "adam_eps": 1e-8}
LOPT_BASELINE = {"optimizer": LOPT, "lr": 1.0, "batch_size": BATCH_SIZE, "schedule": "constant", "weights": None}


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """G.pt's schedule: cosine annealing to 0 over ``epochs``, stepped once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass(frozen=True)
class SupervisedRanges:
    """Where each supervised corpus run's hyperparameters are drawn from (one draw per run)."""

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
    init_scale: tuple[float, float] = (1.0, 1.0)  # log-uniform factor on every parameter of the task's init

    def __post_init__(self) -> None:
        unknown = set(self.optimizers) - set(OPTIMIZERS)
        if unknown or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of {OPTIMIZERS}, got {self.optimizers}")
        for name in ("sgd_lr", "adam_lr", "weight_decay", "init_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < math.inf:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0 <= self.momentum[0] <= self.momentum[1] < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or not self.epochs or min(self.epochs) < 1:
            raise ValueError("batch_sizes and epochs need at least one positive value each")


# PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), trained by learned_opt.baselines.ppo.
PPO_BASELINE = {"lr": 3e-4, "gamma": 0.99, "gae_lambda": 0.95, "clip": 0.2, "entropy_coef": 0.0, "value_coef": 0.5,
                "max_grad_norm": 0.5}
PPO_ADAM_EPS = 1e-5  # Adam's eps for the policy and the value network
# What runs trained together share: sub-environments per run, steps per sub-environment between updates,
# passes over each rollout, minibatches per pass, and the value network's hidden width (two tanh layers).
PPO_STEPS = {"envs": 8, "horizon": 128, "epochs": 4, "minibatches": 4, "value_hidden": 64}


@dataclass(frozen=True)
class PPORanges:
    """Where each control corpus run's PPO hyperparameters are drawn from (one draw per run)."""

    lr: tuple[float, float] = (1e-4, 3e-3)  # log-uniform
    gamma: tuple[float, float] = (0.97, 0.999)  # uniform
    gae_lambda: tuple[float, float] = (0.9, 0.99)  # uniform
    clip: tuple[float, float] = (0.1, 0.3)  # uniform
    entropy_coef: tuple[float, float] = (1e-4, 1e-2)  # log-uniform, when not 0
    p_no_entropy: float = 0.5  # probability of entropy_coef 0
    env_steps: tuple[int, ...] = (25_000, 50_000, 100_000)
    value_coef: float = PPO_BASELINE["value_coef"]
    max_grad_norm: float = PPO_BASELINE["max_grad_norm"]

    def __post_init__(self) -> None:
        for name in ("lr", "entropy_coef"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < math.inf:
                raise ValueError(f"{name} must satisfy 0 < low <= high, both finite, got {(lo, hi)}")
        for name in ("gamma", "gae_lambda"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {(lo, hi)}")
        if not 0 < self.clip[0] <= self.clip[1]:
            raise ValueError(f"clip must satisfy 0 < low <= high, got {self.clip}")
        if not self.env_steps or min(self.env_steps) < 1:
            raise ValueError("env_steps needs at least one positive value")
