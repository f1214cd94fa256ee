"""What ``learned-opt eval`` measures: its settings and the constants behind them."""

from __future__ import annotations

from dataclasses import dataclass

from learned_opt.diffusion import METHODS, check_temperature
from learned_opt.errors import ConfigError
from learned_opt.guidance import check_guidance
from learned_opt.selection import RANKS



REPEATS_REPORTED = (1, 2, 5, 10)
PPO_TIMING_ENV_STEPS = 4096  # env steps of the single PPO run timed for seconds per env step
RETURN_BATCH = 1024  # policies rolled out at once when measuring the PPO checkpoints' returns
SCREEN_ELEMENTS = 2**22  # bounds the [Q, m, H, H] tensors of the memorisation screening per chunk
METRIC_LABELS = {"test_loss": "test loss", "test_error": "test error %", "return": "return"}


@dataclass
class EvalConfig:
    """What ``learned-opt eval`` measures (one field per command-line option)."""

    generator: str  # registry name or manifest path
    out: str = "eval"
    task: str | None = None  # the generator's task where its manifest's cannot be found ("file.py:Class")
    store: str | None = None  # corpus store for the memorisation and denoising checks (skipped when None)
    data_root: str | None = None
    inits: int = 20
    seed: int = 1_000_000  # init i has seed seed + i
    sampling_steps: int | None = None  # None: the generator's own sampler (its manifest's, else DDIM-50)
    method: str | None = None
    t_min: int | None = None
    candidates: int = 1  # samples per update, the best kept (rank "closure": on validation data; "self": predicted)
    rank: str = "closure"  # who chooses among the candidates: validation data, or the generator's property head
    guidance: float | None = None  # classifier-free guidance scale; None: the generator's own (else 1)
    temperature: float | None = None  # scale of the sampling noise; None: the generator's own (else 1)
    guidance_taper: bool | None = None  # guidance scaled down for prompts short of the best; None: the generator's own (else off)
    keep_if_met: bool = True  # repeated updates keep a network that already meets the prompt (as GptOptimizer)
    holdout: int = 5000  # MNIST training examples held out as validation data for --candidates
    max_steps: int = 3000  # Adam / SGD steps (11,700 for the full comparison)
    max_env_steps: int = 100_000  # PPO environment steps per init (control tasks)
    prompts: int = 20  # per network, for prompt alignment
    repeats: int = 10  # successive updates
    memo_runs: int = 500  # corpus runs searched in the memorisation check
    memo_checkpoints: int = 4  # per run: the final checkpoint and evenly spaced intermediate ones
    memo_queries: int = 100  # corpus checkpoints whose nearest neighbour in other runs is measured
    denoise_runs: int = 64  # held-out corpus runs of the denoising check (0: not run)
    timing_steps: int = 200  # plain Adam steps timed for seconds per step
    sample_batch: int = 128  # networks sampled at once
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        for name in ("inits", "sampling_steps", "max_steps", "max_env_steps", "prompts", "repeats", "memo_runs",
                     "memo_checkpoints", "memo_queries", "timing_steps", "sample_batch", "candidates"):
            if name == "prompts":
                continue  # its own bound, below
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.t_min is not None and self.t_min < 0:
            raise ConfigError(f"--t-min must be >= 0, got {self.t_min}")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown sampling --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rank not in RANKS:
            raise ConfigError(f"--rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.guidance is not None:
            check_guidance(self.guidance, "--guidance")
        if self.temperature is not None:
            check_temperature(self.temperature, "--temperature")
        if self.prompts < 2:
            raise ConfigError(f"--prompts must be >= 2 (R² needs prompts that differ), got {self.prompts}")
        if self.denoise_runs < 0:
            raise ConfigError(f"--denoise-runs must be >= 0, got {self.denoise_runs}")
