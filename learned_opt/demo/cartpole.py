"""The ``cartpole-mlp`` demo: one generative update of a random CartPole policy, next to PPO.

``learned-opt demo`` (``--task cartpole-mlp``, the default) builds a fresh 4-32-32-2 policy
(PyTorch's default init, seeded), measures its greedy return over the task's 10 fixed episodes,
makes one :meth:`GptOptimizer.generate` update prompted with the generator's best prompt (the
closure measures the same return), then trains the *same* init with PPO
(:func:`learned_opt.ppo.train_ppo`) for ``--ppo-env-steps`` environment steps and reports the
environment steps PPO needed to reach the update's return.

It writes ``demo_cartpole.json`` (the numbers) and ``demo_cartpole.png``: the pole's angle over
the first evaluation episode for the random policy, the updated one and PPO's final one, with
CartPole's failure angle (±12°) drawn, next to PPO's greedy return against environment steps.
Nothing is downloaded: CartPole is simulated by gymnasium.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import tasks
from ..errors import ConfigError
from ..fileio import atomic_write
from ..ppo import PPOConfig, train_ppo
from .update import DemoConfig, one_update


JSON_NAME, PNG_NAME = "demo_cartpole.json", "demo_cartpole.png"
FAILURE_ANGLE = 12 * 2 * math.pi / 360  # rad; CartPole-v1 ends an episode beyond it (or at |x| > 2.4)
SECONDS_PER_STEP = 0.02  # CartPole's tau
EPISODE = 0  # the evaluation episode drawn in the picture
POLICIES = ("init", "update", "ppo")  # the rows of the table and the lines of the picture


def first_step_at_or_above(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first of ``steps`` whose value is ``>= target`` (None if never, or if target is NaN)."""
    for s, v in zip(steps, values):
        if v >= target:
            return int(s)
    return None


def run_cartpole_demo(config: "DemoConfig") -> dict:
    """Run the CartPole demo; returns the results (also written to ``out/demo_cartpole.json``)."""

    task = tasks.get("cartpole-mlp")
    ppo_config = PPOConfig()
    if config.ppo_env_steps < ppo_config.steps_per_update:
        raise ConfigError(f"--ppo-env-steps must be >= {ppo_config.steps_per_update} (one PPO update of "
                          f"{ppo_config.envs} environments x {ppo_config.horizon} steps), got {config.ppo_env_steps}")
    data = task.load_data()
    generator, model, layout, init, report = one_update(task, data, config)
    updated = layout.flatten_module(model)
    ppo = train_ppo(task, init, config.ppo_env_steps, ppo_config, seed=config.seed)

    # one batched rollout: the updated policy, then PPO's policies (the first of which is the init)
    returns, angles = task.rollout(torch.cat([updated[None], ppo.policies]), data)  # [1+K, E], [T, 1+K, E]
    mean = returns.mean(-1).tolist()
    update_return, curve = mean[0], mean[1:]
    rows = {"init": 1, "update": 0, "ppo": len(mean) - 1}  # policy -> index in the rollout
    trajectory = {}
    for policy, i in rows.items():
        a = angles[:, i, EPISODE]
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
            "return": curve[-1], "episode_returns": returns[-1].tolist(), "env_steps": ppo.env_steps,
            "curve": curve, "seconds": ppo.seconds, "config": asdict(ppo_config),
        },
        "ppo_reaches_update_at": first_step_at_or_above(ppo.env_steps, curve, update_return),
        "episode": {
            "index": EPISODE, "start_state": data.start_states[EPISODE].tolist(), "seconds_per_step": SECONDS_PER_STEP,
            "failure_angle_rad": FAILURE_ANGLE, "pole_angle_rad": trajectory,
        },
        "config": asdict(config),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / JSON_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    if config.plot:
        result["plot"] = str(plot_cartpole(result, out / PNG_NAME))
    return result


def format_cartpole_table(result: dict) -> str:
    """The CartPole demo's printed table."""
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


def plot_cartpole(result: dict, path: Path) -> Path:
    """Pole angle over one episode before and after the update (and after PPO); PPO's return curve."""
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
        a = np.degrees(np.asarray(ep["pole_angle_rad"][policy], dtype=float))
        ax.plot(np.arange(len(a)) * ep["seconds_per_step"], a, color=color, lw=width,
                label=f"{label} ({len(a)} steps)")
    limit = math.degrees(ep["failure_angle_rad"])
    for sign in (1, -1):
        ax.axhline(sign * limit, color="red", ls="--", lw=1, label="failure angle (±12°)" if sign > 0 else None)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pole angle (degrees)")
    ax.set_ylim(-1.5 * limit, 1.5 * limit)
    ax.set_title(f"pole angle, evaluation episode {ep['index'] + 1}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)

    ax_ppo.plot(ppo["env_steps"], ppo["curve"], color="tab:orange", marker=".", label="PPO")
    ax_ppo.axhline(result["update"]["return"], color="tab:blue", ls="--", label="1 generative update")
    ax_ppo.axhline(result["init"]["return"], color="tab:grey", ls=":", label="random init")
    ax_ppo.set_xlabel("PPO environment steps")
    ax_ppo.set_ylabel("greedy return (10 episodes)")
    ax_ppo.set_ylim(0, 510)
    ax_ppo.set_title("PPO from the same init")
    ax_ppo.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    fig.suptitle(
        f"CartPole, generator {result['generator']['name']}: greedy return {result['init']['return']:.1f} at init, "
        f"{result['update']['return']:.1f} after one update, {ppo['return']:.1f} after PPO"
    )
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path
