"""The demo of a supervised task (``mnist-mlp``, or any :class:`~learned_opt.tasks.SupervisedTask`):
one update next to Adam and SGD, its table and plot (``demo_TASK.json``, ``demo_TASK.png``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import cast

from .. import tasks
from ..errors import ConfigError
from ..tasks import SupervisedTask
from .baselines import BASELINES, first_step_at_or_below, train_baseline
from .update import DemoConfig, one_update, save_result


def run_supervised_demo(config: DemoConfig, data=None) -> dict:
    """Run the demo of ``config.task``, a supervised task; returns the results (also written to
    ``out/demo_TASK.json``)."""
    if config.steps < 1 or config.eval_every < 1:
        raise ConfigError("--steps and --eval-every must be >= 1")
    task = cast(SupervisedTask, tasks.get(config.task))  # a supervised task: run_demo chooses this demo by kind
    if data is None:  # first: without data there is nothing to show, whatever the generator
        data = task.load_data(config.data_root, download=config.download)
    generator, model, layout, init, report = one_update(task, data, config)
    before = task.evaluate(init[None], data, ["test_loss", "test_error"])
    after = task.evaluate(layout.flatten_module(model)[None], data, ["test_loss", "test_error"])
    eval_steps = list(range(0, config.steps + 1, config.eval_every)) + [config.steps]
    curves = {
        o: train_baseline(task, init, data, o, config.steps, eval_steps, seed=config.seed)
        for o in BASELINES
    }
    gen_loss = float(after["test_loss"][0])
    result = {
        "task": task.name,
        "generator": {"name": generator.name, "sha256": generator.sha256, "metric": generator.metric_name},
        "seed": config.seed,
        "init": {"test_loss": float(before["test_loss"][0]), "test_error": float(before["test_error"][0])},
        "update": {
            "test_loss": gen_loss, "test_error": float(after["test_error"][0]), "accepted": report.accepted,
            "reason": report.reason, "prompt": report.prompt, "seconds": report.seconds,
        },
        "baselines": {o: asdict(c) for o, c in curves.items()},
        "adam_matches_update_at": first_step_at_or_below(curves["adam"].steps, curves["adam"].test_loss, gen_loss),
        "config": asdict(config),
    }
    return save_result(result, config.out, plot_demo if config.plot else None)


def format_table(result: dict) -> str:
    """The demo's printed table."""
    k = result["config"]["steps"]
    up = result["update"]
    rows = [("random init", result["init"]),
            (f"1 generative update ({'accepted' if up['accepted'] else 'rejected: ' + str(up['reason'])})", up)]
    for o, label in (("adam", "Adam lr 1e-3"), ("sgd", "SGD (G.pt recipe)")):
        c = result["baselines"][o]
        rows.append((f"{label}, {c['steps'][-1]} steps", {"test_loss": c["test_loss"][-1], "test_error": c["test_error"][-1]}))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  test loss  test error", *(
        f"{label:{width}}  {m['test_loss']:9.4f}  {m['test_error']:9.2f}%" for label, m in rows)]
    at = result["adam_matches_update_at"]
    if not up["accepted"]:  # the network kept its init: nothing to compare Adam with
        lines.append("the update was rejected, so the network kept its init; no comparison with Adam")
    else:
        lines.append(
            f"Adam first reaches the update's test loss at step {at}" if at is not None
            else f"Adam does not reach the update's test loss within {k} steps"
        )
    lines.append(f"one generative update took {up['seconds']:.2f} s; Adam "
                 f"{result['baselines']['adam']['seconds_per_step'] * 1e3:.2f} ms per step")
    return "\n".join(lines)


def supervised_headline(result: dict) -> str:
    """What happened, in two lines: test error before -> after the update, and its wall time against Adam's steps."""
    up, adam = result["update"], result["baselines"]["adam"]
    verdict = "accepted" if up["accepted"] else "rejected"
    first = (f"{result['task']}: one generative update ({verdict}): test error "
             f"{result['init']['test_error']:.1f}% -> {up['test_error']:.1f}% in {up['seconds']:.2f} s")
    at = result["adam_matches_update_at"]
    if at is not None:
        second = f"Adam from the same init needs {at:,} steps (~{at * adam['seconds_per_step']:.2f} s) to match its test loss"
    else:
        second = (f"Adam does not match its test loss within {adam['steps'][-1]:,} steps "
                  f"(~{adam['steps'][-1] * adam['seconds_per_step']:.2f} s)")
    return first + "\n" + second


def plot_demo(result: dict, path: Path) -> Path:
    """Test loss against steps for Adam and SGD, with the update's test loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o, label in (("adam", "Adam lr 1e-3"), ("sgd", "SGD (G.pt recipe)")):
        c = result["baselines"][o]
        ax.plot(c["steps"], c["test_loss"], label=label)
    ax.axhline(result["update"]["test_loss"], color="k", ls="--", label="1 generative update")
    ax.axhline(result["init"]["test_loss"], color="grey", ls=":", label="random init")
    ax.set_xlabel("training steps (batch 128)")
    ax.set_ylabel("test loss (cross-entropy, nats)")
    ax.set_title(supervised_headline(result), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
