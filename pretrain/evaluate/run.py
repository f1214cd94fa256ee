"""``evaluate_generator``: every section of ``learned-opt eval`` on one generator, written to ``eval.json``."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from learned_opt import __version__, tasks
from learned_opt.errors import ConfigError
from learned_opt.fileio import atomic_write
from learned_opt.pretrained import load_generator

from ..store import Store
from .config import REPEATS_REPORTED, EvalConfig
from .denoising import measure_denoising
from .memorisation import corpus_seeds, measure_memorisation
from .metrics import init_params, summary
from .property import measure_property_head
from .report import plot_eval
from .sampler import Sampler, measure_metrics, prompt_alignment, repeated_updates
from .suites import suite_for


def evaluate_generator(config: EvalConfig, data=None) -> dict:
    """Run every section; returns the results (also written to ``out/eval.json``)."""
    t_start = time.perf_counter()
    gen = load_generator(config.generator, device=config.device)
    task = tasks.for_generator(gen, config.task)
    suite = suite_for(task)
    suite.check(task, config)
    if data is None:
        data = task.load_data(config.data_root)
    dev_data = data.to(config.device) if config.device != "cpu" and hasattr(data, "to") else data  # control tasks: no tensors
    store = Store.open(config.store) if config.store else None
    if store is not None and store.task_name != gen.task:
        raise ConfigError(f"--store holds {store.task_name!r} runs but the generator is for {gen.task!r}")
    seeds = [config.seed + i for i in range(config.inits)]
    if store is not None:
        overlap = sorted(set(seeds) & corpus_seeds(store))
        if overlap:
            raise ConfigError(f"init seeds {overlap[:5]} were used for corpus runs; choose another --seed")
    name = gen.metric_name
    names = sorted({*suite.metrics, name})

    def measure(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return measure_metrics(task, flat, dev_data, config.device, names)

    score, scored = None, {"networks": 0, "env_steps": 0}
    if config.candidates > 1 and config.rank == "closure":
        val_data = task.validation_data(data, config.holdout)
        val_data = val_data.to(config.device) if config.device != "cpu" and hasattr(val_data, "to") else val_data

        def score_on_validation(flat: torch.Tensor) -> torch.Tensor:
            scored["networks"] += flat.shape[0]
            if task.kind == "control":  # count the interaction: the steps every scored episode lasted
                returns, trace = task.rollout(flat, val_data)  # trace: NaN once an episode has ended
                scored["env_steps"] += int(np.isfinite(trace).sum())
                return returns.mean(-1)
            return measure_metrics(task, flat, val_data, config.device, [name])[name]

        score = score_on_validation

    sampler = Sampler(gen, config, seed=config.seed, score=score)
    times: dict[str, float] = {}
    bar = tqdm(total=8, desc="eval", unit="section", disable=not config.progress)

    # one step + repeated prompting (the first of the repeats is the one-step update)
    t = time.perf_counter()
    theta0 = init_params(task, seeds)  # [N, P]
    hist, generated = repeated_updates(sampler, theta0, measure, config.repeats, name)
    times["one_step_and_repeats_s"] = time.perf_counter() - t
    scored_in_repeats = dict(scored)  # what choosing among candidates cost over the inits' config.repeats updates
    before, after = {k: v[0] for k, v in hist.items()}, {k: v[1] for k, v in hist.items()}
    bar.update(1)

    # timing: one update of one network (measure its metric, then sample), and the baseline's s/step
    t = time.perf_counter()
    one, metric_runs = [], []
    for _ in range(3):
        s = time.perf_counter()
        m0 = measure(theta0[:1])[name]  # [1]: the conditioning input
        metric_runs.append(time.perf_counter() - s)
        s = time.perf_counter()
        sampler(theta0[:1], m0, torch.full((1,), gen.best_prompt), rng=torch.Generator().manual_seed(0))
        one.append(time.perf_counter() - s)
    sample_s, metric_s = statistics.median(one), statistics.median(metric_runs)
    update_s = sample_s + metric_s
    base_s, base_info = suite.seconds_per_step(task, theta0, seeds, data, config)
    times["timing_s"] = time.perf_counter() - t
    bar.update(1)

    # baselines
    t = time.perf_counter()
    baselines, reach = suite.run(task, theta0, seeds, data, config, after)
    times["baselines_s"] = time.perf_counter() - t
    bar.update(1)

    # prompt alignment: K prompts per network between the best prompt and its starting metric
    t = time.perf_counter()
    aligned = prompt_alignment(lambda th, m, p: sampler(th, m, p, candidates=1), theta0, before[name], gen.best_prompt,
                               config.prompts, lambda th: measure(th)[name], sampler.clamp)
    prompts, achieved_k, r2 = aligned["prompts"], aligned["achieved"], aligned["r2"]
    times["prompt_alignment_s"] = time.perf_counter() - t
    bar.update(1)

    # memorisation
    t = time.perf_counter()
    if store is not None and len(store.run_ids()) > 1:
        memo = measure_memorisation(task, store, generated, after[suite.memo_metric], config, suite.memo_metric)
    else:
        memo = {"skipped": "no --store given (or it holds fewer than 2 runs): memorisation check not run"}
    times["memorisation_s"] = time.perf_counter() - t
    bar.update(1)

    # denoising: x0 predictions on held-out corpus pairs against returning θ
    t = time.perf_counter()
    denoising = measure_denoising(gen, store, config)
    if "ratio" in denoising:  # the same on runs it trained on: close to the held-out figures = not overfitting
        denoising["train_runs"] = measure_denoising(gen, store, config, split="train")
    times["denoising_s"] = time.perf_counter() - t
    bar.update(1)

    # the property head: how well its predicted metric ranks held-out checkpoints and generated samples
    t = time.perf_counter()
    prop = measure_property_head(gen, store, config, (generated, after[name]),
                                 (aligned["theta"], achieved_k))
    times["property_head_s"] = time.perf_counter() - t
    bar.update(1)

    # out-of-distribution inits
    t = time.perf_counter()
    ood = {}
    for kind in ("kaiming-normal", "uniform-x3"):
        h, _ = repeated_updates(sampler, init_params(task, seeds, kind), measure, config.repeats, name)
        ood[kind] = _repeat_section(h)
    times["ood_s"] = time.perf_counter() - t
    bar.update(1)
    bar.close()
    times["total_s"] = time.perf_counter() - t_start

    result = {
        "config": asdict(config),
        "seeds": seeds,
        "generator": {"name": gen.name, "task": gen.task, "sha256": gen.sha256, "metric": name, "best_prompt": gen.best_prompt,
                      "prompt_used": float(sampler.clamp(torch.tensor(gen.best_prompt))),
                      "metric_range": list(gen.metric_range), "model_config": gen.manifest.get("model_config")},
        "sampler": {**sampler.settings, **({"candidates_scored": {"one_step_and_repeats": scored_in_repeats,
                                                                   "all_sections": scored}}
                                           if config.candidates > 1 and config.rank == "closure" else {})},
        "hardware": hardware(config.device),
        "one_step": {
            "before": {k: v.tolist() for k, v in before.items()},
            "after": {k: v.tolist() for k, v in after.items()},
            "summary": {f"{w}_{k}": summary(v.tolist()) for w, d in (("before", before), ("after", after)) for k, v in d.items()},
            **suite.one_step_extra(hist),
        },
        "baselines": baselines,
        "timing": {
            "update_seconds": update_s, "sample_seconds": sample_s, "metric_seconds": metric_s,
            "sample_seconds_runs": one, **_speedups(suite.baseline, suite.unit, reach, base_s, update_s), **base_info,
            "torch_threads": torch.get_num_threads(),
        },
        "prompt_alignment": {
            "prompts": prompts.tolist(), "achieved": achieved_k.tolist(), "r2": r2.tolist(),
            "r2_mean": float(r2.mean()), "r2_summary": summary(r2.tolist()),
        },
        "repeated": _repeat_section(hist),
        "memorisation": memo,
        "denoising": denoising,
        "property_head": prop,
        "ood": ood,
        "wall_times": times,
        "learned_opt": __version__,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"  # hours of work: an interrupted write keeps the previous file
    atomic_write(out / "eval.json", lambda p: p.write_text(text, encoding="utf-8"))
    if config.plots:
        result["plots"] = [str(p) for p in plot_eval(result, out)]
    return result


def _speedups(baseline: str, unit: str, reach: list[int | None], per_step: float, update_s: float) -> dict:
    """The baseline's seconds per step, those of the steps each update replaces, and their ratio to
    the update's (per init, and the median over the inits the baseline reached)."""
    needed = [s for s in reach if s is not None]
    return {
        f"{baseline}_seconds_per_{unit}": per_step,
        f"{baseline}_seconds_for_{unit}s_to_reach": [None if s is None else s * per_step for s in reach],
        f"speedup_vs_{baseline}": [None if s is None else s * per_step / update_s for s in reach],
        f"median_speedup_vs_{baseline}": (statistics.median(needed) * per_step / update_s) if needed else None,
    }


def _repeat_section(hist: dict[str, torch.Tensor]) -> dict:
    """Per-update metrics ``[n+1, N]`` as lists, and median/quartiles after 1, 2, 5, 10 updates."""
    n = next(iter(hist.values())).shape[0] - 1
    return {
        "updates": list(range(n + 1)),
        **{k: v.tolist() for k, v in hist.items()},
        "summary": {f"{k}_after_{r}": summary(v[r].tolist()) for k, v in hist.items()
                    for r in (0, *REPEATS_REPORTED) if r <= n},
    }


def hardware(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
