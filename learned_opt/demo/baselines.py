"""The demo's baselines: a plain ``nn.Module`` + ``torch.optim`` loop with Adam or G.pt's SGD recipe."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..recipes import ADAM_LR, BATCH_SIZE, GPT_RECIPE
from ..tasks import Task


# G.pt's SGD recipe (Peebles et al. 2022): Nesterov 0.9, lr 0.1, wd 5e-4, cosine per epoch over 25 epochs
SGD_RECIPE = {k: GPT_RECIPE[k] for k in ("lr", "momentum", "weight_decay", "epochs")}
BASELINES = ("adam", "sgd")


@dataclass
class BaselineCurve:
    """Test metrics of one network trained with a plain torch.optim loop, at ``steps``."""

    optimizer: str  # "adam" or "sgd"
    steps: list[int]  # when the metrics were measured (0 = the init)
    test_loss: list[float]
    test_error: list[float]  # percent
    seconds_per_step: float  # training only (evaluation excluded)


def make_optimizer(name: str, params, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, per-epoch scheduler or None)`` of a baseline: ``"adam"`` or ``"sgd"`` (G.pt's)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=ADAM_LR), None
    if name == "sgd":
        r = SGD_RECIPE
        opt = torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], nesterov=True, weight_decay=r["weight_decay"])
        cosine = lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / r["epochs"]))  # noqa: E731
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    raise ConfigError(f"unknown baseline optimizer {name!r}; choose one of {', '.join(BASELINES)}")


def train_baseline(
    task: Task, init: torch.Tensor, data, optimizer: str, steps: int, eval_steps: Sequence[int] = (), *, seed: int = 0,
) -> BaselineCurve:
    """Train one network from the flat ``init`` [P] for ``steps`` steps with ``optimizer``.

    Minibatches of 128 are drawn from a fresh permutation of the training set each epoch (a
    ``torch.Generator`` seeded with ``seed``; the global RNG is not used). The test metrics are
    measured at every step in ``eval_steps`` (0 is the init); the timing excludes evaluation.
    """
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    layout.load_into(init.detach().float(), list(model.parameters()))
    x, y = data.train_x, data.train_y
    n = x.shape[0]
    spe = math.ceil(n / BATCH_SIZE)
    opt, sched = make_optimizer(optimizer, model.parameters(), spe)
    wanted = sorted({int(s) for s in eval_steps if 0 <= int(s) <= steps})
    curve = BaselineCurve(optimizer, [], [], [], float("nan"))

    def measure(t: int) -> None:
        m = task.evaluate(layout.flatten_module(model)[None], data, ["test_loss", "test_error"])
        curve.steps.append(t)
        curve.test_loss.append(float(m["test_loss"][0]))
        curve.test_error.append(float(m["test_error"][0]))

    if wanted and wanted[0] == 0:
        measure(0)
    order = torch.Generator().manual_seed(seed)
    train_seconds, t = 0.0, 0
    while t < steps:
        for idx in torch.randperm(n, generator=order).split(BATCH_SIZE):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            train_seconds += time.perf_counter() - start
            t += 1
            if t in wanted:
                measure(t)
            if t >= steps:
                break
        if sched is not None:
            sched.step()
    curve.seconds_per_step = train_seconds / steps if steps else float("nan")
    return curve


def first_step_at_or_below(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first of ``steps`` whose value is ``<= target`` (None if never, or if target is NaN)."""
    for s, v in zip(steps, values):
        if v <= target:
            return int(s)
    return None
