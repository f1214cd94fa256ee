"""``learned-opt bench --mode lopt``: the learned optimizer against Adam(1e-3), grid-tuned Adam and
G.pt's SGD recipe, side by side on every task, written to ``bench.json`` and one PNG per task.

Per task and init (seeds ``--seed + i``), every optimizer starts from the same init and draws the
same minibatch order (the one loop, :class:`~learned_opt.baselines.supervised.BaselineRun`, its
generator seeded with the init's seed); all train on the training set less its last ``--holdout``
examples (:func:`~pretrain.bench.runs.split_holdout`), which only the lr choice reads. Adam at each
lr of ``--lr-grid`` trains to ``--grid-steps``; the lr whose median held-out loss is lowest there
is continued (the same run, not retrained) to ``--steps`` as ``adam-tuned``. The test set is only
reported, never chosen on.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from learned_opt import tasks
from learned_opt.baselines.supervised import BaselineCurve, BaselineRun
from learned_opt.demo import first_step_at_or_below
from learned_opt.errors import ConfigError
from learned_opt.lopt import LoadedRule, load_rule

from ..evaluate import init_params
from .config import TARGET_OPTIMIZER, TUNED_OPTIMIZER, LoptBenchConfig, applicable, named_recipe
from .report import finish_result, plot_lopt_task
from .runs import Split, eval_grid, holdout_closure, load_split
from .summaries import curve_summary, median_curve, median_finite

FIXED = ("adam", "sgd", "lopt")  # the optimizers with one recipe each; adam-tuned is chosen per task
DESCRIPTIONS = {
    "adam": "Adam, lr 1e-3, batch 128, constant lr: its median test loss at --grid-steps is the target",
    "adam-tuned": "Adam, batch 128, constant lr, the lr of --lr-grid with the lowest median held-out loss at "
                  "--grid-steps, continued to --steps",
    "sgd": "G.pt's recipe: Nesterov SGD 0.9, lr 0.1, weight decay 5e-4, batch 128, cosine over 25 epochs per epoch",
    "lopt": "LearnedOptimizer, lr 1.0, batch 128",
}


def run_lopt(config: LoptBenchConfig, data=None) -> dict:
    """Every task of ``config``, every optimizer; returns the results (also ``out/bench.json``).
    ``data`` (for tests) stands in for every task's own ``load_data``."""
    t_start = time.perf_counter()
    rule = load_rule(config.weights) if "lopt" in config.optimizers else None  # bad weights fail before any work
    chosen = [lopt_task(ref) for ref in config.tasks]  # every task is checked before any training
    names = [t.name for t in chosen]
    if len(set(names)) != len(names):
        raise ConfigError(f"--task names one task twice ({', '.join(names)}); name each once")
    seeds = [config.seed + i for i in range(config.inits)]
    grid = sorted({*eval_grid(config.steps, config.eval_every), config.grid_steps})
    lrs = config.lr_grid if TUNED_OPTIMIZER in config.optimizers else ()
    per_init = len([o for o in config.optimizers if o in FIXED]) + len(lrs) + bool(lrs)
    bar = tqdm(total=len(chosen) * len(seeds) * per_init, desc="bench lopt", unit="run", disable=not config.progress)
    sections = {task.name: measure_task(task, config, rule, seeds, grid, bar, data) for task in chosen}
    bar.close()

    result = {
        "mode": config.mode,
        "config": asdict(config),
        "weights": None if rule is None else {"name": rule.name, "sha256": rule.sha256},
        "optimizers": {name: DESCRIPTIONS[name] for name in config.optimizers},
        "target": f"median test loss of Adam(1e-3) at step {config.grid_steps}",
        "lr_choice": f"the lr of --lr-grid with the lowest median (over inits) full-batch loss on the last "
                     f"{config.holdout} training examples (held out, never trained on) at step {config.grid_steps}",
        "seeds": seeds,
        "grid": grid,
        "tasks": sections,
    }
    finish_result(result, config, t_start)
    out = Path(config.out)
    if config.plots:
        result["plots"] = [str(plot_lopt_task(result, name, out / f"{file_stem(name)}.png")) for name in sections]
    return result


def lopt_task(ref: str) -> tasks.Task:
    """The task ``ref`` names; refused unless it is supervised."""
    task = tasks.get(ref)
    if task.kind != "supervised":
        raise ConfigError(f"bench --mode lopt measures supervised tasks; {task.name!r} is a {task.kind} task")
    return task


def validation_loss(task: tasks.Task, model: torch.nn.Module, split: Split) -> float:
    """The full-batch training loss of ``model`` on the held-out slice (what the lr grid is chosen by)."""
    return holdout_closure(task, model, split.holdout_x, split.holdout_y)()


def measure_task(task: tasks.Task, config: LoptBenchConfig, rule: LoadedRule | None, seeds: list[int],
                 grid: list[int], bar, data=None) -> dict:
    """One task: every optimizer on every init, the lr grid, the target and the summaries."""
    t_start = time.perf_counter()
    device = torch.device(config.device)
    split = load_split(task, data, config.data_root, config.holdout, device)
    inits = init_params(task, seeds)  # [N, P]
    recipes = {name: named_recipe(name, rule) for name in FIXED}
    lrs = config.lr_grid if TUNED_OPTIMIZER in config.optimizers else ()
    curves: dict[str, list[BaselineCurve]] = {name: [] for name in config.optimizers}
    grid_runs: dict[float, list[BaselineRun]] = {lr: [] for lr in lrs}
    validation: dict[float, list[float]] = {lr: [] for lr in lrs}

    for i, seed in enumerate(seeds):  # init by init, so that load on the machine hits all optimizers alike
        def start(recipe: dict) -> BaselineRun:
            return BaselineRun(task, inits[i], split.train, recipe, seed=seed, device=device)

        adam = start(recipes[TARGET_OPTIMIZER])
        adam.train_to(config.grid_steps, grid)
        for lr in lrs:
            run = adam  # Adam at the grid's lr 1e-3 is Adam(1e-3): the same run, trained once
            if lr != recipes[TARGET_OPTIMIZER]["lr"]:
                run = start({**recipes[TARGET_OPTIMIZER], "lr": lr})
                run.train_to(config.grid_steps, grid)
            bar.update(1)
            grid_runs[lr].append(run)
            diverged = run.curve.diverged_at is not None
            validation[lr].append(math.inf if diverged else validation_loss(task, run.model, split))
        for name in (o for o in FIXED if o in config.optimizers):
            run = adam if name == TARGET_OPTIMIZER else start(recipes[name])
            curves[name].append(run.train_to(config.steps, grid))
            bar.update(1)

    choice = None
    if lrs:
        choice = choose_lr(validation)
        for run in grid_runs[choice["chosen_lr"]]:  # continued, not retrained
            curves[TUNED_OPTIMIZER].append(run.train_to(config.steps, grid))
        bar.update(len(seeds))
        at = grid.index(config.grid_steps)
        choice["median_test_loss_at_grid_steps"] = [  # reported only; the choice never reads it
            median_curve([r.curve.test_loss[: at + 1] for r in grid_runs[lr]])[at] for lr in lrs]
        choice["diverged"] = [sum(r.curve.diverged_at is not None for r in grid_runs[lr]) for lr in lrs]
    del grid_runs

    at = grid.index(config.grid_steps)
    target = median_curve([c.test_loss for c in curves[TARGET_OPTIMIZER]])[at]
    target = target if math.isfinite(target) else None
    sections: dict[str, dict] = {}
    for name in (TARGET_OPTIMIZER, *(o for o in config.optimizers if o != TARGET_OPTIMIZER)):
        recipe = recipes.get(name) or {**recipes[TARGET_OPTIMIZER], "lr": choice["chosen_lr"]}
        reference = None if name == TARGET_OPTIMIZER else sections[TARGET_OPTIMIZER]["summary"]
        sections[name] = optimizer_section(recipe, curves[name], seeds, grid, at, target, reference)
    return {
        "task": task.name,
        "source": tasks.source_of(task),
        "num_params": task.num_params,
        "data": split.sizes(),
        "target": target,
        "lr_grid": choice,
        "optimizers": sections,
        "lopt_beats_tuned_adam": beats(sections.get("lopt"), sections.get(TUNED_OPTIMIZER)),
        "wall_seconds": time.perf_counter() - t_start,  # loading, training and evaluation
    }


def choose_lr(validation: dict[float, list[float]]) -> dict:
    """The lr with the lowest median held-out loss over inits (a diverged init counts as +inf;
    ties go to the first in grid order)."""
    lrs = list(validation)
    medians = [statistics.median(v if math.isfinite(v) else math.inf for v in validation[lr]) for lr in lrs]
    best = min(range(len(lrs)), key=lambda j: medians[j])
    return {"lrs": lrs, "validation_loss": [validation[lr] for lr in lrs], "median_validation_loss": medians,
            "chosen_lr": lrs[best]}


def optimizer_section(recipe: dict, curves: list[BaselineCurve], seeds: list[int], grid: list[int], at: int,
                      target: float | None, reference: dict | None) -> dict:
    """One optimizer on one task: per-init rows, the median curve, and the summary (ratios to ``reference``,
    Adam(1e-3)'s summary)."""
    rows = [{
        "seed": seed,
        "steps_to_target": None if target is None else first_step_at_or_below(grid, c.test_loss, target),
        "test_loss_at_grid_steps": c.test_loss[at],
        "final_test_loss": c.test_loss[-1],
        "seconds_per_step": c.seconds_per_step,
        "diverged_at": c.diverged_at,
    } for seed, c in zip(seeds, curves, strict=True)]
    median = median_curve([c.test_loss for c in curves])  # a diverged init counts as worse than any loss
    reached = [r["steps_to_target"] for r in rows if r["steps_to_target"] is not None]
    summary = curve_summary(grid, curves, target, reference)
    summary.update({
        "inits": len(rows),
        "reached": len(reached),
        "median_steps_to_target": median_finite(reached),
        "median_test_loss_at_grid_steps": median[at],
        "median_final_test_loss": median[-1],
        "diverged": sum(c.diverged_at is not None or not all(map(math.isfinite, c.test_loss)) for c in curves),
        "median_seconds_per_step": median_finite(c.seconds_per_step for c in curves),
    })
    return {"hparams": applicable(recipe), "rows": rows, "test_loss": [c.test_loss for c in curves],
            "median_test_loss": median, "wall_s": [c.wall_s for c in curves], "summary": summary}


def beats(lopt: dict | None, tuned: dict | None) -> bool | None:
    """Whether the learned optimizer's median curve reaches the target in fewer steps than grid-tuned
    Adam's (one that never reaches it is beaten by one that does); None if either was not run."""
    if lopt is None or tuned is None:
        return None
    mine, theirs = lopt["summary"]["curve_steps_to_target"], tuned["summary"]["curve_steps_to_target"]
    return mine is not None and (theirs is None or mine < theirs)


def file_stem(name: str) -> str:
    """A task name as a file name: anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "task"
