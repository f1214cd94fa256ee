"""Benchmark GptOptimizer's periodic mode against its base optimizer: steps and seconds to a target.

What ``learned-opt bench --mode periodic`` measures, on ``--inits N`` fresh ``mnist-mlp``
initialisations (PyTorch's default init, seeds ``--seed + i``, default ``3_000_000 + i``: far from
the small seeds of corpus runs and from ``learned-opt eval``'s ``1_000_000 + i``), for each base
optimizer in ``--bases`` (``adam``: lr 1e-3; ``sgd``: G.pt's recipe, Nesterov 0.9, lr 0.1, wd 5e-4,
cosine over 25 epochs stepped per epoch; both with minibatches of 128, as in ``learned-opt demo``):

* **the base alone** for ``--steps`` steps;
* **the same base inside** ``GptOptimizer(..., every=k, metric_closure=..., guard=True)`` for each
  ``k`` in ``--every``: the same init and the same minibatch order (a ``torch.Generator`` seeded with
  the init's seed), so until the first accepted generative update the two runs are the same run.

This is NiNo's way of counting (Knyazev et al. 2025, https://arxiv.org/abs/2409.04434): a target
loss, and how many steps each method needs to reach it in one and the same training run. The
target is the median over inits of the base alone's test loss at step ``--steps`` (one target per
base). Per init and configuration the command reports the first step of the evaluation grid (every
``--eval-every`` steps) whose test loss is at or below the target (None: never), the wall time to
that step (base steps and generative updates included, evaluation excluded), the final test loss,
the generative updates attempted / accepted / rejected / failed and the seconds they took. Summaries
per configuration, headline first: the steps (and median seconds) at which the **median curve** (the
median test loss over all inits at each grid step) first reaches the target, and their ratio to the
base alone's (below 1: periodic mode is faster; every init counts, and the base alone's median
curve reaches its own target by its last step); then how many inits reached the target, the median
steps and seconds to it over the inits that did and their ratios, the median final loss, and
"never worse": the share of inits whose final test loss is at or below the base alone's on the
same init.

**The closure's metric is not the test set.** The generator is conditioned on a cross-entropy
(``test_loss``), and the guard keeps an update only if that metric does not get worse. Measuring it
on the test set would let the test set steer training. So the last ``--holdout`` examples of the
MNIST training set are held out: the networks train on the rest, and the metric closure returns
the full-batch cross-entropy on the held-out slice. The test set is read only by the evaluation on
the grid, which is what is reported and is not timed.

``--prompt`` is the generator's best prompt by default, a fixed value, or ``frac:X`` (X times the
current metric). The sampler is the generator's own (its manifest's ``sampling`` entry, else
DDIM-50) unless ``--sampling-steps``, ``--method`` or ``--t-min`` say otherwise; ``--candidates N``
keeps the best of N samples per update by the metric closure. ``--moments keep`` (default) leaves the base optimizer's state (Adam's moments) as
it was after an accepted update, as GptOptimizer does; ``reset`` clears it after every accepted
update, so both choices can be measured.

Writes ``bench.json`` (config, hardware, generator name and sha256, per-init rows, curves,
summaries) and ``periodic.png`` (median test loss against steps, one panel per base) into ``--out``
and prints a summary table. ``--mode`` names what is measured; ``periodic`` is the only mode so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from learned_opt import __version__, tasks
from learned_opt.demo import ADAM_LR, BASELINES, BATCH_SIZE, SGD_RECIPE, first_step_at_or_below, make_optimizer
from learned_opt.diffusion import METHODS
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.fileio import atomic_write
from learned_opt.optimizer import GptOptimizer
from learned_opt.pretrained import LoadedGenerator, load_generator
from learned_opt.tasks import Task

from .evaluate import add_sampler_arguments, init_params
from .evaluate.plots import save_figure
from .evaluate.run import hardware

MODES = ("periodic",)
TASK = "mnist-mlp"
# Generator metrics that are a cross-entropy, for which the held-out cross-entropy stands in.
LOSS_METRICS = ("test_loss", "train_loss")
MOMENTS = ("keep", "reset")
BASE_HPARAMS = {
    "adam": {"optimizer": "Adam", "lr": ADAM_LR, "batch_size": BATCH_SIZE, "schedule": "constant"},
    "sgd": {"optimizer": "SGD", "nesterov": True, **SGD_RECIPE, "batch_size": BATCH_SIZE,
            "schedule": "cosine-per-epoch"},
}
BASE_LABEL = "base"  # the configuration without generative updates


@dataclass
class BenchConfig:
    """What ``learned-opt bench`` measures (one field per command-line option)."""

    generator: str  # registry name or manifest path
    out: str = "bench"
    mode: str = "periodic"
    data_root: str | None = None
    inits: int = 10
    seed: int = 3_000_000  # init i has seed seed + i (also its minibatch order and sampler seed)
    steps: int = 3000
    bases: tuple[str, ...] = ("adam", "sgd")
    every: tuple[int, ...] = (50, 100, 200, 500)
    holdout: int = 5000  # last training examples, held out for the metric closure
    eval_every: int = 50  # test loss every this many steps (not timed)
    prompt: str | None = None  # None: the generator's best prompt; "0.3"; "frac:0.9"
    moments: str = "keep"  # keep or reset the base optimizer's state after an accepted update
    sampling_steps: int | None = None  # None: the generator's own sampler (its manifest's, else DDIM-50)
    method: str | None = None
    t_min: int | None = None
    candidates: int = 1  # samples per generative update, the best by the metric closure kept
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.bases, self.every = tuple(self.bases), tuple(self.every)
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("inits", "steps", "holdout", "eval_every", "sampling_steps", "candidates"):
            value = getattr(self, name)
            if value is None and name == "sampling_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.bases:
            raise ConfigError(f"--bases is empty; name at least one of {', '.join(BASELINES)} (e.g. --bases adam)")
        unknown = [b for b in self.bases if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown base optimizer {unknown[0]!r} in --bases; choose from {', '.join(BASELINES)}")
        if len(set(self.bases)) != len(self.bases):
            raise ConfigError(f"--bases lists a base twice ({','.join(self.bases)}); list each once")
        if not self.every:
            raise ConfigError("--every is empty; give one or more periods, e.g. --every 50,100")
        for k in self.every:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"--every must hold integers >= 1 (generative updates every k steps), got {k!r}")
            if k > self.steps:
                raise ConfigError(f"--every {k} is more than --steps {self.steps}: no generative update would run; "
                                  f"lower it or raise --steps")
        if len(set(self.every)) != len(self.every):
            raise ConfigError(f"--every lists a period twice ({','.join(map(str, self.every))}); list each once")
        if self.moments not in MOMENTS:
            raise ConfigError(f"unknown --moments {self.moments!r}; choose keep or reset")
        if self.t_min is not None and (isinstance(self.t_min, bool) or not isinstance(self.t_min, int) or self.t_min < 0):
            raise ConfigError(f"--t-min must be an integer >= 0, got {self.t_min!r}")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown sampling --method {self.method!r}; choose one of {', '.join(METHODS)}")
        parse_prompt(self.prompt)  # raises on a bad rule
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown --device {self.device!r}; use cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but CUDA is not available here; use --device cpu")


# ---------------------------------------------------------------------- parsing


def parse_bases(text: str) -> tuple[str, ...]:
    """``"adam,sgd"`` -> ``("adam", "sgd")`` (checked by :class:`BenchConfig`)."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_every(text: str) -> tuple[int, ...]:
    """``"50,100"`` -> ``(50, 100)``; a part that is not an integer raises :class:`ConfigError`."""
    out = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"--every takes comma-separated integers, e.g. 50,100,200; got {part!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class FractionPrompt:
    """A prompt of ``fraction`` times the current metric (``--prompt frac:X``)."""

    fraction: float

    def __call__(self, metric: float) -> float:
        return self.fraction * metric


def parse_prompt(text: str | None) -> float | FractionPrompt | None:
    """``None`` (the generator's best prompt), a number, or ``frac:X`` -> :class:`FractionPrompt`."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower().startswith("frac:"):
        try:
            x = float(text[5:])
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and x > 0):
            raise ConfigError(f"--prompt {text!r}: frac:X needs a number X > 0, e.g. frac:0.9 "
                              f"(90% of the current loss)")
        return FractionPrompt(x)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--prompt {text!r} is neither a finite number nor frac:X; "
                          f"e.g. --prompt 0.3 or --prompt frac:0.9")
    return value


def describe_prompt(prompt: float | FractionPrompt | None, generator: LoadedGenerator) -> dict:
    """How the prompt is chosen, for ``bench.json`` (the optimizer clamps it into ``metric_range``)."""
    base = {"metric_range": list(generator.metric_range), "clamped_into_metric_range": True}
    if prompt is None:
        return {"rule": "best", "value": generator.best_prompt, **base}
    if isinstance(prompt, FractionPrompt):
        return {"rule": "fraction of the current metric", "fraction": prompt.fraction, **base}
    return {"rule": "fixed", "value": float(prompt), **base}


# ---------------------------------------------------------------------- data


@dataclass
class Split:
    """The training data split for one benchmark.

    The networks train on ``train_x``/``train_y`` (the first ``n - holdout`` training examples); the
    metric closure sees only ``holdout_x``/``holdout_y`` (the last ``holdout``); ``test`` is the task's
    data object, from which only the test set is read, by the reporting evaluation.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor
    test: Any

    def to(self, device: torch.device | str) -> "Split":
        moved = [t.to(device) for t in (self.train_x, self.train_y, self.holdout_x, self.holdout_y)]
        return Split(*moved, self.test.to(device))


def split_holdout(data, holdout: int) -> Split:
    """Hold out the last ``holdout`` training examples of ``data`` (views, no copies)."""
    n = int(data.train_x.shape[0])
    if not 1 <= holdout < n:
        raise ConfigError(f"--holdout {holdout} must be between 1 and {n - 1}: the training set has {n} examples "
                          f"and the networks need some to train on (default 5000)")
    m = n - holdout
    test = dataclasses.replace(data, train_x=data.train_x[:0], train_y=data.train_y[:0])  # only its test set stays
    return Split(data.train_x[:m], data.train_y[:m], data.train_x[m:], data.train_y[m:], test)


def holdout_closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """The metric closure: full-batch cross-entropy of ``model`` on the held-out slice ``x``, ``y``."""

    def closure() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    return closure


def eval_grid(steps: int, every: int) -> list[int]:
    """0, every, 2 * every, ... and ``steps`` (always included)."""
    return sorted({*range(0, steps + 1, every), steps})


# ---------------------------------------------------------------------- one training run


@dataclass
class Run:
    """One network trained with one configuration, measured on the evaluation grid."""

    test_loss: list[float]  # at each grid step (NaN after a divergence)
    wall_s: list[float]  # cumulative training seconds (generative updates included) at each grid step
    counters: dict[str, int] = field(default_factory=dict)  # GptOptimizer's; empty for the base alone
    generation_seconds: float = 0.0  # sum of the generative updates' own seconds
    accepted_at: list[int] = field(default_factory=list)  # steps after which an update was accepted
    diverged_at: int | None = None  # the metric closure returned NaN/Inf after this step


def train_run(
    task: Task,
    init: torch.Tensor,
    split: Split,
    base: str,
    grid: Sequence[int],
    *,
    seed: int,
    generator: LoadedGenerator | None = None,
    every: int | None = None,
    prompt: float | FractionPrompt | None = None,
    sampling_steps: int | None = None,
    method: str | None = None,
    t_min: int | None = None,
    candidates: int = 1,
    moments: str = "keep",
    device: str | torch.device = "cpu",
    on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
) -> Run:
    """Train the flat ``init`` [P] for ``grid[-1]`` steps with ``base``, alone (``generator=None``)
    or inside a periodic GptOptimizer (``every=k``), measuring the test loss at each ``grid`` step.

    Minibatches of 128 come from a fresh permutation of ``split.train_x`` each epoch, drawn from a
    ``torch.Generator`` seeded with ``seed`` (also the optimizer's sampling seed); the global RNG is
    not used. ``moments="reset"`` clears the base optimizer's per-parameter state after every
    accepted generative update. ``on_optimizer`` is called with the optimizer once it is built.
    """
    device = torch.device(device)
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    layout.load_into(init.detach().float(), list(model.parameters()))
    model.to(device)
    x, y = split.train_x, split.train_y
    n, steps = int(x.shape[0]), int(grid[-1])
    made: dict[str, Any] = {}

    def base_optimizer(params) -> torch.optim.Optimizer:
        opt, made["sched"] = make_optimizer(base, params, math.ceil(n / BATCH_SIZE))
        return opt

    gpt = None
    if generator is None:
        opt = base_optimizer(model.parameters())
    else:
        gpt = opt = GptOptimizer(
            model.named_parameters(), generator, base=base_optimizer, every=every, prompt=prompt,
            sampling_steps=sampling_steps, sampling_method=method, sampling_t_min=t_min, candidates=candidates,
            seed=seed, guard=True,
            metric_closure=holdout_closure(model, split.holdout_x, split.holdout_y),
        )
    sched = made["sched"]
    if on_optimizer is not None:
        on_optimizer(opt)

    def test_loss() -> float:
        flat = layout.flatten_module(model)[None]  # [1, P]
        return float(task.evaluate(flat, split.test, ["test_loss"])["test_loss"][0])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run = Run([], [])
    wanted = set(grid)
    if 0 in wanted:
        run.test_loss.append(test_loss())
        run.wall_s.append(0.0)
    order = torch.Generator().manual_seed(seed)
    perm, pos, elapsed, last = None, n, 0.0, None
    start = time.perf_counter()
    for t in range(1, steps + 1):
        if pos >= n:  # a new epoch: the per-epoch schedule steps, then a fresh order
            if perm is not None and sched is not None:
                sched.step()
            perm, pos = torch.randperm(n, generator=order).to(device), 0
        idx = perm[pos : pos + BATCH_SIZE]
        pos += BATCH_SIZE
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        try:
            opt.step()
        except GenerationError:  # the metric closure returned NaN/Inf: training diverged
            run.diverged_at = t
            break
        if gpt is not None and gpt.last_report is not last:  # a generative update ran after this step
            last = gpt.last_report
            run.generation_seconds += last.seconds
            if last.accepted:
                run.accepted_at.append(t)
                if moments == "reset":
                    gpt.base.state.clear()  # the base re-initialises its state lazily at the next step
        if t in wanted:
            sync()
            elapsed += time.perf_counter() - start
            run.wall_s.append(elapsed)
            run.test_loss.append(test_loss())
            start = time.perf_counter()
    missing = len(grid) - len(run.test_loss)  # grid steps after a divergence
    run.test_loss += [math.nan] * missing
    run.wall_s += [math.nan] * missing
    if gpt is not None:
        run.counters = {k: int(gpt.counters[k]) for k in ("attempted", "accepted", "rejected", "failed")}
    return run


# ---------------------------------------------------------------------- summaries


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _median(values) -> float | None:
    v = [float(x) for x in values if _finite(x)]
    return statistics.median(v) if v else None


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` (below 1: fewer steps or seconds than the reference); None if undefined."""
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def target_loss(final_losses: Sequence[float]) -> float | None:
    """The median of the base alone's final test losses (diverged runs left out)."""
    return _median(final_losses)


def init_row(grid: Sequence[int], run: Run, target: float | None, seed: int) -> dict:
    """One init's figures for one configuration."""
    reach = None if target is None else first_step_at_or_below(grid, run.test_loss, target)
    wall = None if reach is None else run.wall_s[list(grid).index(reach)]
    c = run.counters
    return {
        "seed": seed,
        "steps_to_target": reach,
        "wall_to_target_s": wall,
        "final_test_loss": run.test_loss[-1],
        "train_seconds": run.wall_s[-1],
        **{k: c.get(k, 0) for k in ("attempted", "accepted", "rejected", "failed")},
        "acceptance_rate": c["accepted"] / c["attempted"] if c.get("attempted") else None,
        "generation_seconds": run.generation_seconds,
        "accepted_at": run.accepted_at,
        "diverged_at": run.diverged_at,
    }


def summarise(rows: Sequence[dict], base_rows: Sequence[dict] | None = None) -> dict:
    """Medians of one configuration's rows and, with the base alone's ``base_rows`` (same inits, same
    order), ratios to it and the share of inits whose final loss is not worse than the base's.

    Medians of steps and seconds to the target are over the inits that reached it (``reached`` says
    how many did); the ratios divide this configuration's median by the base alone's.
    """
    reached = [r for r in rows if r["steps_to_target"] is not None]
    steps = _median(r["steps_to_target"] for r in reached)
    wall = _median(r["wall_to_target_s"] for r in reached)
    attempted = sum(r["attempted"] for r in rows)
    out = {
        "inits": len(rows),
        "reached": len(reached),
        "median_steps_to_target": steps,
        "median_wall_to_target_s": wall,
        "median_final_test_loss": _median(r["final_test_loss"] for r in rows),
        "median_train_seconds": _median(r["train_seconds"] for r in rows),
        "attempted": attempted,
        "accepted": sum(r["accepted"] for r in rows),
        "rejected": sum(r["rejected"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "acceptance_rate": sum(r["accepted"] for r in rows) / attempted if attempted else None,
        "median_generation_seconds": _median(r["generation_seconds"] for r in rows),
        "diverged": sum(r["diverged_at"] is not None for r in rows),
    }
    if base_rows is not None:
        base = summarise(base_rows)
        out["steps_ratio"] = ratio(steps, base["median_steps_to_target"])
        out["wall_ratio"] = ratio(wall, base["median_wall_to_target_s"])
        out["never_worse"] = sum(_not_worse(r["final_test_loss"], b["final_test_loss"])
                                 for r, b in zip(rows, base_rows, strict=True)) / len(rows)
    return out


def median_curve(values: Sequence[Sequence[float]]) -> list[float]:
    """The median over inits at each grid step ``[G]`` of per-init curves ``[N, G]``; a diverged
    run's NaN counts as +inf (worse than any loss), so every init counts."""
    worst = [[math.inf if not _finite(v) else float(v) for v in column] for column in zip(*values)]
    return [statistics.median(column) for column in worst]


def curve_summary(grid: Sequence[int], runs: Sequence[Run], target: float | None, base: dict | None = None) -> dict:
    """Steps and seconds to the target of the **median curve** (the median test loss over inits at each
    grid step) and, with the base alone's ``base`` summary, their ratios to it: every init counts, and
    the base alone reaches its own target (the median of its final losses) by its last step."""
    losses = median_curve([r.test_loss for r in runs])
    walls = median_curve([r.wall_s for r in runs])
    reach = None
    if target is not None:
        reach = next((g for g, v in zip(grid, losses) if v <= target), None)
    wall = None if reach is None else walls[list(grid).index(reach)]
    wall = wall if wall is None or math.isfinite(wall) else None
    out = {"curve_steps_to_target": reach, "curve_wall_to_target_s": wall}
    if base is not None:
        out["curve_steps_ratio"] = ratio(reach, base["curve_steps_to_target"])
        out["curve_wall_ratio"] = ratio(wall, base["curve_wall_to_target_s"])
    return out


def _not_worse(loss: float, base_loss: float) -> bool:
    """A final loss at or below the base alone's; a diverged base is beaten by any finite loss."""
    if not _finite(loss):
        return False
    return loss <= base_loss if _finite(base_loss) else True


# ---------------------------------------------------------------------- the benchmark


def config_label(every: int | None) -> str:
    return BASE_LABEL if every is None else f"every={every}"


def run_bench(config: BenchConfig, data=None) -> dict:
    """Run the benchmark of ``config.mode``; returns the results (also written to ``out/bench.json``)."""
    return MODE_RUNNERS[config.mode](config, data)


def run_periodic(config: BenchConfig, data=None) -> dict:
    """The base alone and the base inside a periodic GptOptimizer, on the same inits."""
    t_start = time.perf_counter()
    task = tasks.get(TASK)
    gen = load_generator(config.generator)
    if gen.task != TASK:
        raise ConfigError(f"generator {gen.name!r} is for task {gen.task!r}; the periodic benchmark trains "
                          f"{TASK}: pass a {TASK} generator")
    if gen.metric_name not in LOSS_METRICS:
        raise ConfigError(f"generator {gen.name!r} is conditioned on {gen.metric_name!r}; the benchmark's closure "
                          f"measures a cross-entropy, so use a generator of {' or '.join(LOSS_METRICS)}")
    sampler = gen.sampler(config.method, config.sampling_steps, config.t_min)  # a sampler that cannot run fails here
    prompt = parse_prompt(config.prompt)
    if data is None:
        data = task.load_data(config.data_root)
    split = split_holdout(data, config.holdout)
    device = torch.device(config.device)
    if device.type != "cpu":
        split = split.to(device)
    seeds = [config.seed + i for i in range(config.inits)]
    inits = init_params(task, seeds)  # [N, P]
    grid = eval_grid(config.steps, config.eval_every)
    periods: list[int | None] = [None, *config.every]
    _warm_up(gen, inits[0], device, config)

    runs: dict[str, dict[str, list[Run]]] = {b: {config_label(k): [] for k in periods} for b in config.bases}
    bar = tqdm(total=len(seeds) * len(config.bases) * len(periods), desc="bench", unit="run",
               disable=not config.progress)
    for i, seed in enumerate(seeds):  # init by init, so that load on the machine hits all configurations alike
        for base in config.bases:
            for k in periods:
                runs[base][config_label(k)].append(train_run(
                    task, inits[i], split, base, grid, seed=seed, generator=None if k is None else gen, every=k,
                    prompt=prompt, sampling_steps=config.sampling_steps, method=config.method, t_min=config.t_min,
                    candidates=config.candidates, moments=config.moments, device=device,
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
        bases[base] = {"hparams": BASE_HPARAMS[base], "target": target, "configs": configs}

    result = {
        "mode": config.mode,
        "task": TASK,
        "config": asdict(config),
        "moments": config.moments,
        "prompt": describe_prompt(prompt, gen),
        "sampler": {**sampler, "candidates": config.candidates},
        "generator": {"name": gen.name, "sha256": gen.sha256, "metric": gen.metric_name, "best_prompt": gen.best_prompt,
                      "metric_range": list(gen.metric_range), "model_config": gen.manifest.get("model_config")},
        "closure_metric": f"full-batch cross-entropy on the last {config.holdout} training examples (held out), "
                          f"given to the generator as its {gen.metric_name!r}",
        "data": {"train_examples": int(split.train_x.shape[0]), "holdout_examples": int(split.holdout_x.shape[0]),
                 "test_examples": int(split.test.test_y.shape[0])},
        "hardware": hardware(config.device),
        "seeds": seeds,
        "grid": grid,
        "bases": bases,
        "wall_seconds": time.perf_counter() - t_start,
        "learned_opt": __version__,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(result), indent=1) + "\n"
    atomic_write(out / "bench.json", lambda p: p.write_text(text, encoding="utf-8"))
    if config.plots:
        result["plots"] = [str(plot_periodic(result, out / "periodic.png"))]
    return result


MODE_RUNNERS: dict[str, Callable[[BenchConfig, Any], dict]] = {"periodic": run_periodic}


def _warm_up(gen: LoadedGenerator, init: torch.Tensor, device: torch.device, config: BenchConfig) -> None:
    """One untimed sample, so that one-time costs (allocator, kernels) do not land in the first run."""
    gen.to(device)
    one = torch.ones(1, device=device)
    try:
        gen.sample(init[None].to(device), one * 2.3, one * gen.best_prompt, steps=config.sampling_steps,
                   method=config.method, t_min=config.t_min, generator=torch.Generator(device=device).manual_seed(0))
    except Exception:  # a broken generator shows up in the runs, as failed updates
        pass


def _json_safe(x):
    """NaN and Inf become None (strict JSON); tuples become lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------------- report


def plot_periodic(result: dict, path: Path) -> Path:
    """Median test loss over inits against steps, one line per configuration, one panel per base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = result["bases"]
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False)
    grid = result["grid"]
    for ax, (base, section) in zip(axes[0], bases.items()):
        for label, c in section["configs"].items():
            median = median_curve(c["test_loss"])  # the curve the headline ratio is read from
            alone = label == BASE_LABEL  # drawn on top, thin: periodic runs equal to it hide beneath
            ax.plot(grid, [v if math.isfinite(v) else math.nan for v in median], label=f"{base} alone" if alone else label, color="k" if alone else None,
                    lw=1.2 if alone else 2, zorder=3 if alone else 2)
        if section["target"] is not None:
            ax.axhline(section["target"], color="grey", ls="--", label=f"target {section['target']:.4f}")
        ax.set_yscale("log")
        ax.set_xlabel("training steps (batch 128)")
        ax.set_ylabel(f"{result['task']} test loss (median of {len(result['seeds'])} inits)")
        ax.set_title(f"{base}: generator {result['generator']['name']}, moments {result['moments']}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_summary(result: dict) -> str:
    """The printed summary table: one row per base and configuration."""
    header = ("base", "config", "curve steps", "ratio", "curve s", "s ratio", "reached", "steps to target",
              "ratio", "final loss", "never worse", "accepted")
    rows = []
    for base, section in result["bases"].items():
        for label, c in section["configs"].items():
            s, alone = c["summary"], label == BASE_LABEL
            rows.append((
                base, label, _fmt(s["curve_steps_to_target"], ".0f"),
                _fmt(1.0 if alone else s["curve_steps_ratio"], ".3f"),
                _fmt(s["curve_wall_to_target_s"], ".2f"),
                _fmt(1.0 if alone else s["curve_wall_ratio"], ".3f"),
                f"{s['reached']}/{s['inits']}", _fmt(s["median_steps_to_target"], ".0f"),
                _fmt(1.0 if alone else s["steps_ratio"], ".3f"),
                _fmt(s["median_final_test_loss"], ".4f"),
                "-" if alone else f"{s['never_worse'] * 100:.0f}%",
                "-" if not s["attempted"] else f"{s['accepted']}/{s['attempted']} ({s['acceptance_rate'] * 100:.0f}%)",
            ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    targets = ", ".join(f"{b} {_fmt(s['target'], '.4f')}" for b, s in result["bases"].items())
    lines.append(f"target: median test loss of the base alone at step {result['config']['steps']} ({targets}); "
                 f"'curve': the first grid step where the median test loss over all inits is at or below the target "
                 f"(and the median seconds to it); 'steps to target': the median over the inits that reached it; "
                 f"ratios below 1 are faster than the base")
    lines.append(f"closure metric: {result['closure_metric']}; prompt: {result['prompt']['rule']}; "
                 f"moments: {result['moments']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="periodic", help="what to measure (default: periodic)")
    parser.add_argument("--generator", required=True, help="shipped generator name or path to a .json manifest")
    parser.add_argument("--out", required=True, help="folder for bench.json and periodic.png")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--inits", type=int, default=10, help="fresh initialisations (default: 10)")
    parser.add_argument("--seed", type=int, default=3_000_000, help="init i has seed SEED + i (default: 3000000)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of every run (default: 3000)")
    parser.add_argument("--bases", default="adam,sgd", help="base optimizers, comma-separated (default: adam,sgd)")
    parser.add_argument("--every", default="50,100,200,500",
                        help="periods k of generative updates, comma-separated (default: 50,100,200,500)")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="last training examples held out for the metric closure (default: 5000)")
    parser.add_argument("--eval-every", type=int, default=50, help="test loss every N steps, not timed (default: 50)")
    parser.add_argument("--prompt", default=None,
                        help="a number, or frac:X for X times the current metric (default: the generator's best prompt)")
    parser.add_argument("--moments", choices=MOMENTS, default="keep",
                        help="after an accepted update keep or reset the base optimizer's state (default: keep)")
    add_sampler_arguments(parser, "the best by the metric closure kept")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG")


def main(args: argparse.Namespace) -> int:
    config = BenchConfig(
        generator=args.generator, out=args.out, mode=args.mode, data_root=args.data_root, inits=args.inits,
        seed=args.seed, steps=args.steps, bases=parse_bases(args.bases), every=parse_every(args.every),
        holdout=args.holdout, eval_every=args.eval_every, prompt=args.prompt, moments=args.moments,
        sampling_steps=args.sampling_steps, method=args.method, t_min=args.t_min, candidates=args.candidates,
        device=args.device,
        progress=not args.no_progress, plots=not args.no_plots,
    )
    result = run_bench(config)
    print(format_summary(result))
    print(f"wrote {Path(config.out) / 'bench.json'}" + "".join(f", {p}" for p in result.get("plots", [])))
    return 0
