"""The corpus builder's family of supervised tasks: any :class:`~learned_opt.tasks.SupervisedTask`."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any, Callable, Sequence

import torch

from learned_opt import tasks
from learned_opt.errors import LearnedOptError
from learned_opt.tasks import Task

from .config import CorpusConfig
from .family import TaskFamily
from .plan import HParamRanges, RunPlan, plan_runs
from .trainer import BatchedTrainer
from .warm import WarmStart


def corpus_ranges(config: CorpusConfig) -> HParamRanges:
    """The ranges runs are drawn from: ``config.ranges``, else the task's ``corpus_ranges``, else the
    defaults; with ``config.init_scale``, that range of init scales."""
    ranges = config.ranges or tasks.get(config.task).corpus_ranges or HParamRanges()
    return ranges if config.init_scale is None else replace(ranges, init_scale=tuple(config.init_scale))


def _recorded_ranges(config: CorpusConfig) -> dict:
    """The ranges as the store records them; an init scale only where one is drawn, so that stores
    built before it existed still take their own settings on resume."""
    ranges = json.loads(json.dumps(asdict(corpus_ranges(config))))
    if ranges["init_scale"] == [1.0, 1.0]:
        del ranges["init_scale"]
    return ranges


def _settings(config: CorpusConfig) -> dict:
    return {
        "seed": config.seed,
        "epochs": config.epochs,
        "gpt_recipe": config.gpt_recipe,
        "train_examples": config.train_examples,
        "checkpoints": config.checkpoints,
        "ranges": _recorded_ranges(config),
        **({"eval_examples": config.eval_examples} if config.eval_examples is not None else {}),
        **({"eval_on": config.eval_on} if config.eval_on != "test" else {}),
    }


def _split(data: Any, config: CorpusConfig) -> Any:
    """The data the runs see: the task's own, or with ``--eval-on validation`` its validation split
    (training examples held out in place of the test set; the runs train on the rest)."""
    return tasks.get(config.task).validation_data(data) if config.eval_on == "validation" else data


def _training_tensors(data: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not (hasattr(data, "train_x") and hasattr(data, "train_y")):
        raise LearnedOptError("the corpus builder needs a task whose data has train_x and train_y tensors")
    x, y = data.train_x, data.train_y
    if limit is not None:
        if limit < 1:
            raise LearnedOptError(f"--train-examples must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    return x, y


class SupervisedFamily(TaskFamily):
    """Supervised tasks, trained by :class:`BatchedTrainer`."""

    name = "supervised tasks"

    def accepts(self, task: Task) -> bool:
        return task.kind == "supervised"

    def check(self, config: CorpusConfig) -> None:
        if config.epochs is not None and config.epochs < 1:
            raise LearnedOptError(f"--epochs must be >= 1, got {config.epochs}")
        if config.env_steps is not None:
            raise LearnedOptError("--env-steps applies to control tasks; use --epochs for this task")
        if config.ppo_ranges is not None:
            raise LearnedOptError("--lr-range applies to control tasks; a supervised task's ranges are its corpus_ranges")
        if config.eval_examples is not None and config.eval_examples < 1:
            raise LearnedOptError(f"--eval-examples must be >= 1, got {config.eval_examples}")
        if config.eval_on not in ("test", "validation"):
            raise LearnedOptError(f"--eval-on takes test or validation, got {config.eval_on!r}")

    def evaluation_data(self, data: Any, config: CorpusConfig) -> Any:
        """With ``--eval-examples N``: the first N test examples, and the first N training examples
        for ``train_loss`` (evaluating 200 checkpoints of a CNN on the whole test set can cost more
        than training the run); with ``--eval-on validation``, the task's validation split in place of
        the test set (MNIST: the last 5,000 training images), the metric that periodic mode's guard
        measures."""
        data, n = _split(data, config), config.eval_examples
        if n is None:
            return data
        return type(data)(data.train_x[:n], data.train_y[:n], data.test_x[:n], data.test_y[:n])

    def settings(self, config: CorpusConfig) -> dict:
        return _settings(config)

    def plan(self, run_ids: Sequence[int], config: CorpusConfig, data: Any) -> list[RunPlan]:
        num_examples = len(_training_tensors(_split(data, config), config.train_examples)[0])
        return plan_runs(run_ids, base_seed=config.seed, num_examples=num_examples, ranges=corpus_ranges(config),
                         gpt_recipe=config.gpt_recipe, epochs=config.epochs, num_checkpoints=config.checkpoints)

    def groups(self, plans: list[RunPlan], batch_runs: int) -> list[list[RunPlan]]:
        return _batches(plans, batch_runs)

    def trainer(self, task: Task, config: CorpusConfig, data: Any, device: torch.device,
                start: WarmStart | None = None) -> Callable:
        train_x, train_y = _training_tensors(_split(data, config), config.train_examples)
        return BatchedTrainer(task, train_x, train_y, device, config.gradient, start).train


def _batches(plans: list[RunPlan], size: int) -> list[list[RunPlan]]:
    """Runs grouped by batch size, each group cut into batches of runs with similar epochs."""
    by_batch: dict[int, list[RunPlan]] = {}
    for p in plans:
        by_batch.setdefault(p.hparams["batch_size"], []).append(p)
    out = []
    for _, group in sorted(by_batch.items()):
        group.sort(key=lambda p: (p.hparams["epochs"], p.run_id))
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out
