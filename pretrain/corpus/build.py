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
from .warm import WarmStart


def corpus_settings(config: CorpusConfig) -> dict:
    """What makes a store's runs what they are, recorded in ``store.json`` (``runs`` may grow)."""
    task = tasks.get(config.task)
    settings = family_for(task).settings(config)
    if config.warm_start is not None:
        settings["warm_start"] = WarmStart.load(config.warm_start, task, config.warm_from,
                                                first_checkpoint=config.warm_first).settings()
    return settings


_SETTING_NAMES = {"seed": "--seed", "epochs": "--epochs", "gpt_recipe": "--gpt-recipe",
                  "train_examples": "--train-examples", "checkpoints": "--checkpoints", "env_steps": "--env-steps",
                  "eval_examples": "--eval-examples", "eval_on": "--eval-on", "warm_start": "--warm-start"}


def _describe(key: str, value) -> str:
    if value is None:
        return "unset"
    if key == "warm_start" and isinstance(value, dict):
        first = f" --warm-first-checkpoint {value['first_checkpoint']}" if value.get("first_checkpoint") else ""
        return f"{value.get('generator')} (sha256 {str(value.get('sha256'))[:12]}…) from run {value.get('from_run')}{first}"
    return str(value)


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
        elif key == "warm_start" and isinstance(old, dict) and isinstance(new, dict) and _describe(key, old) == _describe(key, new):
            name = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))  # the same generator
            raise StoreError(
                f"{store.root} was built with --warm-start {_describe(key, old)} whose {name} was {old.get(name)}, "
                f"not {new.get(name)}: give the generator its recorded {name} again (its manifest's "
                f"\"sampling\" entry, or a copy of the generator with it), or choose a new --out folder"
            )
        else:
            what = f"{_SETTING_NAMES.get(key, key)} {_describe(key, old)}, not {_describe(key, new)}"
        raise StoreError(
            f"{store.root} was built with {what}: use the store's settings to add runs to it, "
            "or choose a new --out folder"
        )


def accept_settings(store: Store, settings: dict, runs: int) -> None:
    """:func:`check_settings` for a call that builds runs ``0 .. runs-1``, with one growth allowed: a store of
    plain runs takes a warm start (``settings["warm_start"]``) for run ids past every run it holds, and
    records it; a store with a warm start takes plain runs below its first warm run id."""
    recorded, warm = store.settings, settings.get("warm_start")
    if recorded is not None and recorded != settings and not store.run_ids() and not store.dropped_ids():
        store.record_settings(settings)  # nothing was built under the old ones (a first call that failed)
        return
    old = (recorded or {}).get("warm_start")
    plain = {k: v for k, v in settings.items() if k != "warm_start"}
    if recorded is None and warm is not None:
        raise StoreError(f"{store.root} records no corpus settings (a store made by hand): --warm-start needs a store "
                         "built by `learned-opt corpus`, which records which runs start warm; choose a new --out folder")
    if recorded is not None and warm is not None and old is None:
        check_settings(store, plain)
        last = max(store.run_ids() + store.dropped_ids(), default=-1)
        if warm["from_run"] <= last:
            raise StoreError(f"{store.root} holds runs up to id {last} that start from their inits: pass "
                             f"--warm-from {last + 1} (or higher) to add warm-started runs after them, or choose a new --out folder")
        store.record_settings(settings)
    elif warm is None and old is not None and runs <= old["from_run"]:
        check_settings(store, {**plain, "warm_start": old})
    else:
        check_settings(store, settings)


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
    config.validate()
    task = tasks.get(config.task)
    family = family_for(task)
    family.check(config)
    if data is None:
        data = task.load_data(config.data_root, download=config.download)
    device = torch.device(config.device)
    eval_data = family.evaluation_data(data, config)
    eval_data = eval_data.to(device) if hasattr(eval_data, "to") and device.type != "cpu" else eval_data
    warm = None if config.warm_start is None else WarmStart.load(config.warm_start, task, config.warm_from,
                                                                 eval_data, device=device,
                                                                 first_checkpoint=config.warm_first)
    settings = {**family.settings(config), **({"warm_start": warm.settings()} if warm else {})}
    if store is None:
        store = Store.create(config.out, task, settings=settings)
    if store.task_name != task.name:
        raise StoreError(f"{store.root} is a store of task {store.task_name!r}, not {task.name!r}")
    accept_settings(store, settings, config.runs)
    mine = [r for r in range(config.runs) if r % world_size == rank]
    todo = [r for r in mine if not store.is_done(r)]
    summary = CorpusSummary(skipped=len(mine) - len(todo))
    plans = family.plan(todo, config, data)
    train = family.trainer(task, config, data, device, start=warm)
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
