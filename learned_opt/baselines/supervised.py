"""The one plain training loop of a supervised task: ``nn.Module`` + ``torch.optim`` with a recipe.

:func:`train_baseline` trains one network of any :class:`~learned_opt.tasks.SupervisedTask` from a
flat init with a recipe of :mod:`learned_opt.recipes` (Adam, G.pt's SGD recipe, or the learned
optimizer), measuring the task's test metrics at given steps; :class:`BaselineRun` is the same loop
advanced in stages (``learned-opt bench --mode lopt`` trains an lr grid to one step count, then
continues only the chosen run). The demo's baselines, ``learned-opt bench`` (which drives a
:class:`~learned_opt.GptOptimizer` through it with ``wrap``) and the corpus's reference run use it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, cast

import torch
from torch import nn

from ..errors import ConfigError, GenerationError
from ..lopt import LearnedOptimizer
from ..recipes import ADAM, ADAM_BASELINE, LOPT, LOPT_BASELINE, SGD, SGD_BASELINE, cosine_lr
from ..tasks import SupervisedTask

BASELINES = {"adam": ADAM_BASELINE, "sgd": SGD_BASELINE}  # the plain optimizers' recipes (the demo trains both)
NAMED_RECIPES = {**BASELINES, "lopt": LOPT_BASELINE}  # every recipe a name stands for (--bases, --optimizers)
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
    # training diverged at this step: a GptOptimizer's metric closure returned NaN/Inf after it, or at a
    # measurement the last minibatch loss or a parameter was not finite
    diverged_at: int | None = None


def recipe_of(recipe: str | Recipe) -> Recipe:
    """A recipe by name (``"adam"``, ``"sgd"``, ``"lopt"``) or as a hyperparameter dict, checked."""
    if isinstance(recipe, str):
        if recipe not in NAMED_RECIPES:
            raise ConfigError(f"unknown baseline optimizer {recipe!r}; choose one of {', '.join(NAMED_RECIPES)}")
        return NAMED_RECIPES[recipe]
    missing = {"optimizer", "lr", "batch_size"} - set(recipe)
    if missing:
        raise ConfigError(f"a training recipe needs the keys optimizer, lr and batch_size; missing {sorted(missing)}")
    if recipe["optimizer"] not in (SGD, ADAM, LOPT):
        raise ConfigError(f"unknown optimizer {recipe['optimizer']!r} in the recipe; choose {SGD}, {ADAM} or {LOPT}")
    if recipe["optimizer"] == LOPT and recipe.get("weight_decay", 0.0):
        raise ConfigError("the learned optimizer's recipe takes no weight_decay (its rule has none); leave it out")
    return recipe


def make_optimizer(recipe: str | Recipe, params) -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, per-epoch scheduler or None)`` of a recipe (:mod:`learned_opt.recipes`).

    SGD is Nesterov SGD; Adam's ``momentum`` is its beta1; the learned optimizer is
    :class:`~learned_opt.LearnedOptimizer` with the recipe's ``weights``. A ``"cosine-per-epoch"`` schedule (the
    default where a recipe names none, as the corpus's do) anneals to 0 over ``epochs``, stepped once
    per epoch; ``"constant"`` has no scheduler.
    """
    r = recipe_of(recipe)
    wd = r.get("weight_decay", 0.0)
    opt: torch.optim.Optimizer
    if r["optimizer"] == LOPT:
        opt = LearnedOptimizer(params, weights=r.get("weights"), lr=r["lr"])
    elif r["optimizer"] == SGD:
        opt = torch.optim.SGD(params, lr=r["lr"], momentum=r.get("momentum", 0.9), nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.Adam(params, lr=r["lr"], betas=(r.get("momentum", 0.9), r.get("adam_beta2", 0.999)),
                               eps=r.get("adam_eps", 1e-8), weight_decay=wd)
    if r.get("schedule", "cosine-per-epoch") == "constant":
        return opt, None
    epochs = r["epochs"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cosine_lr(1.0, e, epochs))


def train_baseline(
    task: SupervisedTask,
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
    ``diverged_at`` is set and the remaining metrics are NaN. The run stops in the same way where,
    at a measurement step, the last minibatch loss or a parameter is not finite (any optimizer).
    ``on_step(t, model, optimizer)`` is called after every step ``t`` (1-based), before any
    measurement at ``t``.
    """
    run = BaselineRun(task, init, data, recipe, seed=seed, wrap=wrap, on_step=on_step, device=device)
    return run.train_to(steps, eval_steps)


class BaselineRun:
    """One network of ``task`` training with ``recipe``, advanced in stages by :meth:`train_to`.

    The arguments are :func:`train_baseline`'s; ``curve`` holds what was measured so far, and
    training on from step ``t`` continues the very run (model, optimizer state, schedule and
    minibatch order), so two stages equal one.
    """

    def __init__(self, task: SupervisedTask, init: torch.Tensor, data, recipe: str | Recipe, *,
                 seed: int | torch.Generator = 0,
                 wrap: Callable[[nn.Module, BaseFactory], torch.optim.Optimizer] | None = None,
                 on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
                 device: str | torch.device | None = None):
        r = recipe_of(recipe)
        self.task, self.data, self.on_step = task, data, on_step
        self.layout = task.layout()
        with torch.random.fork_rng(devices=[]):
            self.model = task.build_model()
        self.layout.load_into(init.detach().float(), list(self.model.parameters()))
        self.device = torch.device(device) if device is not None else data.train_x.device
        self.model.to(self.device)
        self.batch = int(r["batch_size"])
        made: dict[str, Any] = {}

        def base(params) -> torch.optim.Optimizer:
            opt, made["sched"] = make_optimizer(r, params)
            return opt

        self.optimizer = base(self.model.parameters()) if wrap is None else wrap(self.model, base)
        self.scheduler = made["sched"]
        name = recipe if isinstance(recipe, str) else r["optimizer"]
        self.curve = BaselineCurve(name, [], [], [], math.nan)
        self.t = 0  # steps taken
        self._order = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        self._perm: torch.Tensor | None = None
        self._pos = int(data.train_x.shape[0])  # at the end of an epoch: the first step draws an order
        self._elapsed = 0.0  # training seconds so far

    def train_to(self, steps: int, eval_steps: Sequence[int] = ()) -> BaselineCurve:
        """Train on to step ``steps``, measuring at each step of ``eval_steps`` not yet measured up
        to it (0 only before the first step); returns :attr:`curve`."""
        curve, data, model, opt = self.curve, self.data, self.model, self.optimizer
        done = set(curve.steps)
        wanted = sorted({int(s) for s in eval_steps if int(s) <= steps and int(s) not in done
                         and (self.t < int(s) or int(s) == 0 == self.t)})
        measured = set(wanted)
        if wanted and wanted[0] == 0:
            self._measure(0)
        x, y, n = data.train_x, data.train_y, int(data.train_x.shape[0])
        start: float | None = time.perf_counter()
        while self.t < steps and curve.diverged_at is None:
            if self._pos >= n:  # a new epoch: the per-epoch schedule steps, then a fresh order
                if self._perm is not None and self.scheduler is not None:
                    self.scheduler.step()
                self._perm, self._pos = torch.randperm(n, generator=self._order).to(self.device), 0
            idx = cast(torch.Tensor, self._perm)[self._pos : self._pos + self.batch]
            self._pos += self.batch
            opt.zero_grad(set_to_none=True)
            loss = self.task.loss(model(x[idx]), y[idx])
            loss.backward()
            try:
                opt.step()
            except GenerationError:  # a GptOptimizer's metric closure returned NaN/Inf: training diverged
                curve.diverged_at = self.t + 1
                break
            self.t += 1
            if self.on_step is not None:
                self.on_step(self.t, model, opt)
            if self.t in measured:
                self._sync()
                self._elapsed += time.perf_counter() - cast(float, start)  # None only after a break
                start = None
                if not (torch.isfinite(loss) and torch.isfinite(self.layout.flatten_module(model)).all()):
                    curve.diverged_at = self.t
                    break
                self._measure(self.t)
                start = time.perf_counter()
        if start is not None:
            self._sync()
            self._elapsed += time.perf_counter() - start
        curve.seconds_per_step = self._elapsed / self.t if self.t else math.nan
        for s in wanted:  # steps after a divergence
            if s not in curve.steps:
                curve.steps.append(s)
                for values in (curve.test_loss, curve.test_error, curve.wall_s):
                    values.append(math.nan)
        return curve

    def _measure(self, t: int) -> None:
        flat = self.layout.flatten_module(self.model)[None]  # [1, P]
        m = self.task.evaluate(flat, self.data, list(TEST_METRICS))  # name -> [1]
        self.curve.steps.append(t)
        self.curve.wall_s.append(self._elapsed)
        self.curve.test_loss.append(float(m["test_loss"][0]))
        self.curve.test_error.append(float(m["test_error"][0]))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
