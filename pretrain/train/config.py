"""What ``learned-opt train`` does (:class:`TrainConfig`), and which settings a resumed job may change."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from learned_opt.diffusion import DiffusionConfig
from learned_opt.errors import ConfigError, TrainingError
from learned_opt.fileio import is_plain_name
from learned_opt.generator import PRESETS
from learned_opt.layout import SCHEMES
from learned_opt.options import check_seed

from ..dataset import PairConfig


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
    late_fraction: float = 0.0  # share of each batch from pairs starting in the second half of their run (G.pt: 0)
    late_max_gap: int | None = None  # the late share's largest checkpoint gap (None: max_gap)
    precondition: bool = False  # noise-level skips around θ (learned_opt.generator); G.pt: False
    residual_std: float | None = None  # one σ of θ′ - θ for every parameter; None: σ_p measured per parameter
    pca_init: bool = False  # wide tokens' encoders start at the principal directions of θ′ - θ
    subspace_skip: bool = False  # with precondition and pca_init: skip x_t to the output in those directions
    snr_window: tuple[float, float] | None = None  # draw 90% of training t where log-SNR(θ′ - θ) is in it; None: uniform
    layer_balance: float = 0.0  # x0 error of parameter p weighted by (P / size of p's layer) ** this, mean 1; 0: off
    output_matching: float = 0.0  # weight of the output-matching loss (Task.output_divergence of x̂0 from θ′); 0: off (G.pt)
    label_hinge: float = 0.0  # weight of the hinge on x̂0's training loss above θ′'s (Task.excess_loss); 0: off
    matching_examples: int = 256  # training inputs the output-matching loss (and the hinge) draws per step
    data_root: str | None = None  # the task's data, for output matching and the hinge; None: $LEARNED_OPT_DATA
    prompt_dropout: float = 0.0  # share of pairs whose prompt is replaced by a learned null prompt (guidance); 0: off
    property_head: float = 0.0  # weight of the property head's metric regression (self-ranking); 0: no head
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
    name: str | None = None  # export name; None: the task's name
    export: bool = True  # export the EMA generator when training reaches `steps`
    resume: bool = False  # continue the checkpoint in `out` (start fresh when there is none)
    init_from: str | None = None  # start from this generator's weights (registry name or manifest path): a fine-tune
    progress: bool = True  # the progress bar (rank 0)

    def validate(self, world: int = 1) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        positive = ("steps", "batch_size", "chunk_size", "log_every", "checkpoint_every", "diffusion_steps", "max_gap",
                    "eval_batches")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if not self.store:
            raise ConfigError("no corpus given: pass --store DIR (a store built by `learned-opt corpus`)")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for f in fields(self):  # nan or inf in any number (--weight-decay nan would train to NaN weights)
            value = getattr(self, f.name)
            numbers = value if isinstance(value, (tuple, list)) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        check_seed(self.seed)
        if self.name is not None and not is_plain_name(self.name):
            raise ConfigError(f"--name {self.name!r} must be a plain file name (no '/', '\\' or NUL, not starting "
                              "with '.'): the export writes NAME.json and NAME.safetensors into --out")
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
        if not (0.0 <= self.late_fraction <= 1.0 and self.init_fraction + self.late_fraction <= 1.0 + 1e-9):
            raise ConfigError(f"--late-fraction must be in [0, 1 - --init-fraction] (the two shares of a batch "
                              f"add up to at most 1), got {self.late_fraction} with --init-fraction {self.init_fraction}")
        if self.late_max_gap is not None:
            if isinstance(self.late_max_gap, bool) or not isinstance(self.late_max_gap, int) or self.late_max_gap < 1:
                raise ConfigError(f"--late-max-gap must be a positive integer (or left out for --max-gap), "
                                  f"got {self.late_max_gap!r}")
            if not self.late_fraction:
                raise ConfigError("--late-max-gap limits the pairs of the late share of each batch: give "
                                  "--late-fraction too (a recipe such as label-hinge sets it)")
        if not (self.output_matching >= 0 and math.isfinite(self.output_matching)):
            raise ConfigError(f"--output-matching must be a number >= 0 (0: off), got {self.output_matching}")
        if not (self.label_hinge >= 0 and math.isfinite(self.label_hinge)):
            raise ConfigError(f"--label-hinge must be a number >= 0 (0: off), got {self.label_hinge}")
        if isinstance(self.matching_examples, bool) or not isinstance(self.matching_examples, int) \
                or self.matching_examples < 1:
            raise ConfigError(f"--matching-examples must be a positive integer, got {self.matching_examples!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ConfigError(f"--prompt-dropout must be in [0, 1) (the share of pairs trained without their "
                              f"prompt; 0: off), got {self.prompt_dropout}")
        if not (self.property_head >= 0 and math.isfinite(self.property_head)):
            raise ConfigError(f"--property-head must be a number >= 0 (the weight of its loss; 0: no head), "
                              f"got {self.property_head}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"--stop-after must be a positive step number, got {self.stop_after}")
        if self.workers < -1:
            raise ConfigError(f"--workers must be 0 or more (or left out for the default), got {self.workers}")
        if self.workers > (os.cpu_count() or 1):  # each is a process: more than the CPUs only slows the loop
            raise ConfigError(f"--workers {self.workers} is more than this machine's {os.cpu_count()} CPUs; "
                              "give fewer (0 builds batches in the training process)")

    def pair_config(self) -> PairConfig:
        return PairConfig(
            metric=self.metric, max_gap=self.max_gap, heldout_fraction=self.heldout_fraction,
            split_seed=self.seed, augment=self.augment, init_fraction=self.init_fraction,
            late_fraction=self.late_fraction, late_max_gap=self.late_max_gap,
        )

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(num_steps=self.diffusion_steps, schedule=self.schedule)


MAX_BATCH_FLOATS = 2**33  # batch size x parameters per network: one batch tensor of 32 GiB in float32


def check_batch_size(batch_size: int, num_params: int) -> None:
    """Refuse a batch whose tensors (pairs x parameters, several of them per step) cannot be held."""
    if batch_size * num_params > MAX_BATCH_FLOATS:
        raise ConfigError(
            f"--batch-size {batch_size:,} of {num_params:,}-parameter networks makes batch tensors of "
            f"{batch_size * num_params:,} floats; at most {MAX_BATCH_FLOATS:,} (32 GiB each) are allowed: "
            f"use --batch-size {max(1, MAX_BATCH_FLOATS // num_params):,} or less"
        )


# Settings a resumed job may change; every other field must equal the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {"store", "out", "steps", "stop_after", "log_every", "eval_every", "eval_batches",
     "checkpoint_every", "device", "amp", "workers", "name", "export", "resume", "layer_balance", "data_root", "progress"}
)
# Checked first and named in the error: they change what the model *is*.
IDENTITY_FIELDS = ("init_from", "task", "metric", "preset", "chunk_size", "tokens", "diffusion_steps", "schedule", "precondition",
                   "pca_init", "subspace_skip", "prompt_dropout", "property_head")


def with_defaults(saved: dict, cls) -> dict:
    """``saved`` (a dataclass as a dict, possibly from an older version) with the fields it lacks
    filled with ``cls``'s defaults."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse (with :class:`TrainingError`) to resume ``saved`` under an incompatible ``config``."""
    saved = with_defaults(saved, TrainConfig)  # a checkpoint from before an option existed had its default
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
