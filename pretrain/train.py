"""Train a generator on a checkpoint corpus (``learned-opt train``).

G.pt's recipe: the diffusion transformer learns to predict θ′ from noised θ′, θ and the metrics
of both (:mod:`pretrain.dataset` makes the pairs), with AdamW (decay on matrices only), a cosine
learning rate after a linear warmup, gradient clipping and an EMA copy of the weights, which is
what gets exported. bf16 autocast on CUDA.

Everything a job writes lives in ``--out``:

* ``checkpoint.pt`` — model, EMA, optimizer, scheduler, step, RNG states, config, split and
  normalisation; tensors and plain containers only (``torch.load(weights_only=True)``), written
  atomically. ``--resume`` continues it exactly: N steps in one go equal N/2 + resume + N/2, bit
  for bit on CPU. The data position is the step number (pairs are drawn from a generator seeded
  by ``(seed, step)``), so nothing about the data needs replaying;
* ``log.jsonl`` — one record per ``--log-every`` steps (loss, lr, grad norm, samples/s, held-out
  loss of the model and of its EMA every ``--eval-every`` steps) and ``loss.png`` drawn from it;
* ``{name}.safetensors`` + ``{name}.json`` — the exported EMA generator
  (:func:`learned_opt.pretrained.save_generator`), written when training reaches ``--steps``, or
  from the checkpoint with ``--export-only``.

``--output-matching W`` adds W × :meth:`~learned_opt.tasks.Task.output_divergence` of the predicted
networks (x̂0) from the targets (θ′) on task inputs drawn per step, so that the model is also
judged by how its networks behave, not only by how close their weights are.

``--init-from GENERATOR`` fine-tunes a trained generator instead of starting fresh: the model is
built from its manifest and starts at its weights (σ_p and PCA buffers included), pairs are in its
units (normalisation), the runs it held out stay held out, and the export records the source
under ``training.init_from`` (name, sha256, and the source's own ``training`` and ``corpus``
summaries), so the history of the weights stays readable.
Typical use: a short run with a new objective on the pairs the optimizer starts from
(``--output-matching``, ``--init-fraction``), as the shipped ``mnist-mlp`` generator was made.

Under ``torchrun --nproc_per_node N`` the job runs DistributedDataParallel (gloo on CPU, NCCL on
GPU): every rank draws the same global batch of ``--batch-size`` pairs and trains on its own
stride of it; only rank 0 writes files. Batches are built ahead by ``--workers`` DataLoader
processes; each is a pure function of its step, so the worker count never changes the result.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from learned_opt.diffusion import Diffusion, DiffusionConfig
from learned_opt.errors import ConfigError, TrainingError
from learned_opt.fileio import atomic_write
from learned_opt.generator import PRESETS, Gpt, GptConfig, build_generator, get_config
from learned_opt.layout import SCHEMES, Layout, signature_from_json, signature_to_json
from learned_opt.normalization import Normalization
from learned_opt.pretrained import LoadedGenerator, load_generator

from .dataset import (
    PairBatch,
    PairConfig,
    PairDataset,
    PairSampler,
    Split,
    StepBatches,
    open_pairs,
    open_store,
    seeded_generator,
    split_runs,
)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
CHECKPOINT_FORMAT = "learned-opt/generator-training"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a generator training job (G.pt's values where it had one)."""

    store: str = ""  # the corpus store to train on
    out: str = "generator-run"  # where checkpoint, logs and exported weights go
    task: str | None = None  # the task the store must hold; None: whatever it holds
    metric: str | None = None  # conditioning metric; None: the task's default_metric
    preset: str = "tiny"  # generator size (learned_opt.generator.PRESETS)
    chunk_size: int = 1000  # parameters per token (G.pt: <= 1000)
    tokens: str = "chunk"  # token scheme (learned_opt.layout): "chunk" (G.pt) or "neuron" (one per hidden unit)
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 64  # pairs per step, over all ranks together
    lr: float = 4e-4  # G.pt: 4e-4
    weight_decay: float = 0.1  # G.pt: 0.1, on matrices only
    warmup: int = 100  # linear warmup steps, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 switches clipping off
    ema_decay: float = 0.9999  # G.pt: 0.9999; ramped up as min(decay, (1+n)/(10+n)) over the first steps
    seed: int = 0  # model init, pair sampling, noise
    max_gap: int = 199  # pairs θ_i -> θ_j with 1 <= j - i <= max_gap (G.pt: 199)
    heldout_fraction: float = 0.1  # share of runs held out (by run id)
    augment: bool = True  # random hidden-unit permutation per pair
    init_fraction: float = 0.0  # share of each batch from pairs starting at the initialisation (G.pt: 0)
    precondition: bool = False  # noise-level skips around θ (learned_opt.generator); G.pt: False
    residual_std: float | None = None  # one σ of θ′ - θ for every parameter; None: σ_p measured per parameter
    pca_init: bool = False  # wide tokens' encoders start at the principal directions of θ′ - θ
    subspace_skip: bool = False  # with precondition and pca_init: skip x_t to the output in those directions
    snr_window: tuple[float, float] | None = None  # draw 90% of training t where log-SNR(θ′ - θ) is in it; None: uniform
    layer_balance: float = 0.0  # x0 error of parameter p weighted by (P / size of p's layer) ** this, mean 1; 0: off
    output_matching: float = 0.0  # weight of the output-matching loss (Task.output_divergence of x̂0 from θ′); 0: off (G.pt)
    matching_examples: int = 256  # training inputs the output-matching loss draws per step
    data_root: str | None = None  # the task's data, for output matching; None: $LEARNED_OPT_DATA
    diffusion_steps: int = 1000  # G.pt: 1000
    schedule: str = "linear"  # G.pt: linear betas 1e-4..0.02
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    workers: int = -1  # processes building batches ahead of the loop; -1: 0 on CPU, up to 4 on CUDA
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is there, else cpu
    log_every: int = 10
    eval_every: int = 200  # held-out loss every so many steps (0: only at the end)
    eval_batches: int = 2  # held-out batches per evaluation (fixed pairs, fixed noise)
    checkpoint_every: int = 500
    stop_after: int | None = None  # stop (with a checkpoint) at this step, e.g. before a preemption
    name: str | None = None  # export name; None: "{task}-{metric}-{preset}"
    export: bool = True  # export the EMA generator when training reaches `steps`
    resume: bool = False  # continue the checkpoint in `out` (start fresh when there is none)
    init_from: str | None = None  # start from this generator's weights (registry name or manifest path): a fine-tune

    def validate(self, world: int = 1) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        positive = ("steps", "batch_size", "chunk_size", "log_every", "checkpoint_every", "diffusion_steps", "max_gap")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if not self.store:
            raise ConfigError("no corpus given: pass --store DIR (a store built by `learned-opt corpus`)")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup < 0 or self.eval_every < 0:
            raise ConfigError("--weight-decay, --grad-clip, --warmup and --eval-every must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size % world:
            raise ConfigError(
                f"--batch-size {self.batch_size} is the global batch and must be divisible by the "
                f"number of processes ({world})"
            )
        if self.residual_std is not None and not (self.residual_std > 0 and math.isfinite(self.residual_std)):
            raise ConfigError(f"--residual-std must be a positive number, got {self.residual_std}")
        if self.residual_std is not None and not self.precondition:
            raise ConfigError("--residual-std sets the preconditioning's σ: it needs --precondition")
        if self.subspace_skip and self.init_from is None and not (self.precondition and self.pca_init):
            raise ConfigError("--subspace-skip needs --precondition and --pca-init (the skip's directions)")
        if self.snr_window is not None and not (len(self.snr_window) == 2 and self.snr_window[0] < self.snr_window[1]):
            raise ConfigError(f"--snr-window takes LO HI with LO < HI, got {self.snr_window}")
        if self.tokens not in SCHEMES:
            raise ConfigError(f"--tokens must be one of {', '.join(SCHEMES)}, got {self.tokens!r}")
        if not (0.0 <= self.layer_balance <= 1.0):
            raise ConfigError(f"--layer-balance must be in [0, 1], got {self.layer_balance}")
        if not 0.0 <= self.init_fraction <= 1.0:
            raise ConfigError(f"--init-fraction must be in [0, 1], got {self.init_fraction}")
        if not (self.output_matching >= 0 and math.isfinite(self.output_matching)):
            raise ConfigError(f"--output-matching must be a number >= 0 (0: off), got {self.output_matching}")
        if isinstance(self.matching_examples, bool) or not isinstance(self.matching_examples, int) \
                or self.matching_examples < 1:
            raise ConfigError(f"--matching-examples must be a positive integer, got {self.matching_examples!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after must be a positive step number, got {self.stop_after}")

    def pair_config(self) -> PairConfig:
        return PairConfig(
            metric=self.metric, max_gap=self.max_gap, heldout_fraction=self.heldout_fraction,
            split_seed=self.seed, augment=self.augment, init_fraction=self.init_fraction,
        )

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(num_steps=self.diffusion_steps, schedule=self.schedule)


# Settings a resumed job may change; every other field must equal the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {"store", "out", "steps", "stop_after", "log_every", "eval_every", "eval_batches",
     "checkpoint_every", "device", "amp", "workers", "name", "export", "resume", "layer_balance", "data_root"}
)
# Checked first and named in the error: they change what the model *is*.
IDENTITY_FIELDS = ("init_from", "task", "metric", "preset", "chunk_size", "tokens", "diffusion_steps", "schedule", "precondition", "pca_init", "subspace_skip")


def _with_defaults(saved: dict, cls) -> dict:
    """``saved`` (a dataclass as a dict, possibly from an older version) with the fields it lacks
    filled with ``cls``'s defaults."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse (with :class:`TrainingError`) to resume ``saved`` under an incompatible ``config``."""
    saved = _with_defaults(saved, TrainConfig)  # a checkpoint from before an option existed had its default
    now = asdict(config)
    diffs = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    # task/metric may be None in one and resolved in the other: compare resolved values
    diffs = [k for k in diffs if not (k in ("task", "metric") and now[k] is None)]
    if diffs:
        key = [k for k in diffs if k in IDENTITY_FIELDS] or diffs
        what = ", ".join(f"{k}={saved.get(k)!r} (asked: {now[k]!r})" for k in key)
        raise TrainingError(
            f"cannot resume {path}: it was trained with {what}; resume with the checkpoint's settings "
            "(leave those options out) or train into a new --out"
        )


# ---------------------------------------------------------------------------------- fine-tuning


# What a fine-tune takes from the generator it starts from (adopt_source), not from its options.
ADOPTED_FIELDS = ("task", "metric", "tokens", "chunk_size", "precondition", "subspace_skip", "pca_init",
                  "residual_std", "diffusion_steps", "schedule")


def adopt_source(config: TrainConfig, source: LoadedGenerator) -> TrainConfig:
    """``config`` with what a fine-tune of ``source`` cannot choose taken from ``source``: task,
    metric, tokens, diffusion and preconditioning (its architecture and weights come along in the
    trainer). :class:`ConfigError` when the config asks for another task or metric."""
    for name, theirs in (("task", source.task), ("metric", source.metric_name)):
        mine = getattr(config, name)
        if mine is not None and mine != theirs:
            raise ConfigError(f"--init-from {config.init_from!r} is a generator for {name} {theirs!r}, not {mine!r}; "
                              f"leave --{name} out or start from a {mine!r} generator")
    tok = source.manifest["tokenisation"]
    model = source.model.config
    adopted = dataclasses.replace(
        config, task=source.task, metric=source.metric_name, tokens=tok.get("scheme", "chunk"),
        chunk_size=tok.get("chunk_size") or config.chunk_size, precondition=model.precondition,
        subspace_skip=model.subspace_skip, pca_init=False, residual_std=None,
        diffusion_steps=source.diffusion.num_steps, schedule=source.diffusion.config.schedule,
        name=config.name or source.name,
    )
    asked = [k for k in explicit_settings(config, ADOPTED_FIELDS[2:]) if getattr(config, k) != getattr(adopted, k)]
    if asked:
        raise ConfigError(f"--init-from {config.init_from!r} takes {', '.join(asked)} from the generator it starts "
                          f"from ({', '.join(f'{k}={getattr(adopted, k)!r}' for k in asked)}); leave "
                          f"{' and '.join('--' + k.replace('_', '-') for k in asked)} out")
    if asdict(adopted.diffusion_config()) != asdict(source.diffusion.config):
        raise ConfigError(f"--init-from {config.init_from!r} has a noise schedule ({asdict(source.diffusion.config)}) "
                          f"that `train` cannot build from --diffusion-steps and --schedule alone, so it cannot be "
                          f"fine-tuned here; train a new generator instead")
    return adopted


def explicit_settings(config: TrainConfig, names) -> list[str]:
    """Those of ``names`` that ``config`` sets to something other than the default."""
    defaults = TrainConfig()
    return [k for k in names if getattr(config, k) != getattr(defaults, k)]


def source_record(source: LoadedGenerator) -> dict:
    """What a fine-tune's export says about where it started: the source's name and sha256, its
    training record and its corpus summary (without the per-run split)."""
    corpus = {k: v for k, v in (source.manifest.get("corpus") or {}).items() if k != "split"}
    return {"name": source.name, "sha256": source.sha256, "training": source.manifest.get("training"), "corpus": corpus}


def source_split(source: LoadedGenerator, run_ids, config: TrainConfig, notes: list[str] | None = None) -> Split:
    """The runs of the store that a fine-tune of ``source`` trains on and holds out: the runs the
    source held out stay held out, every other run trains. A source without a recorded split gets
    a fresh one (``config``'s fraction and seed), which may hold out runs the source trained on;
    ``notes`` gets a line saying so, and one when ``config.store`` is not the source's recorded corpus
    (runs are matched by id only)."""
    notes = notes if notes is not None else []
    corpus = source.manifest.get("corpus") or {}
    recorded = corpus.get("split")
    if corpus.get("store") and Path(corpus["store"]).name != Path(config.store).name:
        notes.append(f"--store {config.store} is not the corpus {corpus['store']} that {source.name!r} was trained on; "
                     "its held-out runs are matched by run id only")
    if not recorded:
        notes.append(f"{source.name!r} records no train/held-out split: a fresh one is drawn, and held-out loss may "
                     "include runs it trained on")
        return split_runs(run_ids, config.heldout_fraction, config.seed)
    held = set(int(r) for r in recorded["heldout"])
    return Split(tuple(r for r in run_ids if r not in held), tuple(r for r in run_ids if r in held),
                 float(recorded["heldout_fraction"]), int(recorded["seed"]))


# ---------------------------------------------------------------------------------- pieces


@dataclass
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # whether this module initialised the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job when there is one (gloo on CPU, NCCL on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown --device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but CUDA is not available here: use --device cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # "cuda": this process's own GPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


RESIDUAL_FLOOR = 0.05  # no parameter's σ_p below this share of the pooled σ


def sample_updates(pairs: PairDataset, sampler: PairSampler, count: int = 1024) -> torch.Tensor:
    """``θ′ - θ`` (generator units) ``[count, P]`` of training pairs drawn (and permuted) as
    training draws them, from a seeded stream of their own."""
    out = []
    for b in range(math.ceil(count / sampler.batch_size)):
        indices, perms = sampler.global_batch(b, stream="residual-std")
        batch = pairs.batch(indices, perms)
        out.append(batch.theta_next - batch.theta)
    return torch.cat(out)[:count]


def residual_scale_estimate(updates: torch.Tensor) -> torch.Tensor:
    """Root mean square per parameter ``[P]`` of sampled updates ``[N, P]`` (:func:`sample_updates`):
    the σ_p of the preconditioned generator, floored at ``RESIDUAL_FLOOR`` times the pooled value."""
    per_param = updates.double().square().mean(0).sqrt()
    pooled = per_param.square().mean().sqrt().item()
    if not pooled > 0:
        raise TrainingError("θ′ - θ is zero on every sampled training pair; the corpus is degenerate")
    return per_param.clamp(min=RESIDUAL_FLOOR * pooled).float()


def layer_weights(layout: Layout, balance: float) -> torch.Tensor:
    """``[1, P]``: parameter p's weight ``(P / n_l) ** balance`` for a layer (parameter tensor) of
    ``n_l`` values, scaled to mean 1. 0 weighs every parameter alike (the default); 1 gives every
    parameter tensor the same share of the loss (a bias is a tensor of its own), so that a
    network's 100 output weights count as much as its 7,840 input weights, since they decide as
    much of its function; on ``mnist-mlp`` the two 10-value biases then weigh 199 times a mean
    parameter each, and the input weights 0.25 times."""
    sizes = torch.tensor(layout.sizes, dtype=torch.float64)
    per_layer = (layout.num_params / sizes) ** balance
    weights = torch.repeat_interleave(per_layer, torch.tensor(layout.sizes))
    return (weights / weights.mean()).float().unsqueeze(0)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Gpt, config: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over decay / no-decay groups and its warmup-cosine schedule."""
    opt = torch.optim.AdamW(model.optim_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.999))

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no callables
        return lr_factor(step, config.warmup, config.steps, config.min_lr_ratio)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Ema:
    """An exponential moving average of a model's weights (the copy that gets exported)."""

    def __init__(self, model: Gpt, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        """``decay``, ramped in over the first steps so a short run's EMA is not its initialisation."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: Gpt, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def atomic_torch_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, checked for format and version (:class:`TrainingError` otherwise)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise TrainingError(f"no training checkpoint at {path}: train first, or point --out at a training run") from None
    except Exception as exc:
        raise TrainingError(
            f"cannot read the training checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is corrupt or not a training checkpoint: "
            "restore it from a copy or train into a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a learned-opt generator training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(
            f"{path} has checkpoint version {state.get('version')}, this learned-opt reads version "
            f"{CHECKPOINT_VERSION}; use the learned-opt version that wrote it"
        )
    return state


def hardware_summary(info: DistInfo) -> dict:
    """Where training ran, for the manifest."""
    dev = info.device
    return {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "world_size": info.world,
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------- logging


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log records after ``last_step`` (written after the checkpoint a job resumes from)."""
    keep = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r.get("step", 0) <= last_step)
    atomic_write(path, lambda tmp: tmp.write_text(keep, encoding="utf-8"))


def plot_losses(log_path: Path, png_path: Path) -> str | None:
    """Draw the loss curve from the JSONL log; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss-curve PNG (pip install 'learned-opt[dev]')"
    records = read_jsonl(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("heldout_loss", "held-out"), ("heldout_loss_ema", "held-out (EMA)")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (training objective; held-out: plain x0 MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return None


# ---------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` hands back."""

    model: Gpt  # the trained weights (not the DDP wrapper)
    ema: Gpt  # the EMA weights (what gets exported)
    step: int
    last: dict  # the last log record
    checkpoint: Path | None
    manifest: Path | None  # the exported manifest, when exported
    notes: list[str]


def train(config: TrainConfig, *, command: str | None = None) -> TrainResult:
    """Run (or resume) a training job as ``config`` says; see the module docstring.

    Training seeds and draws from torch's global RNG (the initialisation is seeded with
    ``config.seed``, dropout draws from it, and a checkpoint saves and a resume restores it, which
    exact resume relies on). All of that happens inside ``torch.random.fork_rng``: the caller's
    global CPU and CUDA RNG states are restored when ``train`` returns or raises.
    """
    info = setup_distributed(config.device)
    cuda = list(range(torch.cuda.device_count())) if info.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return Trainer(config, info, command or shlex.join(sys.argv)).run()
    finally:
        if info.owns_group:
            dist.destroy_process_group()


class Trainer:
    """One training job: set up from a config (and the checkpoint in ``out`` when resuming).

    Everything that can refuse (an existing checkpoint, another configuration, a bad store) is
    checked in the constructor, before anything is written.
    """

    def __init__(self, config: TrainConfig, info: DistInfo, command: str) -> None:
        config = dataclasses.replace(config)  # task and metric get resolved below
        config.validate(info.world)
        self.info, self.out = info, Path(config.out)
        self.ckpt_path, self.log_path = self.out / CHECKPOINT_NAME, self.out / LOG_NAME
        self.notes: list[str] = []

        # ---- what we start from: nothing, or a checkpoint
        state = None
        if self.ckpt_path.exists():
            if not config.resume:
                raise TrainingError(
                    f"{self.out} already holds a training checkpoint: pass --resume to continue it, "
                    "or choose another --out"
                )
            state = load_checkpoint(self.ckpt_path)
            if config.init_from is not None:  # what a fine-tune took from its source, as it took it
                saved = _with_defaults(state["config"], TrainConfig)
                given = set(explicit_settings(config, ADOPTED_FIELDS))  # anything else asked for is refused below
                config = dataclasses.replace(config, **{k: saved[k] for k in ADOPTED_FIELDS if k not in given},
                                             name=config.name or state.get("name"))
            check_resumable(state["config"], config, self.ckpt_path)
        # ---- a fine-tune starts from another generator: its model, units and held-out runs
        source = None
        if config.init_from is not None and state is None:
            source = load_generator(config.init_from)
            config = adopt_source(config, source)
        split = Split.from_dict(state["corpus"]["split"]) if state else None
        normalization = Normalization(**state["normalization"]) if state else None
        if source is not None:
            split = source_split(source, open_store(config.store, source.task).run_ids(), config, self.notes)
            normalization = source.normalization
        self.corpus = open_pairs(
            config.store, config.pair_config(),
            task=state["corpus"]["task"] if state else config.task,
            split=split, normalization=normalization,
        )
        self.notes += self.corpus.notes
        if source is not None and self.corpus.store.signature != source.layout.signature:
            raise ConfigError(f"--init-from {config.init_from!r} generates {source.layout.num_params}-parameter networks "
                              f"of another shape than the store's; fine-tune on a corpus of its task's model")
        before = _with_defaults(state["config"], TrainConfig)["layer_balance"] if state else config.layer_balance
        if before != config.layer_balance:
            self.notes.append(f"--layer-balance changed from {before:g} to {config.layer_balance:g} at step {state['step']}")
        config.task, config.metric = self.corpus.task.name, self.corpus.metric  # resolved, as recorded
        self.config = config
        self.name = config.name or f"{config.task}-{config.metric}-{config.preset}"

        # ---- model, EMA, optimizer, schedule
        self.layout = Layout(self.corpus.store.signature, config.chunk_size, config.tokens)
        # the same initialisation on every rank; train() runs this inside fork_rng, so the
        # caller's global RNG is restored afterwards
        torch.manual_seed(config.seed)
        self.sampler = PairSampler(
            len(self.corpus.train), config.batch_size, config.seed, self.corpus.task, config.augment,
            focus=self.corpus.train.start_pairs(0) if config.init_fraction else None,
            focus_fraction=config.init_fraction,
        )
        # Measured on sampled training pairs for a fresh model (deterministic: the same on every
        # rank); a resumed model brings σ_p, the PCA directions and its residual_std along.
        updates = residual_scale = None
        if state is None and source is None and (config.precondition or config.pca_init or config.snr_window is not None):
            updates = sample_updates(self.corpus.train, self.sampler)
        if state is not None:
            residual_std = _with_defaults(state["model_config"], GptConfig)["residual_std"]
        elif config.residual_std is not None:
            residual_std = config.residual_std  # one given σ for every parameter
        elif updates is not None:
            residual_scale = self.layout.group_rms(residual_scale_estimate(updates))  # chunk tokens: unchanged
            residual_std = residual_scale.square().mean().sqrt().item()  # the pooled σ, recorded
        else:
            residual_std = get_config(config.preset).residual_std
        if config.init_from is not None:  # the source generator's architecture, as it was or as checkpointed
            model_config = source.model.config if source is not None else GptConfig(
                **_with_defaults(state["model_config"], GptConfig))
        else:
            model_config = dataclasses.replace(
                get_config(config.preset), precondition=config.precondition, subspace_skip=config.subspace_skip,
                residual_std=residual_std,
            )
        self.model = build_generator(self.layout, model_config, config.diffusion_config())
        if source is not None:  # weights and buffers (σ_p, PCA directions) of the source
            self.model.load_state_dict(source.model.state_dict())
        elif state is None and config.precondition:
            self.model.residual_scale.copy_(residual_scale if residual_scale is not None else residual_std)
        if state is None and source is None and config.pca_init:
            self.model.init_encoders_from_updates(updates)
        self.source = source_record(source) if source is not None else (state or {}).get("init_from")
        self.model.to(info.device)
        if state and _with_defaults(state["model_config"], GptConfig) != asdict(self.model.config):
            raise TrainingError(
                f"cannot resume {self.ckpt_path}: preset {config.preset!r} now means "
                f"{asdict(self.model.config)}, the checkpoint holds {state['model_config']}; train into a new --out"
            )
        self.ema = Ema(self.model, config.ema_decay)
        self.opt, self.sched = make_optimizer(self.model, config)
        self.step, self.wall_before, self.commands, self.last = 0, 0.0, [command], {}
        if state:
            self.model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step, self.wall_before = int(state["step"]), float(state["wall_time_s"])
            self.commands = list(state.get("commands", [])) + [command]
            self.last = dict(state.get("last") or {})
            _restore_rng(state["rng"], info, config.seed)
        # buffers (σ_p, PCA directions) are equal on every rank from the start and never change
        self.ddp = self.model if info.world == 1 else DistributedDataParallel(
            self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self.diffusion = Diffusion(config.diffusion_config())
        self.t_probs = None
        if config.snr_window is not None:  # windowed on the scale of the updates θ′ - θ (pooled)
            scale = self.model.config.residual_std
            self.t_probs = self.diffusion.snr_window_probs(*config.snr_window, scale=scale).to(info.device)
        self.layer_weight = layer_weights(self.layout, config.layer_balance).to(info.device)  # [1, P]
        self.matching_inputs = None  # training inputs of the output-matching loss, loaded before anything is written
        if config.output_matching > 0:
            task = self.corpus.task
            self.matching_inputs = task.matching_inputs(task.load_data(config.data_root)).to(info.device)
        self.divergence = torch.zeros((), dtype=torch.float64, device=info.device)  # summed between log records
        self.use_amp = config.amp and info.device.type == "cuda"
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ one step, one evaluation

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else nullcontext()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The x0 loss weights at steps ``t``: the model's own (``1 / σ_p²`` when preconditioned)
        times the layer balance's."""
        return self.model.loss_weight(t) * self.layer_weight

    def matching_loss(self, pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``output_matching`` × the mean divergence of the networks the model predicts (x̂0) from the
        targets (θ′), on ``matching_examples`` training inputs drawn for this step and rank."""
        cfg, inputs, norm = self.config, self.matching_inputs, self.corpus.normalization
        draw = seeded_generator("matching", cfg.seed, self.step, self.info.rank, device=inputs.device)
        idx = torch.randint(0, inputs.shape[0], (cfg.matching_examples,), generator=draw, device=inputs.device)
        with torch.autocast(inputs.device.type, enabled=False):  # a KL of softmaxes: in fp32 under bf16 training
            divergence = self.corpus.task.output_divergence(norm.unparams(pred), norm.unparams(x0), inputs[idx]).mean()
        self.divergence += divergence.detach().double()
        return cfg.output_matching * divergence

    def train_step(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's share of a batch; returns (loss, grad norm) on the device."""
        noise = seeded_generator("noise", self.config.seed, self.step, self.info.rank, device=self.info.device)
        with self.autocast():
            loss = self.diffusion.training_loss(
                self.ddp, batch.theta_next, batch.cond(), generator=noise, weight=self.loss_weight,
                t_probs=self.t_probs, extra=self.matching_loss if self.matching_inputs is not None else None,
            )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.model, self.step)
        return loss.detach(), grad_norm.detach()

    @torch.no_grad()
    def heldout_loss(self) -> dict[str, float]:
        """Loss of the model and of its EMA on fixed held-out pairs with fixed noise (mean over ranks).

        Always the plain x0 MSE at uniformly drawn t (G.pt's loss), whatever the training objective
        weights or windows, so that held-out figures compare across parameterisations."""
        cfg, info, heldout = self.config, self.info, self.corpus.heldout
        models = {"heldout_loss": self.model, "heldout_loss_ema": self.ema.module}
        sampler = PairSampler(len(heldout), cfg.batch_size, cfg.seed, self.corpus.task, augment=False)
        totals = torch.zeros(len(models), dtype=torch.float64)
        for b in range(cfg.eval_batches):
            idx, _ = PairSampler.shard(sampler.global_batch(b, stream="heldout")[0], None, info.rank, info.world)
            batch = heldout.batch(idx).to(info.device)
            for k, model in enumerate(models.values()):
                model.eval()
                gen = seeded_generator("heldout-noise", cfg.seed, b, info.rank, device=info.device)
                with self.autocast():
                    totals[k] += self.diffusion.training_loss(model, batch.theta_next, batch.cond(), generator=gen).item()
        self.model.train()
        totals = _mean_over_ranks(totals / cfg.eval_batches, info)
        return {name: float(v) for name, v in zip(models, totals)}

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> dict:
        """Everything a resume needs, as tensors and plain containers (call on every rank: it
        gathers the ranks' RNG states)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": asdict(self.config),
            "model_config": asdict(self.model.config),
            "diffusion_config": asdict(self.diffusion.config),
            "signature": signature_to_json(self.layout.signature),
            "normalization": self.corpus.normalization.to_dict(),
            "corpus": self.corpus.summary(),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _rng_states(self.info),
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
            "last": self.last,
            "hardware": hardware_summary(self.info),
            "commands": self.commands,  # every invocation of this job, the first one first
            "name": self.name,
            "init_from": self.source,  # the generator a fine-tune started from (name, sha256, its training)
        }

    def save(self) -> None:
        state = self.checkpoint()  # on every rank: the RNG gather is a collective
        if self.info.is_main:
            atomic_torch_save(state, self.ckpt_path)
            note = plot_losses(self.log_path, self.out / PLOT_NAME)
            if note and note not in self.notes:
                self.notes.append(note)

    # ------------------------------------------------------------------ the loop

    def batches(self, end: int) -> DataLoader:
        """This rank's batches of steps ``self.step .. end - 1``, built ahead by worker processes."""
        info, workers = self.info, self.config.workers
        if workers < 0:
            workers = 0 if info.device.type == "cpu" else max(0, min(4, (os.cpu_count() or 1) // info.world - 1))
        return DataLoader(
            StepBatches(self.corpus.train, self.sampler, self.step, end, info.rank, info.world),
            batch_size=None, shuffle=False, num_workers=workers, pin_memory=info.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )

    def run(self) -> TrainResult:
        cfg, info = self.config, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step > 0:
                truncate_log(self.log_path, self.step)  # records written after the checkpoint
            else:
                self.log_path.write_text("", encoding="utf-8")
        has_heldout = self.corpus.heldout is not None and len(self.corpus.heldout) > 0
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        zero = lambda: torch.zeros((), dtype=torch.float64, device=info.device)  # noqa: E731 (no sync per step)
        t_log, loss_sum, n_sum = time.perf_counter(), zero(), 0
        with tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not info.is_main,
                  dynamic_ncols=True) as bar:
            self.model.train()
            for batch in self.batches(end):
                loss, grad_norm = self.train_step(batch.to(info.device, non_blocking=True))
                loss_sum += loss.double()
                n_sum += 1
                bar.update(1)
                step = self.step
                evaluate = has_heldout and (step == end or (cfg.eval_every and step % cfg.eval_every == 0))
                if step % cfg.log_every == 0 or step == end or evaluate:
                    now = time.perf_counter()
                    self.last = {
                        "step": step,
                        "loss": float(_mean_over_ranks(loss_sum, info)) / n_sum,
                        "lr": self.sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "samples_per_s": n_sum * cfg.batch_size / max(now - t_log, 1e-9),
                        "elapsed_s": self.wall_before + now - self.t_start,
                    }
                    if self.matching_inputs is not None:  # the divergence alone, before its weight
                        self.last["output_divergence"] = float(_mean_over_ranks(self.divergence, info)) / n_sum
                        self.divergence.zero_()
                    if evaluate:
                        self.last.update(self.heldout_loss())
                    if info.is_main:
                        append_jsonl(self.log_path, self.last)
                    bar.set_postfix(loss=f"{self.last['loss']:.4g}", samples_s=f"{self.last['samples_per_s']:.0f}")
                    t_log, loss_sum, n_sum = time.perf_counter(), zero(), 0
                if step % cfg.checkpoint_every == 0 or step == end:
                    self.save()

        manifest = None
        if self.step >= cfg.steps and cfg.export and info.is_main:
            manifest = export_checkpoint(self.ckpt_path, self.out, name=self.name)
        elif self.step < cfg.steps:
            self.notes.append(f"stopped at step {self.step} of {cfg.steps}: continue with --resume")
        if info.world > 1:
            dist.barrier()
        checkpoint = self.ckpt_path if self.step > 0 else None
        return TrainResult(self.model, self.ema.module, self.step, self.last, checkpoint, manifest, self.notes)


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over all ranks, on the CPU (reduced on the device: NCCL needs CUDA tensors)."""
    if info.world == 1:
        return value.cpu()
    on_device = value.to(info.device)
    dist.all_reduce(on_device)
    return on_device.cpu() / info.world


def _rng_states(info: DistInfo) -> dict:
    """The global torch RNG state of every rank (dropout draws from it)."""
    mine = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(info.device)
    if info.world == 1:
        return {"ranks": [mine]}
    gathered: list = [None] * info.world
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def _restore_rng(states: dict, info: DistInfo, seed: int) -> None:
    ranks = states.get("ranks", [])
    if len(ranks) == info.world:
        mine = ranks[info.rank]
        torch.set_rng_state(mine["cpu"])
        if info.device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], info.device)
    else:  # another world size: a fresh, still deterministic stream per rank
        torch.manual_seed(seed + 1000 * (info.rank + 1))


# ---------------------------------------------------------------------------------- export


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                      name: str | None = None) -> Path:
    """Export a training checkpoint's EMA weights as ``{name}.safetensors`` + ``{name}.json``."""
    from learned_opt import tasks
    from learned_opt.pretrained import save_generator

    path = Path(checkpoint)
    state = load_checkpoint(path)
    cfg, corpus = state["config"], state["corpus"]
    layout = Layout(signature_from_json(state["signature"]), cfg["chunk_size"], cfg.get("tokens", "chunk"))
    diffusion = DiffusionConfig(**state["diffusion_config"])
    model = build_generator(layout, GptConfig(**state["model_config"]), diffusion)
    model.load_state_dict(state["ema"])
    task = tasks.get(corpus["task"])
    last = state.get("last") or {}
    training = {
        "steps": int(state["step"]),
        "steps_planned": cfg["steps"],
        "complete": int(state["step"]) >= cfg["steps"],
        "batch_size": cfg["batch_size"],
        "pairs_seen": int(state["step"]) * cfg["batch_size"],
        "lr": cfg["lr"],
        "weight_decay": cfg["weight_decay"],
        "warmup": cfg["warmup"],
        "min_lr_ratio": cfg["min_lr_ratio"],
        "grad_clip": cfg["grad_clip"],
        "ema_decay": cfg["ema_decay"],
        "seed": cfg["seed"],
        "augment": cfg["augment"],
        "init_fraction": cfg.get("init_fraction", 0.0),
        "pca_init": cfg.get("pca_init", False),
        "snr_window": cfg.get("snr_window"),
        "layer_balance": cfg.get("layer_balance", 0.0),
        "output_matching": cfg.get("output_matching", 0.0),
        "loss": ("x0 MSE weighted by 1 / σ_p²" if cfg.get("precondition") else "x0 MSE")
        + (" and by (P / layer size) ** layer_balance" if cfg.get("layer_balance") else "")
        + (f" + output_matching x the divergence of x̂0's outputs from θ′'s on {cfg.get('matching_examples')} "
           "training inputs per step" if cfg.get("output_matching") else ""),
        "heldout_loss": "plain x0 MSE at uniformly drawn t, fixed held-out pairs and noise",
        "weights": "ema",
        "final_loss": last.get("loss"),
        "final_heldout_loss": last.get("heldout_loss"),
        "final_heldout_loss_ema": last.get("heldout_loss_ema"),
        "wall_time_s": float(state["wall_time_s"]),
        "hardware": state.get("hardware"),
        "commands": state.get("commands"),
    }
    if state.get("init_from"):
        training["init_from"] = state["init_from"]
    norm = Normalization(**state["normalization"])
    # the task's ideal (a loss of 0, a return of 500) within what the corpus reached: G.pt's "best"
    # prompt, and a default that GptOptimizer need not clamp
    best = min(max(task.metric(corpus["metric"]).best_prompt, norm.metric_lo), norm.metric_hi)
    return save_generator(
        Path(out_dir) if out_dir is not None else path.parent,
        name or state.get("name") or f"{corpus['task']}-{corpus['metric']}-{cfg['preset']}",
        model,
        diffusion,
        norm,
        task=corpus["task"],
        metric=corpus["metric"],
        best_prompt=best,
        corpus=corpus,
        training=training,
    )


# ---------------------------------------------------------------------------------- command line


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
    add("--preset", default=S, choices=list(PRESETS), help=f"generator size (default {d.preset})")
    add("--chunk-size", type=int, default=S, help=f"parameters per token (default {d.chunk_size})")
    add("--tokens", choices=SCHEMES, default=S,
        help="token scheme: 'chunk' (G.pt: chunks of --chunk-size within each layer) or 'neuron' (one token "
             "per hidden unit, weights shared within a layer; linear chains only) (default chunk)")
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
    add("--matching-examples", type=int, default=S, help=f"inputs per step for --output-matching (default {d.matching_examples})")
    add("--data-root", default=S, help="the task's data for --output-matching (default: $LEARNED_OPT_DATA)")
    add("--residual-std", type=float, default=S,
        help="one σ of θ′ - θ for every parameter with --precondition (default: σ_p measured per parameter on training pairs)")
    add("--diffusion-steps", type=int, default=S, help=f"diffusion steps (default {d.diffusion_steps})")
    add("--schedule", default=S, choices=["linear", "cosine"], help=f"noise schedule (default {d.schedule})")
    add("--no-amp", dest="amp", action="store_false", default=S, help="no bf16 autocast on CUDA")
    add("--workers", type=int, default=S, help="processes building batches ahead (default: 0 on CPU, up to 4 on CUDA)")
    add("--device", default=S, help="cpu, cuda, cuda:N or auto (default)")
    add("--log-every", type=int, default=S, help=f"steps per log record (default {d.log_every})")
    add("--eval-every", type=int, default=S, help=f"steps per held-out evaluation (default {d.eval_every})")
    add("--eval-batches", type=int, default=S, help=f"held-out batches per evaluation (default {d.eval_batches})")
    add("--checkpoint-every", type=int, default=S, help=f"steps per checkpoint (default {d.checkpoint_every})")
    add("--stop-after", type=int, default=S, help="stop at this step with a checkpoint (resume later)")
    add("--name", default=S, help="name of the exported generator (default TASK-METRIC-PRESET)")
    add("--no-export", dest="export", action="store_false", default=S, help="do not export at the end")
    add("--resume", action="store_true", default=S, help="continue the checkpoint in --out (fresh start if none)")
    add("--init-from", default=S, metavar="GENERATOR",
        help="fine-tune: start from this generator (registry name or manifest path) with its architecture, "
             "units and held-out runs; --preset, --tokens, --precondition and the schedule are then its own")
    add("--export-only", action="store_true", default=False, help="export the checkpoint in --out and exit")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed arguments: the checkpoint's settings on ``--resume``,
    else the defaults, with every option given on the command line on top."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    ckpt = Path(args.out) / CHECKPOINT_NAME
    if given.get("resume") and ckpt.exists():
        base = {k: v for k, v in load_checkpoint(ckpt)["config"].items() if k in {f.name for f in fields(TrainConfig)}}
        base.pop("stop_after", None)  # a stop is for one invocation, not for the job
        return TrainConfig(**{**base, **given})
    return TrainConfig(**given)


def main(args: argparse.Namespace) -> int:
    if args.export_only:
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
