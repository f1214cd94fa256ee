"""The control demo: one generative update of a random policy of any control task, next to PPO.

``learned-opt demo`` on a control task (``cartpole-mlp``, the default) builds a fresh policy
(PyTorch's default init, seeded), measures its greedy return over the task's fixed episodes, makes
one :meth:`GptOptimizer.generate` update prompted with the generator's best prompt (the closure
measures the same return), then trains the *same* init with PPO (one run of the batched
:func:`learned_opt.baselines.ppo.train_ppo`, its default hyperparameters and step structure, the
demo's seed as the run's seed) for ``--ppo-env-steps`` environment steps, and reports the
environment steps PPO needed to reach the update's return.

It writes ``demo_TASK.json`` (the numbers) and ``demo_TASK.png`` (``demo_cartpole-mlp.*``): the
task's traced observation (:attr:`~learned_opt.tasks.ControlTask.traced_observation`; CartPole's
pole angle) over the first evaluation episode for the random policy, the updated one and PPO's final one,
with the task's ``traced_limit`` drawn where it has one (CartPole's ±12°), next to PPO's greedy
return against environment steps. Nothing is downloaded: the environment is gymnasium's.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence, cast

import numpy as np
import torch

from .. import tasks
from ..baselines.ppo import PPOHparams, PPOShape, train_ppo
from ..errors import ConfigError
from ..fileio import atomic_write
from ..tasks import ControlTask
from .update import DemoConfig, one_update, save_result


EPISODE = 0  # the evaluation episode drawn in the picture
POLICIES = ("init", "update", "ppo")  # the rows of the table and the lines of the picture


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first of ``steps`` whose value is ``>= target`` (None if never, or if target is NaN)."""
    for s, v in zip(steps, values):
        if v >= target:
            return int(s)
    return None


def run_control_demo(config: DemoConfig) -> dict:
    """Run the demo on ``config.task`` (a control task); returns the results (also written to
    ``out/demo_TASK.json``)."""
    task = cast(ControlTask, tasks.get(config.task))  # a control task: its kind is checked here
    if task.kind != "control":
        raise ConfigError(f"the control demo needs a control task; {task.name} is a {task.kind} task")
    hparams, shape = PPOHparams(), PPOShape(total_steps=config.ppo_env_steps)
    if config.ppo_env_steps < shape.steps_per_update:
        raise ConfigError(f"--ppo-env-steps must be >= {shape.steps_per_update} (one PPO update of "
                          f"{shape.envs} environments x {shape.horizon} steps), got {config.ppo_env_steps}")
    data = task.load_data()
    generator, model, layout, init, report = one_update(task, data, config)
    updated = layout.flatten_module(model)
    per_update = shape.epochs * shape.minibatches
    start = time.perf_counter()
    ppo = train_ppo(task, init[None], hparams, shape, run_seeds=[config.seed],
                    checkpoint_at=[u * per_update for u in range(shape.updates + 1)])
    ppo_seconds = time.perf_counter() - start
    env_steps = ppo.env_steps[0].tolist()

    # one batched rollout: the updated policy, then PPO's policies (the first of which is the init)
    returns, traced = task.rollout(torch.cat([updated[None], ppo.checkpoints[0]]), data)  # [1+K, E], [T, 1+K, E]
    mean = returns.mean(-1).tolist()
    update_return, curve = mean[0], mean[1:]
    rows = {"init": 1, "update": 0, "ppo": len(mean) - 1}  # policy -> index in the rollout
    trajectory = {}
    for policy, i in rows.items():
        a = traced[:, i, EPISODE]
        trajectory[policy] = a[np.isfinite(a)].tolist()  # NaN after the episode ended
    result = {
        "task": task.name,
        "generator": {"name": generator.name, "sha256": generator.sha256, "metric": generator.metric_name},
        "seed": config.seed,
        "init": {"return": curve[0], "episode_returns": returns[1].tolist()},
        "update": {
            "return": update_return, "episode_returns": returns[0].tolist(), "accepted": report.accepted,
            "reason": report.reason, "prompt": report.prompt, "seconds": report.seconds,
        },
        "ppo": {
            "return": curve[-1], "episode_returns": returns[-1].tolist(), "env_steps": env_steps,
            "curve": curve, "seconds": ppo_seconds, "hparams": asdict(hparams), "shape": asdict(shape),
        },
        "ppo_reaches_update_at": first_step_at_or_above(env_steps, curve, update_return),
        "episode": {
            "index": EPISODE, "start": np.asarray(data.start_states[EPISODE]).tolist(),
            "observation": task.traced_observation, "label": _traced_label(task), "limit": task.traced_limit,
            "traced": trajectory,
        },
        "config": asdict(config),
    }
    return save_result(result, config.out, plot_control if config.plot else None)


def format_control_table(result: dict) -> str:
    """The control demo's printed table."""
    up, ppo = result["update"], result["ppo"]
    budget = ppo["env_steps"][-1]
    rows = [
        ("random init", result["init"]["return"]),
        (f"1 generative update ({'accepted' if up['accepted'] else 'rejected: ' + str(up['reason'])})", up["return"]),
        (f"PPO, {budget:,} env steps", ppo["return"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  greedy return", *(f"{label:{width}}  {value:13.1f}" for label, value in rows)]
    at = result["ppo_reaches_update_at"]
    lines.append(f"PPO first reaches the update's return after {at:,} env steps" if at is not None
                 else f"PPO does not reach the update's return within {budget:,} env steps")
    lines.append(f"one generative update took {up['seconds']:.2f} s; PPO's {budget:,} env steps took "
                 f"{ppo['seconds']:.1f} s")
    return "\n".join(lines)


def plot_control(result: dict, path: Path) -> Path:
    """The traced observation over one episode before and after the update (and after PPO); PPO's return curve."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("the demo's PNG needs matplotlib: pip install matplotlib, or pass --no-plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep, ppo = result["episode"], result["ppo"]
    budget = ppo["env_steps"][-1]
    labels = {  # the init drawn wide underneath, so a rejected update (the same line) stays visible
        "init": ("random init", "tab:grey", 4.0),
        "update": ("1 generative update", "tab:blue", 1.5),
        "ppo": (f"PPO, {budget:,} env steps", "tab:orange", 1.5),
    }
    fig, (ax, ax_ppo) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for policy, (label, color, width) in labels.items():
        a = np.asarray(ep["traced"][policy], dtype=float)
        ax.plot(np.arange(len(a)), a, color=color, lw=width, label=f"{label} ({len(a)} steps)")
    limit = ep["limit"]
    if limit is not None:
        for sign in (1, -1):
            ax.axhline(sign * limit, color="red", ls="--", lw=1, label=f"episode ends beyond ±{limit:.4g}" if sign > 0 else None)
        ax.set_ylim(-1.5 * limit, 1.5 * limit)
    ax.set_xlabel("environment step")
    ax.set_ylabel(ep["label"])
    ax.set_title(f"one evaluation episode (number {ep['index'] + 1}), the same start for each policy", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)

    ax_ppo.plot(ppo["env_steps"], ppo["curve"], color="tab:orange", marker=".", label="PPO")
    ax_ppo.axhline(result["update"]["return"], color="tab:blue", ls="--", label="1 generative update")
    ax_ppo.axhline(result["init"]["return"], color="tab:grey", ls=":", label="random init")
    ax_ppo.set_xlabel("PPO environment steps")
    ax_ppo.set_ylabel(f"greedy return ({len(result['init']['episode_returns'])} episodes)")
    ax_ppo.set_title("PPO from the same random init", fontsize=10)
    ax_ppo.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.suptitle(control_headline(result))
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


def control_headline(result: dict) -> str:
    """What happened, in two lines: return before -> after the update, and its wall time against PPO's."""
    up, ppo = result["update"], result["ppo"]
    budget, at = ppo["env_steps"][-1], result["ppo_reaches_update_at"]
    verdict = "accepted" if up["accepted"] else "rejected"
    first = (f"{result['task']}: one generative update ({verdict}) took greedy return "
             f"{result['init']['return']:.0f} -> {up['return']:.0f} in {up['seconds']:.2f} s")
    if at is not None:  # PPO's time to there, pro rata of its whole run
        second = (f"PPO from the same init needs {at:,} env steps (~{ppo['seconds'] * at / budget:.1f} s) to match it; "
                  f"return {ppo['return']:.0f} after {budget:,} env steps ({ppo['seconds']:.1f} s)")
    else:
        second = f"PPO does not match it within {budget:,} env steps ({ppo['seconds']:.1f} s): return {ppo['return']:.0f}"
    return first + "\n" + second


def _traced_label(task) -> str:
    return task.traced_label or f"observation {task.traced_observation}"


# the names the demo dispatch imported before control tasks were general
run_cartpole_demo, format_cartpole_table, plot_cartpole = run_control_demo, format_control_table, plot_control
