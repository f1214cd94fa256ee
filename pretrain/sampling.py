"""Choose a generator's sampler on validation inits: sampling steps, where to stop (``t_min``),
guidance and its taper, and the sampling temperature.

A diffusion model over parameters is not equally good at every noise level. If its predictions at
low noise are worse than its estimate at some intermediate timestep, running the sampler to t = 0
makes networks worse, and stopping at ``t_min`` (returning the x0 prediction made there) is better.
``learned-opt tune-sampling`` measures that for one generator:

* ``--inits N`` fresh initialisations with seeds ``--seed + i`` (default ``2_000_000 + i``: apart
  from corpus runs, ``learned-opt eval``'s ``1_000_000 + i`` and ``bench``'s ``3_000_000 + i``);
* for every ``--steps`` × ``--t-min`` pair (``--method``, default DDIM), every ``--guidance``
  scale (default 1 alone; above 1 needs a generator trained with ``--prompt-dropout``) and every
  ``--temperature`` (the scale of the sampling noise; default 1 alone; 0 is the deterministic path),
  ``--samples`` updates per init with the generator's best prompt, conditioned on the init's metric;
* every metric is measured on the task's **validation data** (:meth:`Task.validation_data`: for a
  supervised task the last ``--holdout`` training examples, for a control task episodes from other
  starting states), never on the test set, so that the evaluation that reports results afterwards
  stays unseen.

The chosen sampler is the cheapest (fewest model evaluations: the steps, doubled with a guidance
other than 1, whose doubled batch costs about two; then the best median, then the best mean) whose
median metric over all samples is within ``--tolerance`` (default 1%, relative) of the best median.
The mean breaks ties where most updates reach the metric's ceiling (CartPole's return of 500), so
that the median alone cannot tell samplers apart.
Writes ``sweep.json`` and ``sweep.png`` (the median metric over steps and ``t_min``) into ``--out``
and prints the table; ``--write`` records the choice as the ``"sampling"`` entry of the generator's
manifest (a path, not a registry name), which :class:`~learned_opt.GptOptimizer`, ``eval``,
``bench`` and ``demo`` then use by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from learned_opt import tasks
from learned_opt.diffusion import METHODS, check_temperature
from learned_opt.errors import ConfigError
from learned_opt.fileio import atomic_write
from learned_opt.guidance import check_guidance
from learned_opt.options import DeprecatedAlias, check_out_dir, check_plots, check_seed
from learned_opt.pretrained import LoadedGenerator, load_generator
from learned_opt.saving import manifest_json

from .evaluate import init_params, prompt_alignment
from .evaluate.plots import save_figure
from .evaluate.run import hardware

DEFAULT_STEPS = (1, 2, 3, 4, 6, 10, 25)
DEFAULT_T_MIN = (0, 100, 200, 300, 400, 500, 600)
ALIGNMENT_PROMPTS = 8  # prompts per init in the taper check


@dataclass
class TuneConfig:
    """What ``learned-opt tune-sampling`` measures (one field per command-line option)."""

    generator: str  # registry name or manifest path
    out: str = "tune-sampling"
    task: str | None = None  # the generator's task where its manifest's cannot be found ("file.py:Class")
    data_root: str | None = None
    inits: int = 32
    seed: int = 2_000_000  # init i has seed seed + i
    samples: int = 4  # updates per init and sampler (different noise)
    method: str = "ddim"
    steps: tuple[int, ...] = DEFAULT_STEPS
    t_min: tuple[int, ...] = DEFAULT_T_MIN
    guidance: tuple[float, ...] = (1.0,)  # classifier-free guidance scales (above 1: generators trained with prompt dropout)
    temperature: tuple[float, ...] = (1.0,)  # scales of the sampling noise (0: the deterministic path)
    holdout: int = 5000  # training examples held out as validation data (supervised tasks)
    tolerance: float = 0.01  # relative: samplers this close to the best median count as equal; the cheapest wins
    sample_batch: int = 256  # networks sampled at once
    write: bool = False  # record the choice in the generator's manifest
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.steps, self.t_min = tuple(self.steps), tuple(self.t_min)
        self.guidance = tuple(check_guidance(w, "--guidance") for w in self.guidance)
        if not self.guidance:
            raise ConfigError("--guidance must list at least one scale, e.g. 1,1.5,2,3")
        self.temperature = tuple(check_temperature(s, "--temperature") for s in self.temperature)
        if not self.temperature:
            raise ConfigError("--temperature must list at least one scale, e.g. 1,0.5,0")
        for name in ("inits", "samples", "sample_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"--tolerance must be in [0, 1) (relative to the best median), got {self.tolerance!r}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown sampling --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.steps):
            raise ConfigError(f"--sampling-steps must list integers >= 1, e.g. 1,2,4,10; got {self.steps!r}")
        if not self.t_min or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.t_min):
            raise ConfigError(f"--t-min must list integers >= 0, e.g. 0,200,400; got {self.t_min!r}")


def parse_numbers(text: str, option: str, kind: type = int) -> tuple:
    """``"1,2,4"`` -> ``(1, 2, 4)`` (numbers of ``kind``); anything else raises :class:`ConfigError`
    naming ``option``."""
    try:
        return tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated {kind.__name__}s, e.g. 1,2,4; got {text!r}") from None


def sampler_grid(config: TuneConfig, num_steps: int) -> list[tuple[int, int]]:
    """The ``(steps, t_min)`` pairs to measure: those that fit the schedule; one-step samplers only
    once (a single model call at the last timestep does not depend on ``t_min``)."""
    beyond = [t for t in sorted(set(config.t_min)) if t >= num_steps]
    if beyond and config.t_min != DEFAULT_T_MIN:  # defaults beyond a short schedule are left out, asked ones refused
        raise ConfigError(f"--t-min {','.join(map(str, beyond))}: the generator's diffusion has {num_steps} steps, "
                          f"so t_min must be below {num_steps}")
    t_mins = [t for t in sorted(set(config.t_min)) if t < num_steps]
    if config.method == "ddpm":  # DDPM runs every step from the last down to t_min: one row per t_min
        grid = [(min(config.steps), t) for t in t_mins]
    else:
        grid = [(steps, t) for steps in sorted(set(config.steps)) for t in t_mins
                if steps <= num_steps - t and not (steps == 1 and t > 0)]
    if not grid:
        raise ConfigError(f"no --steps/--t-min pair fits the generator's {num_steps}-step diffusion")
    return grid


@torch.no_grad()
def prompted_updates(gen: LoadedGenerator, theta: torch.Tensor, metric: torch.Tensor, prompt: torch.Tensor, batch: int,
                     generator: torch.Generator, **sampler: Any) -> torch.Tensor:
    """One update of each network ``theta`` [M, P] at its ``metric`` [M], prompted with ``prompt``
    [M], ``batch`` networks at a time -> θ′ [M, P] on the CPU. ``sampler``: ``steps``, ``method``,
    ``t_min``, ``guidance``, ``temperature``, ``guidance_taper`` (default: the generator's own)."""
    return torch.cat([
        gen.sample(xb.to(gen.device), mb.to(gen.device), pb.to(gen.device), generator=generator, **sampler).cpu()
        for xb, mb, pb in zip(theta.split(batch), metric.split(batch), prompt.split(batch))
    ])


def best_prompt_updates(gen: LoadedGenerator, theta: torch.Tensor, metric: torch.Tensor, batch: int,
                        generator: torch.Generator, **sampler: Any) -> torch.Tensor:
    """:func:`prompted_updates` with the generator's best prompt (within its metric range)."""
    lo, hi = gen.metric_range
    prompt = torch.full_like(metric, min(max(gen.best_prompt, lo), hi))
    return prompted_updates(gen, theta, metric, prompt, batch, generator, **sampler)


def taper_check(gen: LoadedGenerator, task: tasks.Task, val_data: Any, inits: torch.Tensor, start: torch.Tensor,
                chosen: dict, config: TuneConfig) -> dict:
    """Prompt alignment on validation data for the chosen sampler with constant and with tapered
    guidance (:func:`~learned_opt.guidance.tapered_scale`): R² per init, each init updated once for
    ``ALIGNMENT_PROMPTS`` prompts from the best to its own metric. The taper is chosen only where it
    aligns clearly better: the mean per-init gain in R² above twice its standard error (a paired
    check, so that noise in a few inits does not decide). The sweep itself prompts the best, where
    the taper changes nothing."""
    metric = gen.metric_name
    lo, hi = gen.metric_range
    r2 = {}
    for taper in (False, True):
        rng = torch.Generator().manual_seed(config.seed)
        sample = lambda th, m, p: prompted_updates(  # noqa: E731
            gen, th, m, p, config.sample_batch, rng, method=chosen["method"], steps=chosen["steps"],
            t_min=chosen["t_min"], guidance=chosen["guidance"], temperature=chosen["temperature"], guidance_taper=taper)
        r2[taper] = prompt_alignment(sample, inits, start, gen.best_prompt, ALIGNMENT_PROMPTS,
                                     lambda th: task.evaluate(th, val_data, [metric])[metric],
                                     lambda p: p.clamp(lo, hi))["r2"].double()
    finite = torch.isfinite(r2[True]) & torch.isfinite(r2[False])  # R² is undefined for an init already at the best
    gain = (r2[True] - r2[False])[finite]  # [N']
    n = len(gain)
    mean = float(gain.mean()) if n else None
    se = float(gain.std() / math.sqrt(n)) if n > 1 else None
    return {"prompts": ALIGNMENT_PROMPTS, "inits": n, "r2_mean_constant": float(r2[False][finite].mean()) if n else None,
            "r2_mean_tapered": float(r2[True][finite].mean()) if n else None, "r2_gain_mean": mean, "r2_gain_se": se,
            "chosen": se is not None and mean > 2 * se}


def sweep(gen: LoadedGenerator, task: tasks.Task, val_data: Any, inits: torch.Tensor, config: TuneConfig) -> dict:
    """Per ``(steps, t_min, guidance, temperature)``: the validation metrics of ``config.samples`` updates of each init."""
    metric = gen.metric_name
    direction = gen.metric_direction
    x = inits.repeat_interleave(config.samples, 0)  # [N*S, P]
    start = task.evaluate(inits, val_data, [metric])[metric].repeat_interleave(config.samples)  # [N*S]
    extra = [m for m in ("test_error",) if m in task.metrics and m != metric]
    rows = []
    grid = list(itertools.product(sampler_grid(config, gen.diffusion.num_steps), config.guidance, config.temperature))
    for (steps, t_min), guidance, temperature in tqdm(grid, desc="samplers", disable=not config.progress):
        rng = torch.Generator().manual_seed(config.seed)  # the same noise for every sampler
        began = time.perf_counter()
        out = best_prompt_updates(gen, x, start, config.sample_batch, rng, steps=steps, method=config.method,
                                  t_min=t_min, guidance=guidance, temperature=temperature)
        seconds = time.perf_counter() - began
        values = task.evaluate(out, val_data, [metric, *extra])
        per_init = values[metric].view(config.inits, config.samples)
        best = per_init.min(1).values if direction == "min" else per_init.max(1).values
        rows.append({
            "steps": steps, "t_min": t_min, "guidance": guidance, "temperature": temperature,
            f"median_{metric}": float(values[metric].median()),
            f"mean_{metric}": float(values[metric].mean()),
            f"median_best_of_samples_{metric}": float(best.median()),
            **{f"median_{m}": float(values[m].median()) for m in extra},
            "seconds_per_sample": seconds / len(out),
        })
    key = f"median_{metric}"
    sign = 1.0 if direction == "min" else -1.0
    best = min(sign * r[key] for r in rows)
    close = [r for r in rows if sign * r[key] <= best + config.tolerance * abs(best)]
    cost = lambda r: r["steps"] * (1 if r["guidance"] == 1.0 else 2)  # noqa: E731 (model evaluations per sample)
    chosen = min(close, key=lambda r: (cost(r), sign * r[key], sign * r[f"mean_{metric}"]))
    return {
        "metric": metric, "direction": direction,
        "start_median": float(start.median()),
        "rows": rows,
        "chosen": {"method": config.method, "steps": chosen["steps"], "t_min": chosen["t_min"],
                   "guidance": chosen["guidance"], "temperature": chosen["temperature"], key: chosen[key]},
    }


def record_choice(manifest_path: Path, result: dict, config: TuneConfig, sha256: str | None = None) -> None:
    """Write the chosen sampler as the manifest's ``"sampling"`` entry (atomically; the weights are
    untouched); with ``sha256``, the swept weights', only if the manifest still describes them."""
    chosen = result["chosen"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if sha256 is not None and manifest.get("weights_sha256") != sha256:  # re-exported during the sweep
        raise ConfigError(f"{manifest_path} now describes other weights (sha256 {str(manifest.get('weights_sha256'))[:12]}…) "
                          f"than the ones swept ({sha256[:12]}…); nothing was written: run the sweep again on the "
                          f"new weights")
    manifest["sampling"] = {
        "method": chosen["method"], "steps": chosen["steps"], "t_min": chosen["t_min"],
        # left out at their defaults: readable by older releases
        **{k: chosen[k] for k in ("guidance", "temperature") if chosen.get(k, 1.0) != 1.0},
        **({"guidance_taper": True} if chosen.get("guidance_taper") else {}),
        "chosen_by": (f"learned-opt tune-sampling: the fewest steps within {config.tolerance:.0%} of the best median "
                      f"{result['metric']} (ties broken by the mean) on validation data, over {config.inits} inits "
                      f"(seeds {config.seed} + i) x {config.samples} samples"
                      + (f"; guidance {'tapered' if chosen.get('guidance_taper') else 'kept constant'}: the "
                         f"mean per-init gain in prompt-alignment R² from tapering it on those inits "
                         f"({result['guidance_taper']['prompts']} prompts each) "
                         f"{'exceeds' if chosen.get('guidance_taper') else 'does not exceed'} twice its standard error"
                         if "guidance_taper" in result else "")),
    }
    text = manifest_json(manifest)
    atomic_write(manifest_path, lambda p: p.write_text(text, encoding="utf-8"))


def _plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"median_{result['metric']}"
    line_of = lambda r: (r["steps"], r.get("guidance", 1.0), r.get("temperature", 1.0))  # noqa: E731
    lines = sorted({line_of(r) for r in result["rows"]})
    guided, tempered = len({w for _, w, _ in lines}) > 1, len({s for _, _, s in lines}) > 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for line in lines:
        steps, w, temp = line
        rows = sorted((r for r in result["rows"] if line_of(r) == line), key=lambda r: r["t_min"])
        ax.plot([r["t_min"] for r in rows], [r[key] for r in rows], marker="o",
                label=f"{steps} steps" + (f", guidance {w:g}" if guided else "")
                + (f", temperature {temp:g}" if tempered else ""))
    c = result["chosen"]
    ax.plot([c["t_min"]], [c[key]], marker="*", ms=16, color="black", ls="none", label="chosen")
    ax.set_xlabel("t_min (the sampler stops there and returns its x0 prediction)")
    ax.set_ylabel(f"median {result['metric']} on validation data")
    # the inits sit far above every sampler: named in the title, so that the axis shows the samplers apart
    ax.set_title(f"one update from fresh inits (median {result['metric']} {result['start_median']:.3g}), by sampler")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "sweep.png")


def tune_sampling(config: TuneConfig) -> dict:
    """Run the sweep; write ``sweep.json`` (and ``sweep.png``); with ``write``, update the manifest."""
    manifest_path = None
    if config.write:
        manifest_path = Path(config.generator).with_suffix(".json")
        named = Path(config.generator).suffix not in (".json", ".safetensors") and "/" not in str(config.generator) \
            and os.sep not in str(config.generator)  # a registry name: load_generator reads the shipped files
        if named or not manifest_path.is_file():
            raise ConfigError(f"--write needs the path of the generator's .json manifest, got {config.generator!r}; "
                              f"pass the file (e.g. learned_opt/weights/NAME.json), not a registry name")
        manifest_path = manifest_path.resolve()  # through a link: the manifest itself is updated, not the link
        # the manifest is replaced by a new file (atomically): that needs its folder writable, and a
        # read-only manifest is a protection the replacement would silently drop
        read_only = not manifest_path.stat().st_mode & 0o222  # by its mode: root may write any file
        if read_only or not os.access(manifest_path.parent, os.W_OK | os.X_OK):
            what = "is read-only" if read_only else "lies in a folder you cannot write"
            raise ConfigError(f"--write updates {manifest_path}, which {what}: make it writable, sweep a copy "
                              f"of the generator (its .json and .safetensors), or leave out --write")
    gen = load_generator(config.generator)
    for w in config.guidance:  # ConfigError for guidance other than 1 on a generator trained without prompt dropout
        gen.sampler(guidance=w)
    task = tasks.for_generator(gen, config.task)
    val_data = task.validation_data(task.load_data(config.data_root), config.holdout)
    inits = init_params(task, [config.seed + i for i in range(config.inits)])
    result = {"config": asdict(config), "generator": {"name": gen.name, "sha256": gen.sha256},
              "hardware": hardware("cpu"), **sweep(gen, task, val_data, inits, config)}
    if result["chosen"]["guidance"] != 1.0:  # constant or tapered guidance: chosen on prompt alignment
        start = task.evaluate(inits, val_data, [gen.metric_name])[gen.metric_name]
        result["guidance_taper"] = taper_check(gen, task, val_data, inits, start, result["chosen"], config)
        result["chosen"]["guidance_taper"] = result["guidance_taper"]["chosen"]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.plots:
        result["plots"] = [str(_plot(result, out))]
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out / "sweep.json", lambda p: p.write_text(text, encoding="utf-8"))
    if manifest_path is not None:
        record_choice(manifest_path, result, config, sha256=gen.sha256)
        result["written_to"] = str(manifest_path)
    return result


def format_table(result: dict) -> str:
    key = f"median_{result['metric']}"
    mean_key = f"mean_{result['metric']}"
    best_key = f"median_best_of_samples_{result['metric']}"
    extra = [k for k in result["rows"][0] if k.startswith("median_") and k not in (key, best_key)]
    lines = [f"{'steps':>5} {'t_min':>5} {'guidance':>8} {'temp.':>5} {key:>18} {mean_key:>16} {'best of samples':>16} "
             + " ".join(f"{k:>18}" for k in extra)]
    for r in result["rows"]:
        lines.append(f"{r['steps']:>5} {r['t_min']:>5} {r['guidance']:>8g} {r.get('temperature', 1.0):>5g} {r[key]:>18.4f} {r[mean_key]:>16.4f} "
                     f"{r[best_key]:>16.4f} " + " ".join(f"{r[k]:>18.4f}" for k in extra))
    c = result["chosen"]
    if "guidance_taper" in result:
        t = result["guidance_taper"]
        if t["r2_gain_se"] is None:
            lines.append(f"prompt alignment: too few inits with a defined R² ({t['inits']}) to choose; constant guidance")
        else:
            lines.append(f"prompt alignment of the chosen sampler ({t['prompts']} prompts per init), mean R²: "
                         f"{t['r2_mean_constant']:.3f} with constant guidance, {t['r2_mean_tapered']:.3f} tapered (gain "
                         f"{t['r2_gain_mean']:+.3f} ± {t['r2_gain_se']:.3f} per init: "
                         f"{'tapered' if t['chosen'] else 'constant'}, tapered only if the gain exceeds twice its error)")
    lines.append(f"inits: median {result['metric']} {result['start_median']:.4f}; chosen: {c['method']}, "
                 f"{c['steps']} steps, t_min {c['t_min']}, guidance {c['guidance']:g}"
                 + (" tapered" if c.get("guidance_taper") else "")
                 + f", temperature {c.get('temperature', 1.0):g} ({key} {c[key]:.4f})")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="registry name or path to a generator's .json manifest")
    parser.add_argument("--out", default="tune-sampling", help="output folder for sweep.json and sweep.png")
    parser.add_argument("--task", default=None,
                        help="the generator's task, where its manifest names one that cannot be found: "
                             "path/to/file.py:ClassName or package.module:ClassName")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--inits", type=int, default=32, help="fresh inits (default: 32)")
    parser.add_argument("--seed", type=int, default=2_000_000, help="init i has seed SEED + i (default: 2000000)")
    parser.add_argument("--samples", type=int, default=4, help="updates per init and sampler (default: 4)")
    parser.add_argument("--method", default="ddim", help="ddim, ddpm or dpm++2m (default: ddim)")
    parser.add_argument("--sampling-steps", default=",".join(map(str, DEFAULT_STEPS)),
                        help=f"sampling steps to try, comma-separated (default: {','.join(map(str, DEFAULT_STEPS))})")
    parser.add_argument("--steps", dest="sampling_steps", action=DeprecatedAlias, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # its name before 0.x: --steps means training steps elsewhere
    parser.add_argument("--t-min", default=",".join(map(str, DEFAULT_T_MIN)),
                        help=f"early-stop timesteps to try, comma-separated (default: {','.join(map(str, DEFAULT_T_MIN))})")
    parser.add_argument("--guidance", default="1",
                        help="classifier-free guidance scales to try, comma-separated, e.g. 1,1.5,2,3; above 1 needs a "
                             "generator trained with --prompt-dropout (default: 1)")
    parser.add_argument("--temperature", default="1",
                        help="sampling temperatures to try (the scale of the sampling noise), comma-separated, e.g. "
                             "1,0.5,0; 0 is the deterministic path from x_T = 0 (default: 1)")
    parser.add_argument("--holdout", type=int, default=5000, help="supervised tasks: training examples held out as validation data (default: 5000)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="samplers within this relative distance of the best median count as equal; the one "
                             "with the fewest steps is chosen (default: 0.01)")
    parser.add_argument("--write", action="store_true", help="record the choice in the manifest (give its path)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="no PNG")


def main(args: argparse.Namespace) -> int:
    config = TuneConfig(
        generator=args.generator, out=args.out, task=args.task, data_root=args.data_root, inits=args.inits, seed=args.seed,
        samples=args.samples, method=args.method, steps=parse_numbers(args.sampling_steps, "--sampling-steps"),
        t_min=parse_numbers(args.t_min, "--t-min"), guidance=parse_numbers(args.guidance, "--guidance", float),
        temperature=parse_numbers(args.temperature, "--temperature", float),
        holdout=args.holdout, tolerance=args.tolerance, write=args.write,
        progress=not args.no_progress, plots=not args.no_plots,
    )
    check_seed(config.seed, config.inits)
    check_out_dir(config.out)
    check_plots(config.plots)
    result = tune_sampling(config)
    print(format_table(result))
    wrote = [str(Path(config.out) / "sweep.json"), *result.get("plots", [])]
    if "written_to" in result:
        wrote.append(f"the sampling entry of {result['written_to']}")
    print("wrote " + ", ".join(wrote))
    return 0
