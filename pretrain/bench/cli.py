"""``learned-opt bench``: its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.options import parse_device

from ..evaluate import add_sampler_arguments
from .config import MODES, MOMENTS, BenchConfig, parse_bases, parse_every
from .periodic import run_bench
from .report import format_summary


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="periodic", help="what to measure (default: periodic)")
    parser.add_argument("--generator", required=True, help="shipped generator name or path to a .json manifest")
    parser.add_argument("--out", required=True, help="folder for bench.json and periodic.png")
    parser.add_argument("--task", default=None,
                        help="the generator's task, where its manifest names one that is not registered here: "
                             "path/to/file.py:ClassName or package.module:ClassName (default: the manifest's)")
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
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA where there is one (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG")


def main(args: argparse.Namespace) -> int:
    config = BenchConfig(
        generator=args.generator, out=args.out, task=args.task, mode=args.mode, data_root=args.data_root, inits=args.inits,
        seed=args.seed, steps=args.steps, bases=parse_bases(args.bases), every=parse_every(args.every),
        holdout=args.holdout, eval_every=args.eval_every, prompt=args.prompt, moments=args.moments,
        sampling_steps=args.sampling_steps, method=args.method, t_min=args.t_min, candidates=args.candidates,
        device=str(parse_device(args.device)),
        progress=not args.no_progress, plots=not args.no_plots,
    )
    result = run_bench(config)
    print(format_summary(result))
    print(f"wrote {Path(config.out) / 'bench.json'}" + "".join(f", {p}" for p in result.get("plots", [])))
    return 0
