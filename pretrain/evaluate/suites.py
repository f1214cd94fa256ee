"""The baselines and metrics of each kind of task: Adam and SGD for classifiers, PPO for control tasks."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from learned_opt.baselines.ppo import PPOHparams, PPOShape, train_ppo
from learned_opt.demo import train_baseline
from learned_opt.errors import ConfigError
from learned_opt.recipes import ADAM_BASELINE, SGD_BASELINE
from learned_opt.tasks import Task

from ..corpus import CORPUS_SHAPE, BatchedTrainer, RunPlan
from .config import PPO_TIMING_ENV_STEPS, REPEATS_REPORTED, RETURN_BATCH, EvalConfig
from .metrics import log_grid, reach_summary, solved_share, steps_to_reach, summary
from .plots import plot_before_after, plot_curves
from .sampler import measure_metrics


class ClassifierSuite:
    """Supervised tasks: Adam and SGD from the same inits, test loss on a 1-2-3-5 grid of steps."""

    metrics = ("test_loss", "test_error")  # measured for every network, besides the generator's metric
    memo_metric = "test_loss"  # reported for the nearest corpus checkpoint
    table_metric = "test_error"  # the repeated and OOD rows of the printed table
    baseline, baseline_label, unit = "adam", "Adam", "step"  # what one update's wall time is set against

    def check(self, task: Task, config: EvalConfig) -> None:
        for m in self.metrics:
            task.metric(m)

    def seconds_per_step(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig) -> tuple[float, dict]:
        """A plain ``torch.optim.Adam`` loop on one network (evaluation excluded)."""
        return train_baseline(task, theta0[0], data, "adam", config.timing_steps, (), seed=0).seconds_per_step, {}

    def run(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig,
            after: dict[str, torch.Tensor]) -> tuple[dict, list[int | None]]:
        """The ``baselines`` section, and per init the Adam steps to reach the update's test loss."""
        grid = log_grid(config.max_steps)
        curves = _baselines(task, theta0, seeds, data, config, grid)
        reach = {o: steps_to_reach(grid, c, after["test_loss"]) for o, c in curves.items()}
        return {
            "grid": grid,
            "adam": {"hparams": ADAM_BASELINE, "test_loss": curves["adam"].tolist(), "steps_to_reach": reach["adam"]},
            "sgd": {"hparams": SGD_BASELINE, "test_loss": curves["sgd"].tolist(), "steps_to_reach": reach["sgd"]},
            "summary": {
                **{f"{o}_{k}": v for o in ("adam", "sgd") for k, v in reach_summary(reach[o], curves[o]).items()},
            },
        }, reach["adam"]

    def one_step_extra(self, hist: dict[str, torch.Tensor]) -> dict:
        return {}

    def share_rows(self, result: dict) -> list:
        return []

    def baseline_rows(self, result: dict) -> list:
        bl, n = result["baselines"]["summary"], len(result["seeds"])
        return [(f"Adam steps to reach (not reached: {bl['adam_not_reached']}/{n}, diverged: {bl['adam_diverged']})",
                 bl["adam_steps_to_reach"]),
                (f"SGD steps to reach (not reached: {bl['sgd_not_reached']}/{n}, diverged: {bl['sgd_diverged']})",
                 bl["sgd_steps_to_reach"])]

    def plot_one_step(self, result: dict, out: Path) -> Path:
        return plot_before_after(result, out, "test_loss", log=True)

    def plot_baselines(self, result: dict, out: Path) -> Path:
        bl = result["baselines"]
        return plot_curves(
            out, [max(s, 1) for s in bl["grid"]],  # log axis: step 0 drawn at 1
            [("Adam lr 1e-3", bl["adam"]["test_loss"]), ("SGD (G.pt recipe)", bl["sgd"]["test_loss"])],
            [(result["one_step"]["summary"]["after_test_loss"]["median"], "--", "1 generative update (median)")],
            "training steps (batch 128; step 0 drawn at 1)", f"{result['generator']['task']} test loss", log_x=True,
        )


class ControlSuite:
    """Control tasks: PPO from the same inits, the greedy return after every PPO update.

    ``solved_return`` (the task's, None if it has none) adds the share of policies that reach it
    and the PPO env steps to reach it."""

    metrics = ("return",)
    memo_metric = table_metric = "return"
    baseline, baseline_label, unit = "ppo", "PPO", "env_step"

    def __init__(self, solved_return: float | None = None):
        self.solved_return = solved_return

    @staticmethod
    def shape(config: EvalConfig) -> PPOShape:
        return replace(CORPUS_SHAPE, total_steps=config.max_env_steps)

    def check(self, task: Task, config: EvalConfig) -> None:
        shape = self.shape(config)
        if config.max_env_steps < shape.envs * shape.horizon:
            raise ConfigError(f"--max-env-steps must be >= {shape.envs * shape.horizon} (one PPO update of {shape.envs} "
                              f"environments x {shape.horizon} steps), got {config.max_env_steps}")

    def seconds_per_step(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig) -> tuple[float, dict]:
        """One PPO run alone (the baseline's hyperparameters and step structure), evaluation excluded."""
        shape = replace(self.shape(config), total_steps=min(config.max_env_steps, PPO_TIMING_ENV_STEPS))
        t = time.perf_counter()
        res = train_ppo(task, theta0[:1], PPOHparams(), shape, run_seeds=seeds[:1], checkpoint_at=[0, shape.grad_steps])
        seconds, env_steps = time.perf_counter() - t, int(res.env_steps[0, -1])
        return seconds / env_steps, {"ppo_timing_env_steps": env_steps,
                                     "ppo_timing": "one PPO run trained alone (not the batched baseline)"}

    def run(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig,
            after: dict[str, torch.Tensor]) -> tuple[dict, list[int | None]]:
        """The ``baselines`` section, and per init the PPO env steps to reach the update's return."""
        shape = self.shape(config)
        per_update = shape.epochs * shape.minibatches
        bar = tqdm(total=shape.grad_steps, desc="PPO baseline", unit="grad step", disable=not config.progress)
        res = train_ppo(task, theta0, PPOHparams(), shape, seed=config.seed, run_seeds=seeds,
                        checkpoint_at=[u * per_update for u in range(shape.updates + 1)],
                        progress=lambda done: bar.update(done - bar.n))
        bar.close()
        grid = res.env_steps[0].tolist()  # the same for every run: after each update
        n, g = res.checkpoints.shape[:2]
        flat = res.checkpoints.reshape(n * g, -1)
        returns = torch.cat([task.evaluate(flat[s : s + RETURN_BATCH], data)["return"]
                             for s in range(0, n * g, RETURN_BATCH)]).float().view(n, g)
        reach = steps_to_reach(grid, returns, after["return"], "max")
        r = reach_summary(reach, returns)
        section = {
            "env_steps": grid,
            "ppo": {"hparams": asdict(PPOHparams()), "shape": asdict(shape), "return": returns.tolist(),
                    "steps_to_reach": reach},
            "summary": {
                "ppo_steps_to_reach": r["steps_to_reach"], "ppo_not_reached": r["not_reached"],
                "ppo_final_return": summary(returns[:, -1].tolist()),
            },
        }
        if self.solved_return is not None:
            solve = steps_to_reach(grid, returns, torch.full((n,), self.solved_return), "max")
            s = reach_summary(solve, returns)
            section["ppo"]["steps_to_solve"] = solve
            section["summary"].update(ppo_steps_to_solve=s["steps_to_reach"], ppo_not_solved=s["not_reached"],
                                      ppo_final_solved_share=solved_share(returns[:, -1], self.solved_return))
        return section, reach

    def one_step_extra(self, hist: dict[str, torch.Tensor]) -> dict:
        """The share of inits at or above the solved return after 0, 1, 2, 5, 10 updates."""
        if self.solved_return is None:
            return {}
        returns, t = hist["return"], self.solved_return  # [n+1, N]
        reported = [r for r in (0, *REPEATS_REPORTED) if r < returns.shape[0]]
        return {"solved": {"threshold": t, "share": {str(r): solved_share(returns[r], t) for r in reported}}}

    def share_rows(self, result: dict) -> list:
        if "solved" not in result["one_step"]:
            return []
        solved = result["one_step"]["solved"]
        return [(f"share with return >= {solved['threshold']:g}, {_updates(int(r))}", {"median": s})
                for r, s in solved["share"].items()]

    def baseline_rows(self, result: dict) -> list:
        bl, n = result["baselines"]["summary"], len(result["seeds"])
        steps = result["baselines"]["env_steps"][-1]
        rows = [(f"PPO env steps to reach the update (not reached: {bl['ppo_not_reached']}/{n})", bl["ppo_steps_to_reach"])]
        if "ppo_steps_to_solve" in bl:
            rows.append((f"PPO env steps to reach {result['one_step']['solved']['threshold']:g} "
                         f"(not reached: {bl['ppo_not_solved']}/{n})", bl["ppo_steps_to_solve"]))
        return rows + [(f"PPO return after {steps:,} env steps", bl["ppo_final_return"])]

    def plot_one_step(self, result: dict, out: Path) -> Path:
        return plot_before_after(result, out, "return", log=False, solved=self.solved_return)

    def plot_baselines(self, result: dict, out: Path) -> Path:
        bl = result["baselines"]
        lines = [(result["one_step"]["summary"]["after_return"]["median"], "--", "1 generative update (median)")]
        if self.solved_return is not None:
            lines.append((self.solved_return, ":", f"solved ({self.solved_return:g})"))
        return plot_curves(
            out, bl["env_steps"], [("PPO (default hyperparameters)", bl["ppo"]["return"])], lines,
            "environment steps", f"{result['generator']['task']} greedy return", log_x=False,
        )


def suite_for(task: Task) -> ClassifierSuite | ControlSuite:
    """The baselines and metrics ``eval`` uses for ``task``, by its kind."""
    return ControlSuite(task.solved_return) if task.kind == "control" else ClassifierSuite()


def _updates(r: int) -> str:
    return "init" if r == 0 else "1 update" if r == 1 else f"{r} updates"


def _baselines(task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig, grid: list[int]) -> dict:
    """Adam and SGD test-loss curves of every init on ``grid``: name -> ``[N, G]`` (NaN if dropped)."""

    class GridPlan(RunPlan):  # the trainer saves at the plan's checkpoint steps and stops after total_steps
        def checkpoint_steps(self) -> torch.Tensor:
            return torch.tensor(grid)

        @property
        def total_steps(self) -> int:
            return grid[-1]

    n = theta0.shape[0]
    plans = [GridPlan(i, int(seeds[i]), dict(ADAM_BASELINE), len(data.train_x), len(grid)) for i in range(n)]
    plans += [GridPlan(n + i, int(seeds[i]), dict(SGD_BASELINE), len(data.train_x), len(grid)) for i in range(n)]
    trainer = BatchedTrainer(task, data.train_x, data.train_y, config.device)
    params: dict[int, torch.Tensor] = {}
    bar = tqdm(total=2 * n, desc="Adam + SGD baselines", unit="run", disable=not config.progress)

    def done(runs) -> None:
        for r in runs:
            params[r.plan.run_id] = r.params  # [G, P] or None
        bar.update(len(runs))

    trainer.train(plans, done)
    bar.close()
    out = {}
    for name, offset in (("adam", 0), ("sgd", n)):
        curves = torch.full((n, len(grid)), math.nan)
        for i in range(n):
            p = params.get(offset + i)
            if p is not None:
                curves[i] = measure_metrics(task, p, data, config.device, ("test_loss",))["test_loss"]
        out[name] = curves
    return out
