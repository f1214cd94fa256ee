"""One benchmark run: the held-out split, the evaluation grid, and a base optimizer with or without
periodic generative updates.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from learned_opt.demo import BATCH_SIZE, make_optimizer
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.optimizer import GptOptimizer
from learned_opt.pretrained import LoadedGenerator
from learned_opt.tasks import Task
from .config import FractionPrompt


@dataclass
class Split:
    """The training data split for one benchmark.

    The networks train on ``train_x``/``train_y`` (the first ``n - holdout`` training examples); the
    metric closure sees only ``holdout_x``/``holdout_y`` (the last ``holdout``); ``test`` is the task's
    data object, from which only the test set is read, by the reporting evaluation.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor
    test: Any

    def to(self, device: torch.device | str) -> "Split":
        moved = [t.to(device) for t in (self.train_x, self.train_y, self.holdout_x, self.holdout_y)]
        return Split(*moved, self.test.to(device))


def split_holdout(data, holdout: int) -> Split:
    """Hold out the last ``holdout`` training examples of ``data`` (views, no copies)."""
    n = int(data.train_x.shape[0])
    if not 1 <= holdout < n:
        raise ConfigError(f"--holdout {holdout} must be between 1 and {n - 1}: the training set has {n} examples "
                          f"and the networks need some to train on (default 5000)")
    m = n - holdout
    test = dataclasses.replace(data, train_x=data.train_x[:0], train_y=data.train_y[:0])  # only its test set stays
    return Split(data.train_x[:m], data.train_y[:m], data.train_x[m:], data.train_y[m:], test)


def holdout_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """The metric closure: full-batch cross-entropy of ``model`` on the held-out slice ``x``, ``y``."""

    def closure() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

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
    diverged_at: int | None = None  # the metric closure returned NaN/Inf after this step


def train_run(
    task: Task,
    init: torch.Tensor,
    split: Split,
    base: str,
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
    moments: str = "keep",
    device: str | torch.device = "cpu",
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
) -> Run:
    """Train the flat ``init`` [P] for ``grid[-1]`` steps with ``base``, alone (``generator=None``)
    or inside a periodic GptOptimizer (``every=k``), measuring the test loss at each ``grid`` step.

    Minibatches of 128 come from a fresh permutation of ``split.train_x`` each epoch, drawn from a
    ``torch.Generator`` seeded with ``seed`` (also the optimizer's sampling seed); the global RNG is
    not used. ``moments="reset"`` clears the base optimizer's per-parameter state after every
    accepted generative update. ``on_optimizer`` is called with the optimizer once it is built.
    """
    device = torch.device(device)
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    layout.load_into(init.detach().float(), list(model.parameters()))
    model.to(device)
    x, y = split.train_x, split.train_y
    n, steps = int(x.shape[0]), int(grid[-1])
    made: dict[str, Any] = {}

    def base_optimizer(params) -> torch.optim.Optimizer:
        opt, made["sched"] = make_optimizer(base, params, math.ceil(n / BATCH_SIZE))
        return opt

    gpt = None
    if generator is None:
        opt = base_optimizer(model.parameters())
    else:
        gpt = opt = GptOptimizer(
            model.named_parameters(), generator, base=base_optimizer, every=every, prompt=prompt,
            sampling_steps=sampling_steps, sampling_method=method, sampling_t_min=t_min, candidates=candidates,
            seed=seed, guard=True,
            metric_closure=holdout_closure(model, split.holdout_x, split.holdout_y),
        )
    sched = made["sched"]
    if on_optimizer is not None:
        on_optimizer(opt)

    def test_loss() -> float:
        flat = layout.flatten_module(model)[None]  # [1, P]
        return float(task.evaluate(flat, split.test, ["test_loss"])["test_loss"][0])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run = Run([], [])
    wanted = set(grid)
    if 0 in wanted:
        run.test_loss.append(test_loss())
        run.wall_s.append(0.0)
    order = torch.Generator().manual_seed(seed)
    perm, pos, elapsed, last = None, n, 0.0, None
    start = time.perf_counter()
    for t in range(1, steps + 1):
        if pos >= n:  # a new epoch: the per-epoch schedule steps, then a fresh order
            if perm is not None and sched is not None:
                sched.step()
            perm, pos = torch.randperm(n, generator=order).to(device), 0
        idx = perm[pos : pos + BATCH_SIZE]
        pos += BATCH_SIZE
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        try:
            opt.step()
        except GenerationError:  # the metric closure returned NaN/Inf: training diverged
            run.diverged_at = t
            break
        if gpt is not None and gpt.last_report is not last:  # a generative update ran after this step
            last = gpt.last_report
            run.generation_seconds += last.seconds
            if last.accepted:
                run.accepted_at.append(t)
                if moments == "reset":
                    gpt.base.state.clear()  # the base re-initialises its state lazily at the next step
        if t in wanted:
            sync()
            elapsed += time.perf_counter() - start
            run.wall_s.append(elapsed)
            run.test_loss.append(test_loss())
            start = time.perf_counter()
    missing = len(grid) - len(run.test_loss)  # grid steps after a divergence
    run.test_loss += [math.nan] * missing
    run.wall_s += [math.nan] * missing
    if gpt is not None:
        run.counters = {k: int(gpt.counters[k]) for k in ("attempted", "accepted", "rejected", "failed")}
    return run
