"""Choosing θ′ among a generative update's candidates: by the closure (``rank="closure"``, measuring
each candidate in place), or by the generator itself (``rank="self"``: its property head predicts
each candidate's metric, with no closure call and no data). Used by
:meth:`GptOptimizer.generate <learned_opt.optimizer.GptOptimizer.generate>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .collectives import broadcast_flag, broadcast_int
from .errors import ConfigError
from .proposal import MetricValue, improvement, load_sample, measure, worse

RANKS = ("closure", "self")


def check_rank(rank, generator) -> None:
    """:class:`ConfigError` unless ``rank`` is one of :data:`RANKS` and ``generator`` can do it."""
    if rank not in RANKS:
        raise ConfigError(f"Invalid rank: {rank!r} (one of {', '.join(map(repr, RANKS))}: who chooses among the "
                          f"candidates, the closure or the generator's own metric prediction)")
    if rank == "self" and not generator.has_property_head:
        raise ConfigError(f"rank='self' needs a generator with a property head, and {generator.name!r} has none: "
                          f"retrain it with `learned-opt train --property-head W` (e.g. 1.0), or use rank='closure'")


def check_candidates(candidates: int, temperature: float, option: str = "sampling_temperature",
                     fewer: str | None = "or 1 candidate") -> None:
    """:class:`ConfigError` for several candidates at sampling temperature 0, where every sampler is
    deterministic and the N candidates would be one sample N times; ``option`` names the setting
    to change, ``fewer`` the other way out (None: there is none)."""
    if candidates > 1 and temperature == 0:
        raise ConfigError(f"{candidates} candidates at sampling temperature 0 are one sample {candidates} times "
                          f"(sampling is deterministic there): give {option} above 0 (e.g. 0.5)"
                          + (f", {fewer}" if fewer else ""))


def rank_by_prediction(opt, samples: torch.Tensor, valid: list[int]) -> tuple[int | None, list[float | None], str | None]:
    """``(chosen, predicted, reason)``: the valid candidate whose metric the generator predicts best
    (None, with the reason, when no prediction is finite), and the prediction per candidate
    (None for those that failed validation or whose prediction is not finite). Under
    torch.distributed rank 0's choice is taken."""
    gen = opt.generator
    predicted: list[float | None] = [None] * samples.shape[0]
    try:
        values = gen.predict_metric(samples[valid]).float().tolist()  # [V]
    except Exception as exc:  # a broken head must not break training
        values, reason = [], f"the generator's property head raised {exc!r}"
    else:
        reason = "the generator's metric predictions are not finite"
    for i, v in zip(valid, values):
        predicted[i] = v if math.isfinite(v) else None
    finite = [(v, i) for i, v in enumerate(predicted) if v is not None]
    chosen = (min if gen.metric_direction == "min" else max)(finite, key=lambda vi: vi[0])[1] if finite else -1
    chosen = broadcast_int(chosen, samples.device)
    return (None, predicted, reason) if chosen < 0 else (chosen, predicted, None)


@dataclass
class ClosureChoice:
    """What measuring candidates with the closure decided."""

    chosen: int
    after: float | None  # the closure's value with the chosen candidate
    scores: list[float | None]  # the closure's value per measured candidate
    accept: bool
    reason: str | None


def choose_by_closure(opt, closure: Callable[[], MetricValue], samples: torch.Tensor, pool: list[int], before: float,
                      dtype: torch.dtype, many: bool) -> ClosureChoice:
    """Load each candidate of ``pool`` into the parameters and measure it with ``closure``; keep the
    best, refused (with ``opt.guard``) when worse than ``before``. ``many``: the closure chooses
    among several candidates (named in the reasons). The caller restores θ on every exit."""
    direction, name = opt.generator.metric_direction, opt.generator.metric_name
    params, layout = opt.params, opt.generator.layout
    measured = []  # (value or None, why not) per candidate of the pool
    for i in pool:
        load_sample(layout, samples[i].to(dtype), params)
        measured.append(measure(opt, closure))
    scores = [v for v, _ in measured]
    finite = [(v, i) for (v, _), i in zip(measured, pool) if v is not None]
    after, chosen, accept, reason = None, pool[0], True, None
    if finite:
        after, chosen = (min if direction == "min" else max)(finite, key=lambda vi: vi[0])
        if opt.guard and worse(after, before, direction, opt.min_improvement):
            accept, reason = False, f"{name} went from {before:.6g} to {after:.6g}"
            if opt.min_improvement:
                reason += (f", an improvement of {improvement(after, before, direction):.3g}, less than min_improvement="
                           f"{opt.min_improvement:g} x {abs(before):.6g} = {opt.min_improvement * abs(before):.3g}")
            if many:
                reason += f" (the best of {len(pool)} {'points' if len(opt.step_sizes) > 1 else 'candidates'})"
    else:  # nothing measurable to keep
        accept, reason = False, measured[0][1]
        if len(pool) > 1:
            reason = f"no candidate of {len(pool)} gave a finite metric (the first: {reason})"
    device = samples.device
    return ClosureChoice(broadcast_int(chosen, device), after, scores, broadcast_flag(accept, device), reason)
