"""Small measures on known data: R², step grids, summaries, steps to reach a target, fresh inits."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch

from learned_opt.demo import first_step_at_or_above, first_step_at_or_below
from learned_opt.errors import ConfigError
from learned_opt.tasks import Task



def r2_score(prompted: torch.Tensor, achieved: torch.Tensor) -> torch.Tensor:
    """G.pt's prompt alignment per network: R² of achieved against prompted, ``[..., K]`` -> ``[...]``.

    ``1 - Σ(achieved - prompted)² / Σ(prompted - mean(prompted))²`` (the coefficient of
    determination with the identity as the model; 1 is perfect, it can be negative).
    """
    p, a = prompted.double(), achieved.double()
    ss_res = ((a - p) ** 2).sum(-1)
    ss_tot = ((p - p.mean(-1, keepdim=True)) ** 2).sum(-1)
    return (1.0 - ss_res / ss_tot).float()


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float | None:
    """Spearman's rank correlation of two equally long sequences (ties get their mean rank); None
    for fewer than two values or a constant sequence."""
    x, y = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (x, y))
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs sequences of one length, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return None
    rx, ry = _mean_ranks(x), _mean_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / scale if scale > 0 else None


def _mean_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``v`` [n], tied values given the mean of their ranks."""
    ranks = torch.empty_like(v)
    ranks[v.argsort()] = torch.arange(v.numel(), dtype=v.dtype)
    _, group = torch.unique(v, return_inverse=True)
    sums = torch.zeros(int(group.max()) + 1, dtype=v.dtype).index_add_(0, group, ranks)
    return (sums / torch.bincount(group).to(v.dtype))[group]


def log_grid(max_steps: int) -> list[int]:
    """0 and the 1-2-3-5 steps of each decade up to ``max_steps`` (which is always included)."""
    out, scale = {0, int(max_steps)}, 10
    while scale <= max_steps:
        out.update(m * scale for m in (1, 2, 3, 5) if m * scale <= max_steps)
        scale *= 10
    return sorted(out)


def summary(values: Sequence[float | None]) -> dict:
    """Median, quartiles, mean, min, max and count of the finite values (None and NaN skipped)."""
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return {"n": 0, "median": None, "q1": None, "q3": None, "mean": None, "min": None, "max": None}
    t = torch.tensor(v, dtype=torch.float64)
    q1, med, q3 = (float(x) for x in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    return {"n": len(v), "median": med, "q1": q1, "q3": q3, "mean": statistics.fmean(v), "min": v[0], "max": v[-1]}


def steps_to_reach(grid: Sequence[int], curves: torch.Tensor, targets: torch.Tensor,
                   direction: str = "min") -> list[int | None]:
    """Per network, the first grid step whose value is at or below its target (``direction="max"``:
    at or above): ``[N, G]``, ``[N]``; None where never reached (or the target is NaN)."""
    first = {"min": first_step_at_or_below, "max": first_step_at_or_above}[direction]
    return [first(grid, c.tolist(), float(t)) for c, t in zip(curves, targets)]


def solved_share(returns: torch.Tensor, threshold: float) -> float:
    """The share of ``[N]`` returns at or above ``threshold`` (a task's ``solved_return``)."""
    return float((returns >= threshold).double().mean())


def reach_summary(reach: list[int | None], curves: torch.Tensor) -> dict:
    """Steps-to-reach statistics; a baseline whose curve is all NaN (dropped: it diverged) is
    counted as diverged, not as "not reached", and left out of both."""
    diverged = curves.isnan().all(-1).tolist()
    kept = [r for r, d in zip(reach, diverged) if not d]
    return {"steps_to_reach": summary(kept), "not_reached": kept.count(None), "diverged": sum(diverged)}


def init_params(task: Task, seeds: Sequence[int], kind: str = "default") -> torch.Tensor:
    """Fresh inits ``[N, P]``: ``torch.manual_seed(seed); task.build_model()``, then ``kind``.

    ``"default"``: PyTorch's init; ``"kaiming-normal"``: weights ``kaiming_normal_`` (fan-in,
    ReLU), biases zero; ``"uniform-x3"``: the default init times 3. The global RNG is restored.
    """
    layout = task.layout()
    out = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(int(seed))
            model = task.build_model()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if kind == "kaiming-normal":
                        torch.nn.init.kaiming_normal_(p, nonlinearity="relu") if p.dim() > 1 else p.zero_()
                    elif kind == "uniform-x3":
                        p.mul_(3.0)
                    elif kind != "default":
                        raise ConfigError(f"unknown init kind {kind!r}")
            out.append(layout.flatten_module(model))
    return torch.stack(out)  # [N, P]
