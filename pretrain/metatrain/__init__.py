"""Meta-train the per-parameter learned optimizer (LearnedOptimizer) by persistent evolution strategies.

``learned-opt meta-train --data-root DIR --out runs/lopt`` trains the rule's MLP with antithetic
PES over truncated unrolls of small MLPs on downsampled MNIST (:mod:`pretrain.metatrain.family`,
:mod:`pretrain.metatrain.pes`), Adam as the outer optimizer, starting from the hand-set Adam-like
rule (:func:`learned_opt.lopt.model.hand_set_theta`). ``--resume`` continues ``out/checkpoint.pt``
exactly (with any number of ``torchrun`` processes that divides ``--pairs``: the population is
shared out between them, :mod:`pretrain.metatrain.shard`); ``--outer-optimizer learned`` lets a
learned rule, by default the one being meta-trained, step the rule's weights
(:mod:`pretrain.metatrain.outer`); the weights are written as ``out/{name}.safetensors`` + ``out/{name}.json``, ready for
``LearnedOptimizer(params, weights="out/{name}.json")``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from learned_opt.errors import ConfigError
from learned_opt.lopt.weights import names_a_file

from .outer import OUTER_OPTIMIZERS
from .trainer import MetaConfig, check_destination, meta_train, resume_settings

__all__ = ["MetaConfig", "configure", "main", "meta_train"]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


# the options that set MetaConfig's fields: unset, they take the checkpoint's values on --resume
SETTINGS = ("outer_steps", "pairs", "truncation", "unroll", "sigma", "outer_lr", "outer_optimizer", "outer_weights",
            "outer_loss", "widths", "depths", "batch_sizes", "image_size", "pools", "max_params", "seed",
            "checkpoint_every")


def configure(p: argparse.ArgumentParser) -> None:
    d = MetaConfig()
    S = argparse.SUPPRESS  # a setting's default: given or not, a resume tells them apart
    p.add_argument("--out", required=True, help="folder for the checkpoint, log.jsonl, meta_loss.png and weights")
    p.add_argument("--data-root", default=None, help="folder holding MNIST (default: $LEARNED_OPT_DATA)")
    p.add_argument("--name", default="lopt", help="name of the exported weights (default: lopt)")
    p.add_argument("--resume", action="store_true",
                   help="continue out/checkpoint.pt (a fresh start if there is none); the settings not given take "
                        "the checkpoint's values, and --outer-steps and --checkpoint-every its own")
    p.add_argument("--outer-steps", type=int, default=S, help=f"ES updates of the rule (default: {d.outer_steps})")
    p.add_argument("--pairs", type=int, default=S, help=f"antithetic pairs (population = 2 x pairs; default: {d.pairs})")
    p.add_argument("--truncation", type=int, default=S, help=f"inner steps per truncation (default: {d.truncation})")
    p.add_argument("--unroll", type=int, default=S, help=f"inner steps per task (default: {d.unroll})")
    p.add_argument("--sigma", type=float, default=S, help=f"ES perturbation scale (default: {d.sigma:g})")
    p.add_argument("--outer-lr", type=float, default=S, help=f"the outer optimizer's learning rate (default: {d.outer_lr:g})")
    p.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, default=S,
                   help="what steps the rule's weights: adam, or learned, a learned rule (default: adam)")
    p.add_argument("--outer-weights", default=S,
                   help="with --outer-optimizer learned: self (the rule being meta-trained trains itself), a "
                        "shipped name, a manifest path or hand-set (default: self)")
    p.add_argument("--outer-loss", choices=("mean", "log-mean"), default=S,
                   help=f"per truncation: the mean validation loss, or the mean of its log (default: {d.outer_loss})")
    p.add_argument("--widths", type=_ints, default=S, help=f"hidden widths to draw from, e.g. 16,32,64 (default: {','.join(map(str, d.widths))})")
    p.add_argument("--depths", type=_ints, default=S, help=f"hidden layer counts to draw from, e.g. 1,2 (default: {','.join(map(str, d.depths))})")
    p.add_argument("--batch-sizes", type=_ints, default=S,
                   help=f"inner batch sizes to draw from (default: {','.join(map(str, d.batch_sizes))})")
    p.add_argument("--image-size", type=int, default=S, help=f"MNIST downsampled to this (7, 14 or 28; default: {d.image_size})")
    p.add_argument("--pools", type=_ints, default=S,
                   help="per task, inputs pooled further by a factor drawn from these, e.g. 1,2 (default: 1)")
    p.add_argument("--max-params", type=int, default=S,
                   help="tasks with more parameters are drawn again (default: 0, no limit)")
    p.add_argument("--seed", type=int, default=S, help=f"seed of the tasks and perturbations (default: {d.seed})")
    p.add_argument("--checkpoint-every", type=int, default=S,
                   help=f"outer steps between checkpoints (default: {d.checkpoint_every})")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch

    cpus = os.cpu_count() or 1
    if not 1 <= args.threads <= cpus:
        raise ConfigError(f"--threads must be between 1 and this machine's {cpus} CPUs, got {args.threads}")
    torch.set_num_threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in SETTINGS}
    weights = given.get("outer_weights", "")
    if names_a_file(weights) and Path(weights).is_file():
        given["outer_weights"] = str(Path(weights).resolve())  # found from anywhere, as a resume may run
    saved = resume_settings(Path(args.out) / "checkpoint.pt") if args.resume else {}
    if "outer_optimizer" in given:  # the saved outer rule goes with the saved outer optimizer
        saved.pop("outer_weights", None)
    config = MetaConfig(**{**saved, **given})
    check_destination(args.out, args.name, resume=args.resume)
    data = config.family().load_data(args.data_root)
    meta_train(config, data, args.out, resume=args.resume, name=args.name, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"weights written to {args.out}/{args.name}.json")
    return 0
