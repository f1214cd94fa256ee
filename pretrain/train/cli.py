"""``learned-opt train``: its arguments and the run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from learned_opt.generator import PRESETS
from learned_opt.errors import ConfigError
from learned_opt.layout import SCHEMES
from .config import CHECKPOINT_NAME, TrainConfig
from .export import export_checkpoint
from .outputs import load_checkpoint
from .recipes import RECIPES, recipe
from .trainer import train


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``learned-opt train``. Options left out take the defaults, or on ``--resume``
    the checkpoint's values."""
    S = argparse.SUPPRESS
    d = TrainConfig()
    add = parser.add_argument
    add("--store", default=S, help="corpus store to train on (built by `learned-opt corpus`)")
    add("--out", required=True, help="output folder: checkpoint, log.jsonl, loss.png, exported weights")
    add("--task", default=S, help="refuse a store of any other task")
    add("--metric", default=S, help="conditioning metric (default: the task's default metric)")
    add("--recipe", default=None, choices=list(RECIPES),
        help="a named set of the options below (gpt: G.pt's; neuron: the shipped mnist-mlp generator's "
             "training; output-matching: its fine-tune, with --init-from; self-ranking: that fine-tune plus prompt "
             "dropout and a property head; late-pairs: self-ranking at output-matching weight 16 with pairs late "
             "in runs; label-hinge: late-pairs at output-matching weight 64 with the label hinge at 64, the shipped "
             "MNIST generators' last fine-tunes); options given here override it")
    add("--preset", default=S, choices=list(PRESETS), help=f"generator size (default {d.preset})")
    add("--chunk-size", type=int, default=S, help=f"parameters per token (default {d.chunk_size})")
    add("--tokens", choices=SCHEMES, default=S,
        help="token scheme: 'chunk' (G.pt: chunks of --chunk-size within each layer) or 'neuron' (one token "
             "per hidden unit or convolution channel, weights shared within a layer; needs the task's unit symmetry: a "
             "chain of linear or convolutional layers, or one its task declares) (default chunk)")
    add("--steps", type=int, default=S, help=f"optimizer steps (default {d.steps})")
    add("--batch-size", type=int, default=S, help=f"pairs per step over all processes (default {d.batch_size})")
    add("--lr", type=float, default=S, help=f"peak learning rate (default {d.lr})")
    add("--weight-decay", type=float, default=S, help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    add("--warmup", type=int, default=S, help=f"linear warmup steps (default {d.warmup})")
    add("--min-lr-ratio", type=float, default=S, help="final lr of the cosine, as a share of --lr (default 0)")
    add("--grad-clip", type=float, default=S, help=f"max gradient norm, 0 for none (default {d.grad_clip})")
    add("--ema-decay", type=float, default=S, help=f"EMA decay (default {d.ema_decay})")
    add("--seed", type=int, default=S, help="seed of initialisation, split, pairs and noise (default 0)")
    add("--max-gap", type=int, default=S, help=f"largest checkpoint gap of a pair (default {d.max_gap})")
    add("--heldout-fraction", type=float, default=S, help=f"share of runs held out (default {d.heldout_fraction})")
    add("--no-augment", dest="augment", action="store_false", default=S, help="no hidden-unit permutations")
    add("--init-fraction", type=float, default=S,
        help="share of each batch from pairs that start at the initialisation (default 0: G.pt's uniform pairs)")
    add("--late-fraction", type=float, default=S,
        help="share of each batch from pairs that start in the second half of their run: updates of well-trained "
             "networks, for periodic use late in training (default 0)")
    add("--late-max-gap", type=int, default=S,
        help="largest checkpoint gap of the late share's pairs: the next few steps of a trained network rather "
             "than where its run ends (default: --max-gap)")
    add("--precondition", action="store_true", default=S,
        help="noise-level skip connections around θ (see learned_opt.generator); default: G.pt's plain residual")
    add("--pca-init", action="store_true", default=S,
        help="start the encoders of tokens wider than the model at the principal directions of θ′ - θ")
    add("--subspace-skip", action="store_true", default=S,
        help="with --precondition --pca-init: pass x_t to the output within each token's update directions")
    add("--snr-window", type=float, nargs=2, metavar=("LO", "HI"), default=S,
        help="draw 90%% of training timesteps where the log-SNR of θ′ - θ lies in [LO, HI] (default: uniform, G.pt)")
    add("--layer-balance", type=float, default=S, metavar="A",
        help="weight a parameter's x0 error by (P / its layer's size) ** A, scaled to mean 1: 0 (default) weighs "
             "every parameter alike, 1 every layer alike; may change on --resume")
    add("--output-matching", type=float, default=S, metavar="W",
        help="add W x KL(target's outputs || predicted network's) to the loss (MNIST: class probabilities on "
             "training images outside the validation holdout; CartPole: action probabilities on fixed states) "
             "(default 0: off)")
    add("--label-hinge", type=float, default=S, metavar="W",
        help="add W x max(0, predicted network's training loss - target's) on the same inputs and their labels, "
             "so that a prediction is never worse than the checkpoint it predicts (supervised tasks; default 0: off)")
    add("--matching-examples", type=int, default=S,
        help=f"inputs per step for --output-matching and --label-hinge (default {d.matching_examples})")
    add("--data-root", default=S, help="the task's data for --output-matching and --label-hinge (default: $LEARNED_OPT_DATA)")
    add("--prompt-dropout", type=float, default=S, metavar="P",
        help="classifier-free guidance: in a share P of the pairs replace the prompt by a learned null prompt, so "
             "that the generator can sample with --guidance above 1 (e.g. 0.1; default 0: off)")
    add("--property-head", type=float, default=S, metavar="W",
        help="self-ranking: add a head that predicts the metric of a network, trained with W x its squared "
             "error on both checkpoints of each pair, for GptOptimizer(candidates=N, rank='self') "
             "(e.g. 1.0; default 0: no head)")
    add("--residual-std", type=float, default=S,
        help="one σ of θ′ - θ for every parameter with --precondition (default: σ_p measured per parameter on training pairs)")
    add("--diffusion-steps", type=int, default=S, help=f"diffusion steps (default {d.diffusion_steps})")
    add("--schedule", default=S, choices=["linear", "cosine"], help=f"noise schedule (default {d.schedule})")
    add("--no-amp", dest="amp", action="store_false", default=S, help="no bf16 autocast on CUDA")
    add("--workers", type=int, default=S, help="processes building batches ahead (default: 0 on CPU, up to 4 on CUDA)")
    add("--device", default=S, help="cpu, cuda, cuda:N or auto: CUDA where there is one (default: auto)")
    add("--log-every", type=int, default=S, help=f"steps per log record (default {d.log_every})")
    add("--eval-every", type=int, default=S, help=f"steps per held-out evaluation (default {d.eval_every})")
    add("--eval-batches", type=int, default=S, help=f"held-out batches per evaluation (default {d.eval_batches})")
    add("--checkpoint-every", type=int, default=S, help=f"steps per checkpoint (default {d.checkpoint_every})")
    add("--stop-after", type=int, default=S, help="stop at this step with a checkpoint (resume later)")
    add("--name", default=S, help="name of the exported generator (default: the task's name, e.g. mnist-mlp-32 -> OUT/mnist-mlp-32.json)")
    add("--no-export", dest="export", action="store_false", default=S, help="do not export at the end")
    add("--resume", action="store_true", default=S, help="continue the checkpoint in --out (fresh start if none)")
    add("--init-from", default=S, metavar="GENERATOR",
        help="fine-tune: start from this generator (registry name or manifest path) with its architecture, "
             "units and held-out runs; --preset, --tokens, --precondition and the schedule are then its own")
    add("--export-only", action="store_true", default=False, help="export the checkpoint in --out and exit")
    add("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments: the checkpoint's settings on ``--resume``,
    else the defaults, with every option given on the command line on top."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if getattr(args, "recipe", None):
        given = {**recipe(args.recipe), **given}
    ckpt = Path(args.out) / CHECKPOINT_NAME
    if given.get("resume") and ckpt.exists():
        base = {k: v for k, v in load_checkpoint(ckpt)["config"].items() if k in {f.name for f in fields(TrainConfig)}}
        base.pop("stop_after", None)  # a stop is for one invocation, not for the job
        base.pop("workers", None)  # so is this machine's batch building: it never changes what the model sees
        base.pop("progress", None)
        return TrainConfig(**{**base, **given})
    return TrainConfig(**given)


def main(args: argparse.Namespace) -> int:
    if args.export_only:
        if getattr(args, "export", True) is False:  # given: --no-export
            raise ConfigError("--export-only exports and --no-export does not: give one of them")
        manifest = export_checkpoint(Path(args.out) / CHECKPOINT_NAME, args.out, name=getattr(args, "name", None))
        print(f"exported {manifest}")
        return 0
    result = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        if result.last:
            print(json.dumps(result.last))
        if result.manifest:
            print(f"exported {result.manifest}")
    return 0
