"""Building a store: run ids and seeds, resume, the settings check, sharding, evaluation and writing."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from learned_opt import __version__, tasks
from learned_opt.errors import LearnedOptError, StoreError
from learned_opt.tasks import Task

from ..store import RunRecord, Store
from .config import CorpusConfig, CorpusSummary
from .family import FinishedRun, TaskFamily
from .supervised_family import SupervisedFamily
from .ppo_family import PPOFamily


def corpus_settings(config: CorpusConfig) -> dict:
    """What makes a store's runs what they are, recorded in ``store.json`` (``runs`` may grow)."""
    return family_for(tasks.get(config.task)).settings(config)


_SETTING_NAMES = {"seed": "--seed", "epochs": "--epochs", "gpt_recipe": "--gpt-recipe",
                  "train_examples": "--train-examples", "checkpoints": "--checkpoints", "env_steps": "--env-steps",
                  "eval_examples": "--eval-examples"}


def check_settings(store: Store, settings: dict) -> None:
    """:class:`StoreError` if ``store`` was built with other settings (a store without recorded
    settings, e.g. one made by hand, is accepted)."""
    recorded = store.settings
    if recorded is None:
        return
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if key == "ranges" and isinstance(old, dict) and isinstance(new, dict):
            name = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            what = f"hyperparameter range {name} = {old.get(name)}, not {new.get(name)}"
        else:
            what = f"{_SETTING_NAMES.get(key, key)} {'unset' if old is None else old}, not {'unset' if new is None else new}"
        raise StoreError(
            f"{store.root} was built with {what}: use the store's settings to add runs to it, "
            "or choose a new --out folder"
        )


def families() -> list[TaskFamily]:

    return [SupervisedFamily(), PPOFamily()]


def family_for(task: Task) -> TaskFamily:
    """The family that trains ``task``'s corpus; :class:`LearnedOptError` if none does."""
    for family in families():
        if family.accepts(task):
            return family
    raise LearnedOptError(
        f"the corpus builder trains {' and '.join(f.name for f in families())}; task {task.name!r} is of kind "
        f"{getattr(task, 'kind', None)!r}: derive it from learned_opt.tasks.SupervisedTask or ControlTask"
    )


def build_corpus(
    config: CorpusConfig, *, store: Store | None = None, data: Any = None, rank: int = 0, world_size: int = 1,
) -> CorpusSummary:
    """Train the runs of ``config`` that this rank owns and are not yet in the store; write each.

    ``store`` and ``data`` may be given (already created / loaded); otherwise they are made here.
    Finished and dropped runs are skipped, so calling this again resumes an interrupted job.
    """
    if config.runs < 0 or config.batch_runs < 1 or config.checkpoints < 2:
        raise LearnedOptError("--runs must be >= 0, --batch-runs >= 1 and --checkpoints >= 2")
    task = tasks.get(config.task)
    family = family_for(task)
    family.check(config)
    if data is None:
        data = task.load_data(config.data_root, download=config.download)
    settings = family.settings(config)
    if store is None:
        store = Store.create(config.out, task, settings=settings)
    if store.task_name != task.name:
        raise StoreError(f"{store.root} is a store of task {store.task_name!r}, not {task.name!r}")
    check_settings(store, settings)
    device = torch.device(config.device)
    mine = [r for r in range(config.runs) if r % world_size == rank]
    todo = [r for r in mine if not store.is_done(r)]
    summary = CorpusSummary(skipped=len(mine) - len(todo))
    plans = family.plan(todo, config, data)
    train = family.trainer(task, config, data, device)
    eval_data = family.evaluation_data(data, config)
    eval_data = eval_data.to(device) if hasattr(eval_data, "to") and device.type != "cpu" else eval_data
    info = {"rank": rank, "world_size": world_size, "device": str(device), "learned_opt": __version__}
    start = time.perf_counter()
    bar = tqdm(total=float(len(plans)), unit="run", desc=f"corpus {task.name}", dynamic_ncols=True,
               disable=not config.progress or rank != 0, bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} "
               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def finish(runs: list[FinishedRun]) -> None:
        kept = [r for r in runs if r.params is not None]
        if kept:
            flat = torch.cat([r.params for r in kept])  # [n*K, P]
            with torch.random.fork_rng(devices=[]):  # an evaluation that builds modules leaves the caller's RNG alone
                metrics = task.evaluate(flat.to(device), eval_data)
            offset = 0
            for r in kept:
                k = r.params.shape[0]
                m = {name: v[offset : offset + k].float().cpu() for name, v in metrics.items()}
                offset += k
                record = RunRecord(r.params, r.steps, m, r.plan.hparams, r.plan.seed, {**info, **r.info})
                if store.write_run(r.plan.run_id, record, exist_ok=True):
                    summary.written += 1
                    summary.checkpoints += k
                    summary.bytes += store.run_path(r.plan.run_id).stat().st_size
        for r in runs:
            if r.params is None:
                store.mark_dropped(r.plan.run_id, seed=r.plan.seed, hparams=r.plan.hparams, reason=r.dropped,
                                   step=r.dropped_at)
                summary.dropped += 1
                summary.dropped_ids.append(r.plan.run_id)
        bar.set_postfix(written=summary.written, dropped=summary.dropped, refresh=False)

    def advance(runs: float) -> None:  # float progress in runs; never past the total
        bar.update(max(0.0, min(runs, bar.total - bar.n)))

    try:
        for group in family.groups(plans, config.batch_runs):
            train(group, finish, advance)
        advance(bar.total)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary
