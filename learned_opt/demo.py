"""One generative update on a random network, next to the usual way of training it.

``learned-opt demo`` runs one of two tasks (``--task``):

* ``cartpole-mlp`` (the default; needs no download): a fresh CartPole policy, one
  :meth:`GptOptimizer.generate` update, and PPO training the same init; the pole's angle over one
  episode before and after, as ``demo_cartpole.png`` (see :mod:`learned_opt.demo_cartpole`).
* ``mnist-mlp``: a fresh MNIST MLP, one update, then Adam and SGD training the same init.

The MNIST demo builds a fresh ``mnist-mlp`` network (PyTorch's default init, seeded), makes
one :meth:`GptOptimizer.generate` update prompted with the generator's best prompt (the closure
measures the full-test-set metric), then trains the *same* init for a few hundred steps with

* Adam, lr 1e-3, batch 128 (constant learning rate);
* SGD with G.pt's recipe: Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, cosine
  schedule over 25 epochs stepped once per epoch;

prints a short table (test loss and error of the init, the update, Adam and SGD after ``k`` steps,
and the step at which Adam first matches the update) and saves a plot and a JSON beside it.

The baselines are a plain ``nn.Module`` + ``torch.optim`` loop (:func:`train_baseline`; PPO in
:mod:`learned_opt.ppo`), so the demo needs nothing from ``pretrain``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import tasks
from .errors import ArchitectureMismatchError, ConfigError, WeightsError
from .fileio import atomic_write
from .layout import compare_signatures
from .tasks import Task

ADAM_LR = 1e-3
BATCH_SIZE = 128
# G.pt's SGD recipe (Peebles et al. 2022): Nesterov 0.9, lr 0.1, wd 5e-4, cosine per epoch over 25 epochs
SGD_RECIPE = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 25}
BASELINES = ("adam", "sgd")
DEMO_TASKS = ("cartpole-mlp", "mnist-mlp")  # the first is the default


# ---------------------------------------------------------------------- the baselines


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


# ---------------------------------------------------------------------- the demo


@dataclass
class DemoConfig:
    """What ``learned-opt demo`` runs (one field per command-line option)."""

    task: str = DEMO_TASKS[0]
    generator: str | None = None  # registry name or manifest path; None: the task's shipped generator
    data_root: str | None = None  # else $LEARNED_OPT_DATA (mnist-mlp)
    download: bool = False
    out: str = "learned-opt-demo"
    seed: int = 0
    steps: int = 300  # Adam / SGD steps (mnist-mlp)
    eval_every: int = 10  # baseline test metrics every this many steps (mnist-mlp)
    ppo_env_steps: int = 50_000  # PPO's budget (cartpole-mlp), rounded down to whole updates
    sampling_steps: int | None = None  # None: the generator's own sampler
    method: str | None = None
    plot: bool = True


def load_demo_generator(config: DemoConfig, task: Task):
    """``--generator``, else the task's shipped generator; a missing shipped one is a one-line error."""
    from .pretrained import list_pretrained, load_generator

    if config.generator is None and task.name not in {g["name"] for g in list_pretrained()}:
        raise WeightsError(
            f"no {task.name} generator ships with this learned-opt yet; pass one with --generator PATH.json "
            f"(the manifest `learned-opt train` writes for a {task.name} corpus)"
        )
    return load_generator(config.generator or task.name)


def demo_optimizer(model: torch.nn.Module, generator, task: Task, config: DemoConfig):
    """The demo's :class:`GptOptimizer`; a generator for another architecture is a one-line error."""
    from .optimizer import GptOptimizer

    try:
        return GptOptimizer(model.named_parameters(), generator, lr=ADAM_LR, sampling_steps=config.sampling_steps,
                            sampling_method=config.method, seed=config.seed)
    except ArchitectureMismatchError:
        diffs = compare_signatures(generator.layout.signature, task.layout().signature)
        hint = (f"pass --task {generator.task}" if generator.task in DEMO_TASKS and generator.task != task.name
                else f"pass a {task.name} generator with --generator PATH.json")
        raise ArchitectureMismatchError(
            f"generator {generator.name!r} (task {generator.task or '?'}, {generator.layout.num_params:,} parameters) "
            f"does not fit the {task.name} network ({task.num_params:,} parameters): {'; '.join(diffs)}; {hint}"
        ) from None


def one_update(task: Task, data, config) -> tuple[Any, torch.nn.Module, Any, torch.Tensor, Any]:
    """A fresh seeded network of ``task`` given one ``GptOptimizer.generate`` update, the closure
    measuring the generator's metric on ``data``: ``(generator, model, layout, init [P], report)``."""
    generator = load_demo_generator(config, task)
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left alone
        torch.manual_seed(config.seed)
        model = task.build_model()
    init = layout.flatten_module(model)  # [P]
    name = generator.metric_name

    def closure() -> dict[str, torch.Tensor]:
        return task.evaluate(layout.flatten_module(model)[None], data, [name])  # name -> [1]

    report = demo_optimizer(model, generator, task, config).generate(closure)
    return generator, model, layout, init, report


def run_demo(config: DemoConfig, data=None) -> dict:
    """Run the demo; returns the results (also written to ``out/demo.json``, or for
    ``cartpole-mlp`` to ``out/demo_cartpole.json``)."""
    if config.task not in DEMO_TASKS:
        raise ConfigError(f"the demo runs {' or '.join(DEMO_TASKS)}, not {config.task!r}")
    if config.task == "cartpole-mlp":
        from .demo_cartpole import run_cartpole_demo

        return run_cartpole_demo(config)
    if config.steps < 1 or config.eval_every < 1:
        raise ConfigError("--steps and --eval-every must be >= 1")
    task = tasks.get(config.task)
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
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "demo.json", lambda p: p.write_text(text, encoding="utf-8"))
    if config.plot:
        result["plot"] = str(plot_demo(result, out / "demo.png"))
    return result


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
    lines.append(
        f"Adam first reaches the update's test loss at step {at}" if at is not None
        else f"Adam does not reach the update's test loss within {k} steps"
    )
    lines.append(f"one generative update took {up['seconds']:.2f} s; Adam "
                 f"{result['baselines']['adam']['seconds_per_step'] * 1e3:.2f} ms per step")
    return "\n".join(lines)


def plot_demo(result: dict, path: Path) -> Path:
    """Test loss against steps for Adam and SGD, with the update's test loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for o, label in (("adam", "Adam lr 1e-3"), ("sgd", "SGD (G.pt recipe)")):
        c = result["baselines"][o]
        ax.plot(c["steps"], c["test_loss"], label=label)
    ax.axhline(result["update"]["test_loss"], color="k", ls="--", label="1 generative update")
    ax.axhline(result["init"]["test_loss"], color="grey", ls=":", label="random init")
    ax.set_xlabel("training steps (batch 128)")
    ax.set_ylabel(f"{result['task']} test loss")
    ax.set_title(f"{result['task']}: generator {result['generator']['name']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=DEMO_TASKS[0], choices=DEMO_TASKS,
                        help=f"cartpole-mlp needs no download; mnist-mlp reads MNIST (default: {DEMO_TASKS[0]})")
    parser.add_argument("--generator", default=None,
                        help="shipped generator name or path to a .json manifest (default: the task's name)")
    parser.add_argument("--data-root", default=None, help="dataset root for mnist-mlp (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    parser.add_argument("--out", default="learned-opt-demo",
                        help="folder for the PNG and JSON (demo_cartpole.* or demo.*)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and the sampler")
    parser.add_argument("--steps", type=int, default=300, help="mnist-mlp: Adam and SGD steps (default: 300)")
    parser.add_argument("--eval-every", type=int, default=10, help="mnist-mlp: baseline test metrics every N steps")
    parser.add_argument("--ppo-env-steps", type=int, default=50_000,
                        help="cartpole-mlp: PPO's budget in environment steps (default: 50000)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's own)")
    parser.add_argument("--method", default=None, help="sampler: ddim, ddpm or dpm++2m (default: the generator's own)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(args: argparse.Namespace) -> int:
    config = DemoConfig(
        task=args.task, generator=args.generator, data_root=args.data_root, download=args.download, out=args.out,
        seed=args.seed, steps=args.steps, eval_every=args.eval_every, ppo_env_steps=args.ppo_env_steps,
        sampling_steps=args.sampling_steps, method=args.method, plot=not args.no_plot,
    )
    result = run_demo(config)
    if config.task == "cartpole-mlp":
        from .demo_cartpole import JSON_NAME as written, format_cartpole_table as table
    else:
        table, written = format_table, "demo.json"
    print(table(result))
    print(f"wrote {Path(config.out) / written}" + (f" and {result['plot']}" if "plot" in result else ""))
    return 0
