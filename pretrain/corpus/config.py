"""What ``learned-opt corpus`` builds, and what one call did."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from learned_opt.errors import ConfigError
from learned_opt.options import check_seed
from learned_opt.tasks import Task

from .plan import HParamRanges


# what a warm-started run's first checkpoint holds: the generator's update it starts from, or the
# seeded init that update was made from (pairs from it then teach one jump to where warm runs end)
WARM_FIRST = ("start", "init")
# Ceilings of a plan, checked before anything is planned or allocated:
MAX_RUNS = 1_000_000  # every run's plan (seed, hyperparameters, checkpoint steps) is made before training starts
MAX_EPOCHS = 10_000  # a run's checkpoint steps are drawn from a permutation of all its steps: 10,000 epochs of
                     # 60,000 examples at batch 32 are already 18.75 million steps (150 MB per run)


@dataclass
class CorpusConfig:
    """What ``learned-opt corpus`` builds (one field per command-line option)."""

    task: str | Task = "mnist-mlp"  # a registered name, "file.py:Class", "module:Class" (or a Task)
    runs: int = 8  # run ids 0 .. runs-1
    out: str = "corpus"
    data_root: str | None = None  # else $LEARNED_OPT_DATA
    download: bool = False
    batch_runs: int = 16  # runs trained together
    seed: int = 0  # run r has seed seed + r
    epochs: int | None = None  # overrides every run's epochs (quick corpora)
    gpt_recipe: bool = False  # G.pt's fixed recipe instead of drawn hyperparameters
    device: str = "cpu"
    train_examples: int | None = None  # train on the first N training examples only
    checkpoints: int = 200  # K per run
    ranges: HParamRanges | None = None  # supervised: None takes the task's corpus_ranges (or the defaults)
    gradient: str = "auto"  # supervised: how batched gradients are computed (pretrain.corpus.gradients)
    eval_examples: int | None = None  # supervised: checkpoints evaluated on the first N test (and training) examples
    eval_on: str = "test"  # supervised: "validation" measures the task's validation split, which runs then never train on
    warm_start: str | None = None  # supervised: a generator whose one update of each init starts the run (warm.py)
    warm_from: int = 0  # with warm_start: the first run id that starts warm
    warm_first: str = "start"  # with warm_start: what a warm run's first checkpoint holds, "start" or "init"
    init_scale: tuple[float, float] | None = None  # supervised: each run's init times a factor drawn log-uniformly from it
    progress: bool = True
    env_steps: int | None = None  # control: overrides every run's environment steps
    ppo_ranges: Any = None  # control: a PPORanges (None: the task's corpus_ranges or the defaults)
    ppo_shape: Any = None  # control: a PPOShape (None: the corpus default)

    def validate(self) -> None:
        """Refuse (:class:`ConfigError`) run counts, sizes, epochs and seeds that cannot be planned,
        before the store is created (a store records its settings, so a bad one would outlive the fix)."""
        if not str(self.out).strip():
            raise ConfigError("--out is empty: name a folder for the store (e.g. --out corpus/)")
        if self.runs < 0 or self.batch_runs < 1 or self.checkpoints < 2:
            raise ConfigError(f"--runs must be >= 0, --batch-runs >= 1 and --checkpoints >= 2, got {self.runs}, "
                              f"{self.batch_runs} and {self.checkpoints}")
        for option, value in (("--train-examples", self.train_examples), ("--eval-examples", self.eval_examples),
                              ("--env-steps", self.env_steps)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be at least 1 (or left out for the task's own), got {value}")
        for option, value, ceiling in (("--runs", self.runs, MAX_RUNS), ("--epochs", self.epochs, MAX_EPOCHS)):
            if value is not None and value > ceiling:
                raise ConfigError(f"{option} {value:,} is more than this builder plans: at most {ceiling:,} "
                                  "(every run is planned, with all its steps, before training starts)")
        check_seed(self.seed, max(self.runs, 1))  # run r has seed SEED + r
        if self.warm_from and self.warm_start is None:
            raise ConfigError(f"--warm-from {self.warm_from} needs --warm-start GENERATOR: the generator whose update "
                              "starts those runs")
        if self.init_scale is not None:
            lo, hi = self.init_scale
            if not (0 < lo <= hi < math.inf):
                raise ConfigError(f"--init-scale takes LOW HIGH with 0 < LOW <= HIGH, got {lo} {hi}")
        if self.warm_first not in WARM_FIRST:
            raise ConfigError(f"--warm-first-checkpoint must be one of {', '.join(WARM_FIRST)}, got {self.warm_first!r}")
        if self.warm_first != "start" and self.warm_start is None:
            raise ConfigError(f"--warm-first-checkpoint {self.warm_first} needs --warm-start GENERATOR: only warm runs "
                              "have a start that differs from their init")


@dataclass
class CorpusSummary:
    """What one call (one rank) did."""

    written: int = 0
    dropped: int = 0
    skipped: int = 0  # finished or dropped before this call (resume)
    checkpoints: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dropped_ids: list[int] = field(default_factory=list)

    @property
    def checkpoints_per_s(self) -> float:
        return self.checkpoints / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_checkpoint(self) -> float:
        return self.bytes / self.checkpoints if self.checkpoints else 0.0

    @property
    def runs_per_minute(self) -> float:
        return 60.0 * (self.written + self.dropped) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.written} runs written, {self.dropped} dropped (non-finite or |w| > 10), "
            f"{self.skipped} already done; {self.checkpoints_per_s:.1f} checkpoints/s, "
            f"{self.bytes_per_checkpoint:,.0f} bytes/checkpoint, {self.seconds:.1f} s"
        )
