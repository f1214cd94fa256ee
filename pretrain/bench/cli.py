"""``learned-opt bench``: its arguments, for ``--mode periodic`` and ``--mode lopt``."""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import ConfigError
from learned_opt.options import check_out_dir, check_plots, check_seed, parse_device

from ..evaluate import add_sampler_arguments, check_rank_choice
from .config import MODES, MOMENTS, BenchConfig, LoptBenchConfig, parse_bases, parse_every, parse_floats
from .periodic import run_bench
from .report import format_lopt_summary, format_summary

# options of one mode only (argparse default None: given or not); --candidates defaults to 1
PERIODIC_ONLY = ("generator", "bases", "every", "prompt", "moments", "sampling_steps", "method", "t_min", "guidance",
                 "temperature", "step_size", "min_improvement")
LOPT_ONLY = ("grid_steps", "lr_grid", "optimizers")
# each mode's defaults for the options both share
DEFAULTS = {"periodic": {"inits": 10, "seed": 3_000_000, "steps": 3000, "eval_every": 50},
            "lopt": {"inits": 3, "seed": 4_000_000, "steps": 10_000, "eval_every": 100}}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="periodic",
                        help="periodic: GptOptimizer's periodic mode against its base optimizer (needs --generator); "
                             "lopt: the learned optimizer against Adam, grid-tuned Adam and SGD (default: periodic)")
    parser.add_argument("--generator", default=None,
                        help="periodic: shipped generator name or path to a .json manifest (required)")
    parser.add_argument("--out", required=True, help="folder for bench.json and the PNGs")
    parser.add_argument("--task", action="append", default=None,
                        help="periodic: the generator's task, where its manifest names one that is not registered "
                             "here (default: the manifest's). lopt: the tasks to measure, repeatable or "
                             "comma-separated (default: mnist-mlp). A registered name, path/to/file.py:ClassName "
                             "or package.module:ClassName")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--inits", "--seeds", dest="inits", type=int, default=None,
                        help="fresh initialisations (default: 10 periodic, 3 lopt)")
    parser.add_argument("--seed", type=int, default=None,
                        help="init i has seed SEED + i (default: 3000000 periodic, 4000000 lopt)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: 3000 periodic, 10000 lopt)")
    parser.add_argument("--weights", default=None,
                        help="the learned optimizer's weights: a name (hand-set for the hand-set rule) or a .json "
                             "manifest (default: the shipped lopt-mnist-mlp); periodic: for the lopt base")
    parser.add_argument("--bases", default=None,
                        help="periodic: base optimizers, comma-separated: adam, sgd, lopt (default: adam,sgd)")
    parser.add_argument("--every", default=None,
                        help="periodic: periods k of generative updates, comma-separated (default: 50,100,200,500)")
    parser.add_argument("--grid-steps", type=int, default=None,
                        help="lopt: Adam(1e-3)'s median test loss at this step is the target, and the lr grid is "
                             "trained to it and chosen there (default: 2000)")
    parser.add_argument("--lr-grid", default=None,
                        help="lopt: Adam's learning rates for adam-tuned, comma-separated "
                             "(default: 3e-4,1e-3,3e-3,1e-2,3e-2)")
    parser.add_argument("--optimizers", default=None,
                        help="lopt: which to train, comma-separated: adam, adam-tuned, sgd, lopt (default: all; "
                             "adam is needed for the target)")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="last training examples held out, never trained on: periodic's metric closure, "
                             "lopt's lr choice (default: 5000)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="test loss every N steps, not timed (default: 50 periodic, 100 lopt)")
    parser.add_argument("--prompt", default=None,
                        help="periodic: a number, or frac:X for X times the current metric "
                             "(default: the generator's best prompt)")
    parser.add_argument("--moments", choices=MOMENTS, default=None,
                        help="periodic: after an accepted update keep or reset the base optimizer's state "
                             "(default: keep)")
    add_sampler_arguments(parser, "the best by the metric closure kept (periodic)")
    parser.add_argument("--step-size", default=None, metavar="A[,A...]",
                        help="periodic: GptOptimizer's step_size: the update goes to θ + A(θ′ − θ); several, "
                             "comma-separated (e.g. 1,0.5,0.25), are a line search in which the metric closure "
                             "(with --rank self, the property head) chooses (default: 1, θ′ itself)")
    parser.add_argument("--min-improvement", type=float, default=None, metavar="M",
                        help="periodic: GptOptimizer's min_improvement: the guard keeps an update only if it lowers "
                             "the held-out loss by at least this share of it, e.g. 0.01 (default: 0, not worse)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA where there is one (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")


def main(args: argparse.Namespace) -> int:
    config = lopt_config(args) if args.mode == "lopt" else periodic_config(args)
    check_seed(config.seed, config.inits)  # before any run, not when init i's seed turns out too large
    check_out_dir(config.out)  # before the runs, not when bench.json is written
    check_plots(config.plots)
    if args.mode != "lopt":
        check_rank_choice(config.rank, config.candidates * len(config.step_size), " or several --step-size values")
    result = run_bench(config)
    print(format_lopt_summary(result) if args.mode == "lopt" else format_summary(result))
    print(f"wrote {Path(config.out) / 'bench.json'}" + "".join(f", {p}" for p in result.get("plots", [])))
    return 0


def periodic_config(args: argparse.Namespace) -> BenchConfig:
    """The options of ``--mode periodic`` as a :class:`BenchConfig`."""
    refuse_foreign(args, LOPT_ONLY, "lopt")
    if args.generator is None:
        raise ConfigError("--mode periodic needs --generator: a shipped generator name or a .json manifest "
                          "(--mode lopt needs none)")
    task = None
    if args.task:
        named = [t for text in args.task for t in parse_bases(text)]
        if len(named) != 1:
            raise ConfigError(f"--mode periodic measures one task, the generator's; --task names {len(named)}")
        task = named[0]
    shared = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS["periodic"].items()}
    return BenchConfig(
        generator=args.generator, out=args.out, task=task, mode=args.mode, data_root=args.data_root,
        bases=parse_bases(args.bases or "adam,sgd"), every=parse_every(args.every or "50,100,200,500"),
        holdout=args.holdout, prompt=args.prompt, moments=args.moments or "keep",
        sampling_steps=args.sampling_steps, method=args.method, t_min=args.t_min, candidates=args.candidates,
        guidance=args.guidance, temperature=args.temperature, rank=args.rank, keep_if_met=args.keep_if_met, weights=args.weights,
        step_size=(1.0,) if args.step_size is None else parse_floats(args.step_size, "--step-size"),
        min_improvement=args.min_improvement or 0.0,
        device=str(parse_device(args.device)),
        progress=not args.no_progress, plots=not args.no_plots, **shared,
    )


def lopt_config(args: argparse.Namespace) -> LoptBenchConfig:
    """The options of ``--mode lopt`` as a :class:`LoptBenchConfig`."""
    refuse_foreign(args, PERIODIC_ONLY, "periodic")
    if args.candidates != 1 or args.rank != "closure":
        raise ConfigError("--candidates and --rank are options of --mode periodic; --mode lopt samples nothing")
    shared = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS["lopt"].items()}
    extra = {}
    if args.task:
        extra["tasks"] = tuple(t for text in args.task for t in parse_bases(text))
    if args.grid_steps is not None:
        extra["grid_steps"] = args.grid_steps
    if args.lr_grid is not None:
        extra["lr_grid"] = parse_floats(args.lr_grid, "--lr-grid")
    if args.optimizers is not None:
        extra["optimizers"] = parse_bases(args.optimizers)
    return LoptBenchConfig(
        out=args.out, weights=args.weights, data_root=args.data_root, holdout=args.holdout,
        device=str(parse_device(args.device)), progress=not args.no_progress, plots=not args.no_plots,
        **shared, **extra,
    )


def refuse_foreign(args: argparse.Namespace, names: tuple[str, ...], mode: str) -> None:
    """A one-line error for an option of the other ``mode`` given on the command line."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of "
                          f"--mode {mode}, not --mode {args.mode}; leave {'it' if len(given) == 1 else 'them'} out")
