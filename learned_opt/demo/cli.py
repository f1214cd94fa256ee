"""``learned-opt demo``: its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cartpole import JSON_NAME, format_cartpole_table
from .mnist import format_table, run_demo
from .update import DEMO_TASKS, DemoConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=DEMO_TASKS[0], choices=DEMO_TASKS,
                        help=f"cartpole-mlp needs no download; mnist-mlp reads MNIST (default: {DEMO_TASKS[0]})")
    parser.add_argument("--generator", default=None,
                        help="shipped generator name or path to a .json manifest (default: the task's name)")
    parser.add_argument("--data-root", default=None, help="dataset root for mnist-mlp (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--download", action="store_true", help="let torchvision download MNIST")
    parser.add_argument("--out", default="learned-opt-demo",
                        help="folder for the PNG and JSON (demo_cartpole.* or demo.*)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and the sampler")
    parser.add_argument("--steps", type=int, default=300, help="mnist-mlp: Adam and SGD steps (default: 300)")
    parser.add_argument("--eval-every", type=int, default=10, help="mnist-mlp: baseline test metrics every N steps")
    parser.add_argument("--ppo-env-steps", type=int, default=50_000,
                        help="cartpole-mlp: PPO's budget in environment steps (default: 50000)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's own)")
    parser.add_argument("--method", default=None, help="sampler: ddim, ddpm or dpm++2m (default: the generator's own)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(args: argparse.Namespace) -> int:
    config = DemoConfig(
        task=args.task, generator=args.generator, data_root=args.data_root, download=args.download, out=args.out,
        seed=args.seed, steps=args.steps, eval_every=args.eval_every, ppo_env_steps=args.ppo_env_steps,
        sampling_steps=args.sampling_steps, method=args.method, plot=not args.no_plot,
    )
    result = run_demo(config)
    if config.task == "cartpole-mlp":
        table, written = format_cartpole_table, JSON_NAME
    else:
        table, written = format_table, "demo.json"
    print(table(result))
    print(f"wrote {Path(config.out) / written}" + (f" and {result['plot']}" if "plot" in result else ""))
    return 0
