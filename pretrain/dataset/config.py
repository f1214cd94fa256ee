"""What pairs a corpus yields (:class:`PairConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from learned_opt.errors import ConfigError


GPT_MAX_GAP = 199  # G.pt: θ_i -> θ_{i+s}, s uniform in 1..199


@dataclass
class PairConfig:
    """How training pairs are drawn from a store."""

    metric: str | None = None  # the conditioning metric; None: the task's default_metric
    max_gap: int = GPT_MAX_GAP  # largest j - i, in checkpoint indices
    heldout_fraction: float = 0.1  # share of runs kept out of training (by run id)
    split_seed: int = 0  # the hash salt of the train / held-out split
    augment: bool = True  # one random hidden-unit permutation per pair
    init_fraction: float = 0.0  # share of each batch drawn from pairs that start at the initialisation
    late_fraction: float = 0.0  # share of each batch drawn from pairs that start in the second half of their run
    late_max_gap: int | None = None  # the late share's largest j - i (None: max_gap)
    std_sample_runs: int = 64  # runs sampled to estimate the corpus-wide parameter std
    std_sample_rows: int = 16  # checkpoints read per sampled run

    def __post_init__(self) -> None:
        if self.max_gap < 1:
            raise ConfigError(f"Invalid max_gap: {self.max_gap} (must be >= 1)")
        if self.std_sample_runs < 1 or self.std_sample_rows < 1:
            raise ConfigError("std_sample_runs and std_sample_rows must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"Invalid heldout_fraction: {self.heldout_fraction} (must be in [0, 1))")
        if not 0.0 <= self.init_fraction <= 1.0:
            raise ConfigError(f"Invalid init_fraction: {self.init_fraction} (must be in [0, 1])")
        if not (0.0 <= self.late_fraction <= 1.0 and self.init_fraction + self.late_fraction <= 1.0 + 1e-9):
            raise ConfigError(f"Invalid late_fraction: {self.late_fraction} (must be in [0, 1 - init_fraction])")
        if self.late_max_gap is not None and self.late_max_gap < 1:
            raise ConfigError(f"Invalid late_max_gap: {self.late_max_gap} (must be >= 1)")
