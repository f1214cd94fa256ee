"""The benchmark itself: every init, base and configuration of ``--mode periodic``, written to
``bench.json``; :func:`run_bench` runs either mode."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from learned_opt import tasks
from learned_opt.errors import ConfigError
from learned_opt.lopt import load_rule
from learned_opt.pretrained import LoadedGenerator, load_generator
from learned_opt.selection import check_candidates, check_rank

from ..evaluate import init_params
from .config import (
    BASE_LABEL,
    LOSS_METRICS,
    BenchConfig,
    LoptBenchConfig,
    applicable,
    describe_prompt,
    named_recipe,
    parse_prompt,
)
from .lopt import run_lopt
from .report import finish_result, plot_periodic
from .runs import Run, eval_grid, load_split, train_run
from .summaries import curve_summary, init_row, summarise, target_loss


def config_label(every: int | None) -> str:
    return BASE_LABEL if every is None else f"every={every}"


def run_bench(config: BenchConfig | LoptBenchConfig, data=None) -> dict:
    """Run the benchmark of ``config.mode``; returns the results (also written to ``out/bench.json``)."""
    return MODE_RUNNERS[config.mode](config, data)


def run_periodic(config: BenchConfig, data=None) -> dict:
    """The base alone and the base inside a periodic GptOptimizer, on the same inits."""
    t_start = time.perf_counter()
    rule = load_rule(config.weights) if "lopt" in config.bases else None  # bad weights fail before any work
    recipes = {b: named_recipe(b, rule) for b in config.bases}
    gen = load_generator(config.generator)
    task = bench_task(gen, config.task)
    if gen.metric_name not in LOSS_METRICS:
        raise ConfigError(f"generator {gen.name!r} is conditioned on {gen.metric_name!r}; the benchmark's closure "
                          f"measures a cross-entropy, so use a generator of {' or '.join(LOSS_METRICS)}")
    # a sampler (or guidance, or ranking) that cannot run fails here
    sampler = gen.sampler(config.method, config.sampling_steps, config.t_min, config.guidance, config.temperature)
    check_rank(config.rank, gen)
    check_candidates(config.candidates, sampler["temperature"], "--temperature")
    prompt = parse_prompt(config.prompt)
    lo, hi = gen.metric_range
    if isinstance(prompt, float) and not lo <= prompt <= hi:
        raise ConfigError(f"--prompt {prompt:g} is outside the {gen.metric_name} range [{lo:g}, {hi:g}] of generator "
                          f"{gen.name!r}: give a value in it, or leave --prompt out for the generator's best prompt")
    device = torch.device(config.device)
    split = load_split(task, data, config.data_root, config.holdout, device)
    seeds = [config.seed + i for i in range(config.inits)]
    inits = init_params(task, seeds)  # [N, P]
    grid = eval_grid(config.steps, config.eval_every)
    periods: list[int | None] = [None, *config.every]
    _warm_up(gen, inits[0], device, sampler)

    runs: dict[str, dict[str, list[Run]]] = {b: {config_label(k): [] for k in periods} for b in config.bases}
    bar = tqdm(total=len(seeds) * len(config.bases) * len(periods), desc="bench", unit="run",
               disable=not config.progress)
    for i, seed in enumerate(seeds):  # init by init, so that load on the machine hits all configurations alike
        for base in config.bases:
            for k in periods:
                runs[base][config_label(k)].append(train_run(
                    task, inits[i], split, recipes[base], grid, seed=seed, generator=None if k is None else gen, every=k,
                    prompt=prompt, sampling_steps=config.sampling_steps, method=config.method, t_min=config.t_min,
                    candidates=config.candidates, guidance=config.guidance, temperature=config.temperature,
                    rank=config.rank, step_size=config.step_size, min_improvement=config.min_improvement,
                    keep_if_met=config.keep_if_met, moments=config.moments, device=device,
                ))
                bar.update(1)
    bar.close()

    bases = {}
    for base, by_label in runs.items():
        target = target_loss([r.test_loss[-1] for r in by_label[BASE_LABEL]])
        configs = {}
        for k in periods:  # the base alone first: the others' ratios refer to its rows
            rs = by_label[config_label(k)]
            rows = [init_row(grid, r, target, s) for r, s in zip(rs, seeds)]
            summary = summarise(rows, None if k is None else configs[BASE_LABEL]["rows"])
            summary.update(curve_summary(grid, rs, target, None if k is None else configs[BASE_LABEL]["summary"]))
            configs[config_label(k)] = {
                "every": k,
                "rows": rows,
                "test_loss": [r.test_loss for r in rs],  # [N, G]
                "wall_s": [r.wall_s for r in rs],  # [N, G]
                "summary": summary,
            }
        bases[base] = {"hparams": applicable(recipes[base]), "target": target, "configs": configs}

    result = {
        "mode": config.mode,
        "task": task.name,
        "config": asdict(config),
        "moments": config.moments,
        "prompt": describe_prompt(prompt, gen),
        "sampler": {**sampler, "candidates": config.candidates, "rank": config.rank, "keep_if_met": config.keep_if_met,
                    "step_size": list(config.step_size), "min_improvement": config.min_improvement},
        "generator": {"name": gen.name, "sha256": gen.sha256, "metric": gen.metric_name, "best_prompt": gen.best_prompt,
                      "metric_range": list(gen.metric_range), "model_config": gen.manifest.get("model_config")},
        "closure_metric": f"full-batch cross-entropy on the last {config.holdout} training examples (held out), "
                          f"given to the generator as its {gen.metric_name!r}",
        "data": split.sizes(),
        "seeds": seeds,
        "grid": grid,
        "bases": bases,
    }
    finish_result(result, config, t_start)
    if config.plots:
        result["plots"] = [str(plot_periodic(result, Path(config.out) / "periodic.png"))]
    return result


def bench_task(gen: LoadedGenerator, task: str | None = None) -> tasks.Task:
    """The task ``gen`` was trained for (``task`` names it where the manifest's cannot be found);
    refused unless it is supervised and its network is the generator's."""
    return tasks.for_generator(gen, task, kind="supervised", what="bench")


MODE_RUNNERS: dict[str, Callable[[Any, Any], dict]] = {"periodic": run_periodic, "lopt": run_lopt}


def _warm_up(gen: LoadedGenerator, init: torch.Tensor, device: torch.device, sampler: dict) -> None:
    """One untimed sample with the bench's ``sampler``, so that one-time costs (allocator, kernels) do
    not land in the first run."""
    gen.to(device)
    one = torch.ones(1, device=device)
    try:
        gen.sample(init[None].to(device), one * 2.3, one * gen.best_prompt, steps=sampler["steps"],
                   method=sampler["method"], t_min=sampler["t_min"], guidance=sampler["guidance"],
                   temperature=sampler["temperature"],
                   generator=torch.Generator(device=device).manual_seed(0))
    except Exception:  # a broken generator shows up in the runs, as failed updates
        pass
