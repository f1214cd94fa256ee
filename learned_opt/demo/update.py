"""What ``learned-opt demo`` runs (:class:`DemoConfig`), and the one generative update both demos make."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import tasks
from ..errors import ArchitectureMismatchError, ConfigError, WeightsError
from ..fileio import atomic_write
from ..recipes import ADAM_LR
from ..tasks import Task


DEFAULT_TASK = "cartpole-mlp"  # needs no download


@dataclass
class DemoConfig:
    """What ``learned-opt demo`` runs (one field per command-line option)."""

    task: str = DEFAULT_TASK  # a registered name, path/to/file.py:ClassName or package.module:ClassName
    generator: str | None = None  # registry name or manifest path; None: the task's shipped generator
    data_root: str | None = None  # else $LEARNED_OPT_DATA (supervised tasks)
    download: bool = False
    out: str = "learned-opt-demo"
    seed: int = 0
    steps: int = 300  # Adam / SGD steps (supervised tasks)
    eval_every: int = 10  # baseline test metrics every this many steps (supervised tasks)
    ppo_env_steps: int = 50_000  # PPO's budget (control tasks), rounded down to whole updates
    sampling_steps: int | None = None  # None: the generator's own sampler
    method: str | None = None
    plot: bool = True


def load_demo_generator(config: DemoConfig, task: Task):
    """``--generator``, else the task's shipped generator; a missing shipped one is a one-line error."""
    from ..pretrained import list_pretrained, load_generator

    if config.generator is None and task.name not in {g["name"] for g in list_pretrained()}:
        source = tasks.source_of(task)
        raise WeightsError(
            f"no {task.name} generator ships with this learned-opt yet; pass one with --generator PATH.json, or make "
            f"one with `learned-opt corpus --task {source} --out CORPUS/` and `learned-opt train --store CORPUS/ "
            f"--out GEN/` (then --generator GEN/{task.name}.json; see docs/your-own-model.md)"
        )
    return load_generator(config.generator or task.name)


def demo_optimizer(model: torch.nn.Module, generator, task: Task, config: DemoConfig):
    """The demo's :class:`GptOptimizer`; a generator for another architecture is a one-line error."""
    from ..optimizer import GptOptimizer

    try:
        return GptOptimizer(model.named_parameters(), generator, lr=ADAM_LR, sampling_steps=config.sampling_steps,
                            sampling_method=config.method, seed=config.seed)
    except ArchitectureMismatchError:
        try:  # say it the command line's way: the generator's task, or another generator
            tasks.for_generator(generator, task)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (leave --task out to run the generator's own)") from None
        raise


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


def output_names(task: str) -> tuple[str, str]:
    """The files the demo of the task named ``task`` writes: ``demo_TASK.json`` and ``demo_TASK.png``
    (one folder holds the demos of several tasks side by side)."""
    return f"demo_{task}.json", f"demo_{task}.png"


def save_result(result: dict, out: str | Path, plot: Callable[[dict, Path], Path] | None) -> dict:
    """Write ``result`` as ``out/demo_TASK.json`` (atomically) and, when ``plot`` is given, its picture
    as ``out/demo_TASK.png`` (recorded under ``result["plot"]``); returns ``result``."""
    json_name, png_name = output_names(result["task"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / json_name, lambda p: p.write_text(text, encoding="utf-8"))
    if plot is not None:
        result["plot"] = str(plot(result, out / png_name))
    return result
