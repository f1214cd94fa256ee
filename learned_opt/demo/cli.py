"""``learned-opt demo``: its arguments, and the demo of each task kind (:func:`run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import tasks
from ..errors import ConfigError
from ..options import check_out_dir, check_plots, check_seed
from ..pretrained import load_generator
from . import mnist
from .cartpole import format_cartpole_table, run_cartpole_demo
from .update import DEFAULT_TASK, DemoConfig, output_names

# task kind -> (run the demo, format its table)
DEMOS = {
    "control": (run_cartpole_demo, format_cartpole_table),
    "supervised": (mnist.run_supervised_demo, mnist.format_table),
}


def run_demo(config: DemoConfig) -> dict:
    """Run the demo of ``config.task``'s kind; returns the results (also written into ``config.out``)."""
    return DEMOS[demo_kind(config.task)][0](config)


def demo_kind(task: str) -> str:
    """The kind of the task named ``task`` (a name, ``file.py:Class`` or ``module:Class``), if the demo runs it."""
    kind = tasks.get(task).kind
    if kind not in DEMOS:
        raise ConfigError(f"the demo runs {' and '.join(DEMOS)} tasks; {task!r} is a {kind} task")
    return kind


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None,
                        help=f"a task name, path/to/file.py:ClassName or package.module:ClassName; {DEFAULT_TASK} "
                             f"needs no download, supervised tasks read their data (default: the --generator's own "
                             f"task, else {DEFAULT_TASK})")
    parser.add_argument("--generator", default=None,
                        help="shipped generator name or path to a .json manifest (default: the task's name)")
    parser.add_argument("--data-root", default=None,
                        help="dataset root for supervised tasks (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--out", default="learned-opt-demo",
                        help="folder for the demo's JSON and PNG, demo_TASK.json and demo_TASK.png (default: "
                             "learned-opt-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and the sampler")
    parser.add_argument("--steps", type=int, default=300, help="supervised: Adam and SGD steps (default: 300)")
    parser.add_argument("--eval-every", type=int, default=10, help="supervised: baseline test metrics every N steps")
    parser.add_argument("--ppo-env-steps", type=int, default=50_000,
                        help="control: PPO's budget in environment steps, rounded down to whole PPO updates "
                             "(default: 50000, which runs 49152)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's own)")
    parser.add_argument("--method", default=None, help="sampler: ddim, ddpm or dpm++2m (default: the generator's own)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def main(args: argparse.Namespace) -> int:
    check_seed(args.seed)
    check_out_dir(args.out)
    check_plots(not args.no_plot, "--no-plot")
    if args.steps < 1 or args.eval_every < 1:  # checked for every task: a wrong value is wrong before it matters
        raise ConfigError("--steps and --eval-every must be >= 1")
    task = args.task
    if task is None:  # the generator's own task (a user task is found through its recorded source)
        task = tasks.source_of(tasks.for_generator(load_generator(args.generator))) if args.generator else DEFAULT_TASK
    config = DemoConfig(
        task=task, generator=args.generator, data_root=args.data_root, download=args.download, out=args.out,
        seed=args.seed, steps=args.steps, eval_every=args.eval_every, ppo_env_steps=args.ppo_env_steps,
        sampling_steps=args.sampling_steps, method=args.method, plot=not args.no_plot,
    )
    run, table = DEMOS[demo_kind(config.task)]
    # torch's threads fight any other busy process: on a shared machine a few threads are much faster
    print(f"torch uses {torch.get_num_threads()} CPU thread(s) (set OMP_NUM_THREADS, e.g. OMP_NUM_THREADS=1, "
          f"on a busy machine)")
    result = run(config)
    print(table(result))
    written = Path(config.out) / output_names(result["task"])[0]
    print(f"wrote {written}" + (f" and {result['plot']}" if "plot" in result else ""))
    return 0
