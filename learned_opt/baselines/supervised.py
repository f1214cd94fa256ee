"""The one plain training loop of a supervised task: ``nn.Module`` + ``torch.optim`` with a recipe.

:func:`train_baseline` trains one network of any :class:`~learned_opt.tasks.SupervisedTask` from a
flat init with a recipe of :mod:`learned_opt.recipes` (Adam, or G.pt's SGD recipe), measuring the
task's test metrics at given steps. The demo's baselines, ``learned-opt bench`` (which drives a
:class:`~learned_opt.GptOptimizer` through it with ``wrap``) and the corpus's reference run use it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, GenerationError
from ..recipes import ADAM, ADAM_BASELINE, SGD, SGD_BASELINE, cosine_lr
from ..tasks import Task

BASELINES = {"adam": ADAM_BASELINE, "sgd": SGD_BASELINE}  # the recipes named on the command line
TEST_METRICS = ("test_loss", "test_error")

Recipe = Mapping[str, Any]  # hyperparameters under learned_opt.recipes' keys
BaseFactory = Callable[[Any], torch.optim.Optimizer]  # parameters -> the recipe's optimizer


@dataclass
class BaselineCurve:
    """Test metrics of one network trained with a plain loop, at ``steps``."""

    optimizer: str  # the recipe's name ("adam", "sgd") or its optimizer
    steps: list[int]  # when the metrics were measured (0 = the init)
    test_loss: list[float]  # NaN at steps after a divergence
    test_error: list[float]  # percent
    seconds_per_step: float  # training only (evaluation excluded)
    wall_s: list[float] = field(default_factory=list)  # cumulative training seconds at each of ``steps``
    diverged_at: int | None = None  # a GptOptimizer's metric closure returned NaN/Inf after this step


def recipe_of(recipe: str | Recipe) -> Recipe:
    """A recipe by name (``"adam"``, ``"sgd"``) or as a hyperparameter dict, checked."""
    if isinstance(recipe, str):
        if recipe not in BASELINES:
            raise ConfigError(f"unknown baseline optimizer {recipe!r}; choose one of {', '.join(BASELINES)}")
        return BASELINES[recipe]
    missing = {"optimizer", "lr", "batch_size"} - set(recipe)
    if missing:
        raise ConfigError(f"a training recipe needs the keys optimizer, lr and batch_size; missing {sorted(missing)}")
    if recipe["optimizer"] not in (SGD, ADAM):
        raise ConfigError(f"unknown optimizer {recipe['optimizer']!r} in the recipe; choose {SGD} or {ADAM}")
    return recipe


def make_optimizer(recipe: str | Recipe, params) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, per-epoch scheduler or None)`` of a recipe (:mod:`learned_opt.recipes`).

    SGD is Nesterov SGD; Adam's ``momentum`` is its beta1. A ``"cosine-per-epoch"`` schedule (the
    default where a recipe names none, as the corpus's do) anneals to 0 over ``epochs``, stepped once
    per epoch; ``"constant"`` has no scheduler.
    """
    r = recipe_of(recipe)
    wd = r.get("weight_decay", 0.0)
    if r["optimizer"] == SGD:
        opt = torch.optim.SGD(params, lr=r["lr"], momentum=r.get("momentum", 0.9), nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.Adam(params, lr=r["lr"], betas=(r.get("momentum", 0.9), r.get("adam_beta2", 0.999)),
                               eps=r.get("adam_eps", 1e-8), weight_decay=wd)
    if r.get("schedule", "cosine-per-epoch") == "constant":
        return opt, None
    epochs = r["epochs"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cosine_lr(1.0, e, epochs))


def train_baseline(
    task: Task,
    init: torch.Tensor,
    data,
    recipe: str | Recipe,
    steps: int,
    eval_steps: Sequence[int] = (),
    *,
    seed: int | torch.Generator = 0,
    wrap: Callable[[nn.Module, BaseFactory], torch.optim.Optimizer] | None = None,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    device: str | torch.device | None = None,
) -> BaselineCurve:
    """Train one network of ``task`` from the flat ``init`` [P] for ``steps`` steps with ``recipe``.

    ``data`` is a :class:`~learned_opt.tasks.ClassificationData` (inputs of any shape), on the device
    to train on; the loss is ``task.loss``. Minibatches of the recipe's batch size come from a fresh
    permutation of the training set each epoch, drawn from a ``torch.Generator`` (``seed``, or the
    generator itself); the global RNG is not used. ``test_loss`` and ``test_error``
    (``task.evaluate`` on ``data``'s test set) are measured at every step in ``eval_steps`` (0 is the
    init); the timing excludes evaluation.

    ``wrap(model, base)`` builds the optimizer around the recipe's (``base(params)`` makes it, and
    its schedule is kept): a :class:`~learned_opt.GptOptimizer` with ``base=base``, for instance. If
    its ``step`` raises :class:`GenerationError` (its metric closure diverged) the run stops there:
    ``diverged_at`` is set and the remaining metrics are NaN. ``on_step(t, model, optimizer)`` is
    called after every step ``t`` (1-based), before any measurement at ``t``.
    """
    r = recipe_of(recipe)
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    layout.load_into(init.detach().float(), list(model.parameters()))
    x, y = data.train_x, data.train_y
    device = torch.device(device) if device is not None else x.device
    model.to(device)
    n, batch = int(x.shape[0]), int(r["batch_size"])
    made: dict[str, Any] = {}

    def base(params) -> torch.optim.Optimizer:
        opt, made["sched"] = make_optimizer(r, params)
        return opt

    opt = base(model.parameters()) if wrap is None else wrap(model, base)
    sched = made["sched"]
    name = recipe if isinstance(recipe, str) else r["optimizer"]
    curve = BaselineCurve(name, [], [], [], math.nan)
    wanted = sorted({int(s) for s in eval_steps if 0 <= int(s) <= steps})
    measured = set(wanted)

    def measure(t: int, wall: float) -> None:
        m = task.evaluate(layout.flatten_module(model)[None], data, list(TEST_METRICS))  # name -> [1]
        curve.steps.append(t)
        curve.wall_s.append(wall)
        curve.test_loss.append(float(m["test_loss"][0]))
        curve.test_error.append(float(m["test_error"][0]))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if wanted and wanted[0] == 0:
        measure(0, 0.0)
    order = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    perm, pos, elapsed, t = None, n, 0.0, 0
    start = time.perf_counter()
    while t < steps:
        if pos >= n:  # a new epoch: the per-epoch schedule steps, then a fresh order
            if perm is not None and sched is not None:
                sched.step()
            perm, pos = torch.randperm(n, generator=order).to(device), 0
        idx = perm[pos : pos + batch]
        pos += batch
        opt.zero_grad(set_to_none=True)
        task.loss(model(x[idx]), y[idx]).backward()
        try:
            opt.step()
        except GenerationError:  # a GptOptimizer's metric closure returned NaN/Inf: training diverged
            curve.diverged_at = t + 1
            break
        t += 1
        if on_step is not None:
            on_step(t, model, opt)
        if t in measured:
            sync()
            elapsed += time.perf_counter() - start
            measure(t, elapsed)
            start = time.perf_counter()
    sync()
    elapsed += time.perf_counter() - start
    curve.seconds_per_step = elapsed / t if t else math.nan
    for s in wanted[len(curve.steps):]:  # steps after a divergence
        curve.steps.append(s)
        for values in (curve.test_loss, curve.test_error, curve.wall_s):
            values.append(math.nan)
    return curve
