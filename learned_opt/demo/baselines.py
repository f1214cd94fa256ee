"""The demo's baselines: the one plain training loop (:mod:`learned_opt.baselines.supervised`),
and where a curve first reaches a target."""

from __future__ import annotations

from typing import Sequence

from ..baselines.supervised import BASELINES, BaselineCurve, make_optimizer, train_baseline
from ..recipes import ADAM_LR, BATCH_SIZE

__all__ = ["ADAM_LR", "BASELINES", "BATCH_SIZE", "BaselineCurve", "first_step_at_or_below", "make_optimizer",
           "train_baseline"]


def first_step_at_or_below(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """The first of ``steps`` whose value is ``<= target`` (None if never, or if target is NaN)."""
    for s, v in zip(steps, values):
        if v <= target:
            return int(s)
    return None
