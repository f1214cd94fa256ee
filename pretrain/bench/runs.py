"""One benchmark run: the held-out split, the evaluation grid, and a base optimizer with or without
periodic generative updates (the one supervised training loop, :func:`learned_opt.baselines.supervised.train_baseline`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from learned_opt.baselines.supervised import Recipe, train_baseline
from learned_opt.errors import ConfigError
from learned_opt.optimizer import GptOptimizer
from learned_opt.pretrained import LoadedGenerator
from learned_opt.tasks import Task
from .config import FractionPrompt


@dataclass
class Split:
    """The data of one benchmark, split by the task's :meth:`~learned_opt.tasks.Task.validation_data`.

    The networks train on ``train``'s training set (the first ``n - holdout`` training examples); its
    test set is the task's own, read only by the reporting evaluation. The metric closure sees only
    ``holdout_x``/``holdout_y`` (the last ``holdout`` training examples).
    """

    train: Any
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.train.to(device), self.holdout_x.to(device), self.holdout_y.to(device))

    def sizes(self) -> dict[str, int]:
        """How many examples train, are held out, and test (for ``bench.json``)."""
        return {"train_examples": int(self.train.train_x.shape[0]), "holdout_examples": int(self.holdout_x.shape[0]),
                "test_examples": int(self.train.test_y.shape[0])}


def split_holdout(task: Task, data, holdout: int) -> Split:
    """Hold out the last ``holdout`` training examples of ``data`` (``task.validation_data``; views, no copies)."""
    n = int(data.train_x.shape[0])
    if not 1 <= holdout < n:
        raise ConfigError(f"--holdout {holdout} must be between 1 and {n - 1}: the training set has {n} examples "
                          f"and the networks need some to train on (default 5000)")
    val = task.validation_data(data, holdout)  # its test set is the held-out slice
    return Split(dataclasses.replace(data, train_x=val.train_x, train_y=val.train_y), val.test_x, val.test_y)


def load_split(task: Task, data, root: str | None, holdout: int, device: torch.device) -> Split:
    """``data`` (else the task's own, read from ``root``) split by :func:`split_holdout`, on ``device``."""
    if data is None:
        data = task.load_data(root)
    split = split_holdout(task, data, holdout)
    return split.to(device) if device.type != "cpu" else split


def holdout_closure(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """The metric closure: the full-batch training loss (``task.loss``) of ``model`` on the held-out ``x``, ``y``."""

    def closure() -> float:
        training = model.training
        model.eval()  # no BatchNorm statistics updated, no dropout drawn
        try:
            with torch.no_grad():
                return float(task.loss(model(x), y))
        finally:
            model.train(training)

    return closure


def eval_grid(steps: int, every: int) -> list[int]:
    """0, every, 2 * every, ... and ``steps`` (always included)."""
    return sorted({*range(0, steps + 1, every), steps})


# ---------------------------------------------------------------------- one training run


@dataclass
class Run:
    """One network trained with one configuration, measured on the evaluation grid."""

    test_loss: list[float]  # at each grid step (NaN after a divergence)
    wall_s: list[float]  # cumulative training seconds (generative updates included) at each grid step
    counters: dict[str, int] = field(default_factory=dict)  # GptOptimizer's; empty for the base alone
    generation_seconds: float = 0.0  # sum of the generative updates' own seconds
    accepted_at: list[int] = field(default_factory=list)  # steps after which an update was accepted
    attempted_at: list[int] = field(default_factory=list)  # steps after which an update ran (any outcome)
    kept_at: list[int] = field(default_factory=list)  # steps after which θ was kept: the metric met the prompt
    accepted_step_sizes: list[float] = field(default_factory=list)  # the step size of each accepted update
    diverged_at: int | None = None  # the metric closure returned NaN/Inf after this step


def train_run(
    task: Task,
    init: torch.Tensor,
    split: Split,
    base: str | Recipe,
    grid: Sequence[int],
    *,
    seed: int,
    generator: LoadedGenerator | None = None,
    every: int | None = None,
    prompt: float | FractionPrompt | None = None,
    sampling_steps: int | None = None,
    method: str | None = None,
    t_min: int | None = None,
    candidates: int = 1,
    guidance: float | None = None,
    temperature: float | None = None,
    rank: str = "closure",
    step_size: Sequence[float] = (1.0,),
    min_improvement: float = 0.0,
    keep_if_met: bool = True,
    moments: str = "keep",
    device: str | torch.device = "cpu",
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
) -> Run:
    """Train the flat ``init`` [P] for ``grid[-1]`` steps with ``base`` (a recipe or its name:
    ``"adam"``, ``"sgd"``, ``"lopt"``), alone (``generator=None``) or inside a periodic GptOptimizer
    (``every=k``), measuring the test loss at each ``grid`` step.

    The loop is :func:`~learned_opt.baselines.supervised.train_baseline`: minibatches of the base's
    batch size from a fresh permutation of ``split.train``'s training set each epoch, drawn from a
    ``torch.Generator`` seeded with ``seed`` (also the optimizer's sampling seed); the global RNG is
    not used. ``moments="reset"`` clears the base optimizer's per-parameter state after every
    accepted generative update. ``on_optimizer`` is called with the optimizer once it is built.
    """
    run = Run([], [])
    state: dict[str, Any] = {"gpt": None, "last": None}

    def wrap(model: torch.nn.Module, base_optimizer) -> torch.optim.Optimizer:
        if generator is None:
            opt = base_optimizer(model.parameters())
        else:
            opt = state["gpt"] = GptOptimizer(
                model.named_parameters(), generator, base=base_optimizer, every=every, prompt=prompt,
                sampling_steps=sampling_steps, sampling_method=method, sampling_t_min=t_min, candidates=candidates,
                guidance=guidance, sampling_temperature=temperature, rank=rank, keep_if_met=keep_if_met, seed=seed, guard=True,
                step_size=tuple(step_size), min_improvement=min_improvement,
                metric_closure=holdout_closure(task, model, split.holdout_x, split.holdout_y),
            )
        if on_optimizer is not None:
            on_optimizer(opt)
        return opt

    def after_step(t: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        gpt = state["gpt"]
        if gpt is None or gpt.last_report is state["last"]:
            return
        state["last"] = report = gpt.last_report  # a generative update ran after this step
        run.generation_seconds += report.seconds
        run.attempted_at.append(t)
        if report.kept:
            run.kept_at.append(t)
        if report.accepted:
            run.accepted_at.append(t)
            run.accepted_step_sizes.append(report.step_size)
            if moments == "reset":
                gpt.base.state.clear()  # the base re-initialises its state lazily at the next step

    curve = train_baseline(task, init, split.train, base, int(grid[-1]), grid, seed=seed, wrap=wrap,
                           on_step=after_step, device=device)
    run.test_loss, run.wall_s, run.diverged_at = curve.test_loss, curve.wall_s, curve.diverged_at
    if state["gpt"] is not None:
        run.counters = {k: int(state["gpt"].counters[k]) for k in ("attempted", "accepted", "rejected", "failed", "kept")}
    return run
