"""Size and shape of a generator (:class:`GptConfig`) and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError


NUM_SCALAR_TOKENS = 4  # timestep, metric l, prompted metric l', difference l' - l


@dataclass
class GptConfig:
    """Size and shape of a :class:`Gpt`; JSON-able via ``dataclasses.asdict``."""

    d_model: int  # width of every token
    n_layers: int  # transformer blocks
    n_heads: int  # attention heads (must divide d_model)
    mlp_ratio: float = 4.0  # hidden width of each block's MLP, as a multiple of d_model
    dropout: float = 0.0  # on attention weights and residual branches (training only)
    num_frequencies: int = 128  # sinusoidal frequencies per scalar (G.pt: 128)
    metric_max_log2_frequency: float = 14.0  # metric frequencies pi * 2^0 .. pi * 2^14 (G.pt: up to 2^14)
    timestep_max_period: float = 10000.0  # timestep frequencies 1 .. 1/max_period (t is an integer step)
    precondition: bool = False  # False: G.pt's θ + decoded; True: noise-level skips around θ (module doc)
    residual_std: float = 0.25  # root mean square of θ′ - θ in generator units (preconditioned: the initial residual_scale)
    subspace_skip: bool = False  # preconditioned only: skip x_t to the output within each token's update directions
    null_prompt: bool = False  # a learned stand-in for the prompt's tokens (l′, l′ - l): classifier-free guidance
    property_head: bool = False  # a head that predicts the metric of clean parameters (ranks samples without data)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "num_frequencies"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"GptConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"GptConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                "pick a head count that divides the width"
            )
        if not self.mlp_ratio > 0:
            raise ConfigError(f"GptConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GptConfig.dropout must be in [0, 1), got {self.dropout!r}")
        value = self.metric_max_log2_frequency  # frequencies up to pi * 2^value, in float32
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 64:
            raise ConfigError(f"GptConfig.metric_max_log2_frequency must be a number in [0, 64], got {value!r}")
        if not (self.residual_std > 0 and math.isfinite(self.residual_std)):
            raise ConfigError(f"GptConfig.residual_std must be a positive number, got {self.residual_std!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Named sizes. Parameter counts are for the mnist-mlp layout (T=11 tokens of M=1000): there the
# per-token encoders and decoders alone hold 3 * T * M * d_model = 33,000 * d_model parameters.
PRESETS: dict[str, GptConfig] = {
    # tests and smoke runs: ~1.1M on mnist-mlp (almost all encoders), a few 10K on toy layouts
    "tiny": GptConfig(d_model=32, n_layers=2, n_heads=2),
    # CPU training of layouts with many tokens (mnist-cnn's 49): ~3.6M on mnist-mlp, ~3x faster than small
    "mini": GptConfig(d_model=96, n_layers=4, n_heads=4),
    # CPU training: ~9.3M on mnist-mlp (6.3M encoders/decoders + 2.7M transformer)
    "small": GptConfig(d_model=192, n_layers=6, n_heads=6),
    # one GPU: ~111M on mnist-mlp
    "base": GptConfig(d_model=768, n_layers=12, n_heads=12),
    # G.pt's scale (width 1536, 12 layers): ~390M on mnist-mlp
    "large": GptConfig(d_model=1536, n_layers=12, n_heads=16),
}


def get_config(preset: str | GptConfig) -> GptConfig:
    """A copy of a named preset, or the given config itself."""
    if isinstance(preset, GptConfig):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return dataclasses.replace(PRESETS[preset])
    raise ConfigError(
        f"unknown generator preset {preset!r}; known presets: {', '.join(PRESETS)} "
        "(or pass a GptConfig)"
    )
