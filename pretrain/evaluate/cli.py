"""``learned-opt eval``: its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from learned_opt.errors import ConfigError
from learned_opt.options import check_out_dir, check_plots, check_seed, parse_device

from .config import EvalConfig
from .report import format_summary
from .run import evaluate_generator


def add_sampler_arguments(parser: argparse.ArgumentParser, chosen_how: str) -> None:
    """``--sampling-steps``, ``--method``, ``--t-min``, ``--guidance``, ``--temperature`` (each defaulting to the generator's
    own sampler), ``--candidates`` (samples per update; ``chosen_how`` says which one is kept),
    ``--rank`` (who chooses) and ``--no-keep-if-met``."""
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's own, else 50)")
    parser.add_argument("--method", default=None,
                        help="sampler: ddim, ddpm or dpm++2m (default: the generator's own, else ddim)")
    parser.add_argument("--t-min", type=int, default=None,
                        help="stop sampling at this timestep and return its x0 prediction (default: the generator's own, else 0)")
    parser.add_argument("--guidance", type=float, default=None, metavar="W",
                        help="classifier-free guidance scale: 1 is plain conditional sampling, above 1 follows the "
                             "prompt more strongly; needs a generator trained with --prompt-dropout "
                             "(default: the generator's own, else 1)")
    parser.add_argument("--temperature", type=float, default=None, metavar="S",
                        help="the scale of the sampling noise: 1 samples the generator's distribution, below 1 nearer "
                             "its modes, 0 is its deterministic path (default: the generator's own, else 1)")
    parser.add_argument("--candidates", type=int, default=1, help=f"samples per update, {chosen_how} (default: 1)")
    parser.add_argument("--rank", choices=("closure", "self"), default="closure",
                        help="with --candidates: 'closure' keeps the best on validation data, 'self' the best by the "
                             "generator's own metric prediction (a generator trained with --property-head; no data "
                             "and no environment steps) (default: closure)")
    parser.add_argument("--no-keep-if-met", dest="keep_if_met", action="store_false",
                        help="sample even when the metric already meets the prompt (GptOptimizer's keep_if_met=False); "
                             "by default θ is then kept, as GptOptimizer does")


def check_rank_choice(rank: str, points: int, also: str = "") -> None:
    """:class:`ConfigError` for ``--rank self`` where there is one point to choose from: the option
    would be silently ignored. ``also`` names the other way to give several (bench's ``--step-size``)."""
    if rank == "self" and points < 2:
        raise ConfigError(f"--rank self chooses among several samples and there is one: give --candidates 2 or more "
                          f"(with --temperature above 0){also}, or leave --rank out")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="shipped generator name or path to a .json manifest")
    parser.add_argument("--store", default=None,
                        help="corpus store for the memorisation and denoising checks (both skipped without)")
    parser.add_argument("--out", required=True, help="folder for eval.json and the PNG plots")
    parser.add_argument("--task", default=None,
                        help="the generator's task, where its manifest names one that cannot be found: "
                             "path/to/file.py:ClassName or package.module:ClassName")
    parser.add_argument("--data-root", default=None,
                        help="dataset root (default: $LEARNED_OPT_DATA; cartpole-mlp needs none and ignores it)")
    parser.add_argument("--inits", type=int, default=20, help="fresh initialisations (default: 20)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="init i has seed SEED + i (default: 1000000)")
    add_sampler_arguments(parser, "the best by the generator's metric on validation data kept")
    parser.add_argument("--guidance-taper", choices=("on", "off"), default=None,
                        help="'on': the guidance scale in full at the best prompt, tapering to 1 for prompts that ask "
                             "less; 'off': constant at every prompt (default: the generator's own, else off; the "
                             "prompt-alignment check is where it shows)")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="training examples held out as validation data for --candidates (default: 5000)")
    parser.add_argument("--max-steps", type=int, default=3000,
                        help="supervised tasks: Adam and SGD steps of the baselines the update is compared with "
                             "(default 3000)")
    parser.add_argument("--max-env-steps", type=int, default=100_000,
                        help="control tasks: PPO environment steps per init (default: 100000)")
    parser.add_argument("--prompts", type=int, default=20, help="prompts per network for alignment (default: 20)")
    parser.add_argument("--repeats", type=int, default=10, help="successive updates (default: 10)")
    parser.add_argument("--memo-runs", type=int, default=500, help="corpus runs searched (default: 500)")
    parser.add_argument("--memo-checkpoints", type=int, default=4, help="checkpoints per searched run (default: 4)")
    parser.add_argument("--denoise-runs", type=int, default=64,
                        help="held-out corpus runs (the generator's split) of the denoising check; "
                             "0: skip (default: 64)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA where there is one (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def main(args: argparse.Namespace) -> int:
    # checked here, before the generator is loaded and anything is written
    device = str(parse_device(args.device))
    check_out_dir(args.out)
    check_plots(not args.no_plots)
    check_seed(args.seed, max(args.inits, 1))  # init i has seed SEED + i
    check_rank_choice(args.rank, args.candidates)
    config = EvalConfig(
        generator=args.generator, out=args.out, task=args.task, store=args.store, data_root=args.data_root, inits=args.inits,
        seed=args.seed, sampling_steps=args.sampling_steps, method=args.method, t_min=args.t_min,
        guidance=args.guidance, temperature=args.temperature, candidates=args.candidates, rank=args.rank,
        guidance_taper=None if args.guidance_taper is None else args.guidance_taper == "on",
        keep_if_met=args.keep_if_met, holdout=args.holdout, max_steps=args.max_steps,
        max_env_steps=args.max_env_steps, prompts=args.prompts, repeats=args.repeats, memo_runs=args.memo_runs,
        memo_checkpoints=args.memo_checkpoints, denoise_runs=args.denoise_runs, device=device,
        progress=not args.no_progress, plots=not args.no_plots,
    )
    result = evaluate_generator(config)
    print(format_summary(result))
    print(f"wrote {Path(config.out) / 'eval.json'}" + "".join(f", {p}" for p in result.get("plots", [])))
    return 0
