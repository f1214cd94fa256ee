"""How raw parameters and metrics map to the units a generator works in.

One definition shared by generator training (``pretrain``) and sampling (``GptOptimizer``):

* parameters are multiplied by a corpus-wide ``param_scale`` (G.pt: ``0.538 / std(θ)``);
* metrics are mapped affinely so that the corpus's range ``[metric_lo, metric_hi]`` becomes
  ``[0, 1]`` (values outside the range map outside ``[0, 1]``; callers decide whether to clamp).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

GPT_TARGET_STD = 0.538  # G.pt scales parameters so that their corpus-wide std is this value


@dataclass(frozen=True)
class Normalization:
    param_scale: float
    metric_lo: float
    metric_hi: float

    def __post_init__(self) -> None:
        if not (self.param_scale > 0 and torch.isfinite(torch.tensor(self.param_scale))):
            raise ValueError(f"param_scale must be a positive finite number, got {self.param_scale}")
        if not self.metric_hi > self.metric_lo:
            raise ValueError(f"metric range must satisfy lo < hi, got [{self.metric_lo}, {self.metric_hi}]")

    @classmethod
    def from_stats(cls, param_std: float, metric_lo: float, metric_hi: float) -> "Normalization":
        """G.pt's choice: scale parameters to a corpus-wide std of 0.538."""
        return cls(GPT_TARGET_STD / param_std, float(metric_lo), float(metric_hi))

    def params(self, theta: torch.Tensor) -> torch.Tensor:
        return theta * self.param_scale

    def unparams(self, theta: torch.Tensor) -> torch.Tensor:
        return theta / self.param_scale

    def metric(self, value: torch.Tensor) -> torch.Tensor:
        return (value - self.metric_lo) / (self.metric_hi - self.metric_lo)

    def unmetric(self, value: torch.Tensor) -> torch.Tensor:
        return value * (self.metric_hi - self.metric_lo) + self.metric_lo

    def to_dict(self) -> dict:
        return asdict(self)
