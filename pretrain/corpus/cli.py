"""``learned-opt corpus``: its arguments, and the single- or multi-process run."""

from __future__ import annotations

import argparse
import os

from learned_opt import tasks
from learned_opt.errors import LearnedOptError, StoreError
from learned_opt.options import parse_device

from ..store import Store
from .build import accept_settings, build_corpus, corpus_settings, family_for
from .config import WARM_FIRST, CorpusConfig
from .gradients import STRATEGIES
from .ppo_family import PPORanges


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="mnist-mlp",
                        help=f"a registered task ({', '.join(tasks.names())}), path/to/file.py:ClassName or "
                             "package.module:ClassName (default: mnist-mlp; docs/your-own-model.md)")
    parser.add_argument("--runs", type=int, default=None, help="number of runs: ids 0 .. RUNS-1 (required unless --verify)")
    parser.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--batch-runs", type=int, default=16, help="runs trained together (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; run r has seed SEED + r")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--gpt-recipe", action="store_true",
                        help="G.pt's recipe for every run: SGD Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, 25 epochs")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA where there is one (default: auto)")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N training examples only (quick corpora, tests)")
    parser.add_argument("--checkpoints", type=int, default=200, help="checkpoints per run (default: 200)")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="supervised tasks: evaluate every saved checkpoint on the first N test examples and "
                             "the first N training examples only, recorded in the store (default: the whole test set "
                             "and the task's train_loss examples); for models whose evaluation outweighs training")
    parser.add_argument("--eval-on", choices=("test", "validation"), default="test",
                        help="supervised tasks: measure every checkpoint on the test set (default) or on the task's "
                             "validation split (MNIST: the last 5,000 training images), which the runs then never "
                             "train on: the held-out metric that GptOptimizer's guard and `bench --mode periodic` measure")
    parser.add_argument("--env-steps", type=int, default=None,
                        help="control tasks: environment steps of every run (default: drawn from 25k/50k/100k)")
    parser.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="control tasks: draw each run's Adam lr log-uniformly from [LOW, HIGH] "
                             "(default: 1e-4 3e-3)")
    parser.add_argument("--gradient", default="auto", choices=STRATEGIES,
                        help="supervised tasks: how the runs' gradients are computed together: the hand-written "
                             "ReLU-MLP path, torch.func vmap, or one torch.func call per run (default: auto, "
                             "the MLP path where it applies, else the faster of vmap and loop)")
    parser.add_argument("--warm-start", default=None, metavar="GENERATOR",
                        help="supervised tasks: start each run with id >= --warm-from from this generator's one "
                             "best-prompt update of its init (a name or manifest path), recorded in the store; "
                             "runs that go on from networks like those of periodic mode")
    parser.add_argument("--warm-from", type=int, default=0, metavar="RUN_ID",
                        help="with --warm-start: the first warm-started run id (default: 0); past a store's last "
                             "run to add warm-started runs to a store of plain ones")
    parser.add_argument("--init-scale", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="supervised tasks: multiply every parameter of each run's init by a factor drawn "
                             "log-uniformly from [LOW, HIGH], recorded with its hyperparameters (default: the "
                             "task's init as it is); runs from wider and narrower inits than the task's own")
    parser.add_argument("--warm-first-checkpoint", choices=WARM_FIRST, default="start",
                        help="with --warm-start: what a warm run's first checkpoint holds: 'start', the generator's "
                             "update (default), or 'init', the seeded init it was made from, so that pairs from the "
                             "init teach one jump to where the warm runs end")
    parser.add_argument("--verify", action="store_true",
                        help="check every run file of --out against its checksums, name the corrupt runs, and exit "
                             "(status 1 if any is corrupt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def verify(out: str) -> int:
    """``--verify``: check a whole store; 0 if every run is intact, 1 if any is corrupt."""
    store = Store.open(out)
    corrupt = store.verify_all()
    for why in corrupt.values():
        print(why)
    print(f"store {out}: {len(store)} runs checked, {len(corrupt)} corrupt"
          + ("; delete the corrupt run files and run the same corpus command again to retrain them" if corrupt else ""))
    return 1 if corrupt else 0


def main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    if args.verify:
        return verify(args.out)
    if args.runs is None or args.runs < 1:
        raise LearnedOptError("--runs N is required, N >= 1: the number of runs the store should hold (ids 0 .. N-1)")

    config = CorpusConfig(
        task=args.task, runs=args.runs, out=args.out, data_root=args.data_root, download=args.download,
        batch_runs=args.batch_runs, seed=args.seed, epochs=args.epochs, gpt_recipe=args.gpt_recipe,
        device=args.device, train_examples=args.train_examples, checkpoints=args.checkpoints,
        progress=not args.no_progress, env_steps=args.env_steps, gradient=args.gradient,
        eval_examples=args.eval_examples, eval_on=args.eval_on, warm_start=args.warm_start, warm_from=args.warm_from,
        warm_first=args.warm_first_checkpoint, init_scale=None if args.init_scale is None else tuple(args.init_scale),
    )
    config.validate()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if tasks.get(config.task).kind == "control":  # environments step in NumPy: control corpora train on the CPU
        config.device = "cpu" if config.device == "auto" else config.device  # the family refuses any other
    else:
        config.device = str(parse_device(config.device, local_rank=local_rank))  # plain cuda: this process's GPU
    if args.lr_range is not None:
        try:
            config.ppo_ranges = PPORanges(lr=tuple(args.lr_range))
        except ValueError as exc:
            raise LearnedOptError(f"--lr-range: {exc}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    owns_group = distributed and not dist.is_initialized()  # a caller's group is the caller's to end
    if owns_group:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        task = tasks.get(config.task)
        family_for(task).check(config)
        data = task.load_data(config.data_root, download=config.download)
        store, error = None, None
        if rank == 0:  # only rank 0 creates the store; the others open it once it exists
            try:
                settings = corpus_settings(config)
                store = Store.create(config.out, task, settings=settings)
                store.clean_stale_temp()
                store.verify()
                accept_settings(store, settings, config.runs)  # before any run is written
            except LearnedOptError as exc:
                error = str(exc)
        if distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise StoreError(error)
        if store is None:
            store = Store.open(config.out)
        summary = build_corpus(config, store=store, data=data, rank=rank, world_size=world_size)
        prefix = f"[rank {rank}] " if distributed else ""
        print(f"{prefix}corpus {config.out}: {summary.line()}", flush=True)
        if distributed:
            dist.barrier()
        if rank == 0:
            stats = store.stats(refresh=True)
            print(f"store {config.out}: {stats['runs']} runs, {stats['dropped']} dropped, "
                  f"{stats['checkpoints']} checkpoints, {stats['bytes_per_checkpoint']:,.0f} bytes/checkpoint",
                  flush=True)
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0
