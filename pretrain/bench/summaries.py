"""Per-init rows and summaries of the benchmark's runs: targets, ratios, median curves."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from learned_opt.demo import first_step_at_or_below
from .runs import Run


LATE_STEP = 1000  # "late" updates: those after this many base steps, when a warm start no longer helps


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def median_finite(values) -> float | None:
    """The median of the finite ones of ``values`` (None where there are none)."""
    v = [float(x) for x in values if _finite(x)]
    return statistics.median(v) if v else None


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference`` (below 1: fewer steps or seconds than the reference); None if undefined."""
    if value is None or reference is None or not reference > 0:
        return None
    return value / reference


def target_loss(final_losses: Sequence[float]) -> float | None:
    """The median of the base alone's final test losses (diverged runs left out)."""
    return median_finite(final_losses)


def init_row(grid: Sequence[int], run: Run, target: float | None, seed: int) -> dict:
    """One init's figures for one configuration."""
    reach = None if target is None else first_step_at_or_below(grid, run.test_loss, target)
    wall = None if reach is None else run.wall_s[list(grid).index(reach)]
    c = run.counters
    return {
        "seed": seed,
        "steps_to_target": reach,
        "wall_to_target_s": wall,
        "final_test_loss": run.test_loss[-1],
        "train_seconds": run.wall_s[-1],
        **{k: c.get(k, 0) for k in ("attempted", "accepted", "rejected", "failed", "kept")},
        "acceptance_rate": c["accepted"] / c["attempted"] if c.get("attempted") else None,
        "late_attempted": sum(t > LATE_STEP for t in run.attempted_at),
        "late_accepted": sum(t > LATE_STEP for t in run.accepted_at),
        "late_kept": sum(t > LATE_STEP for t in run.kept_at),
        "generation_seconds": run.generation_seconds,
        "accepted_at": run.accepted_at,
        "accepted_step_sizes": run.accepted_step_sizes,
        "diverged_at": run.diverged_at,
    }


def summarise(rows: Sequence[dict], base_rows: Sequence[dict] | None = None) -> dict:
    """Medians of one configuration's rows and, with the base alone's ``base_rows`` (same inits, same
    order), ratios to it and the share of inits whose final loss is not worse than the base's.

    Medians of steps and seconds to the target are over the inits that reached it (``reached`` says
    how many did); the ratios divide this configuration's median by the base alone's.
    """
    reached = [r for r in rows if r["steps_to_target"] is not None]
    steps = median_finite(r["steps_to_target"] for r in reached)
    wall = median_finite(r["wall_to_target_s"] for r in reached)
    attempted = sum(r["attempted"] for r in rows)
    late_attempted = sum(r.get("late_attempted", 0) for r in rows)
    late_accepted = sum(r.get("late_accepted", 0) for r in rows)
    late_kept = sum(r.get("late_kept", 0) for r in rows)
    late_sampled = late_attempted - late_kept  # kept updates draw no sample
    out = {
        "inits": len(rows),
        "reached": len(reached),
        "median_steps_to_target": steps,
        "median_wall_to_target_s": wall,
        "median_final_test_loss": median_finite(r["final_test_loss"] for r in rows),
        "median_train_seconds": median_finite(r["train_seconds"] for r in rows),
        "attempted": attempted,
        "accepted": sum(r["accepted"] for r in rows),
        "rejected": sum(r["rejected"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "kept": sum(r.get("kept", 0) for r in rows),
        "acceptance_rate": sum(r["accepted"] for r in rows) / attempted if attempted else None,
        "late_after_step": LATE_STEP,
        "late_attempted": late_attempted,
        "late_sampled": late_sampled,
        "late_kept": late_kept,
        "late_accepted": late_accepted,
        "late_acceptance_rate": late_accepted / late_sampled if late_sampled else None,  # of the sampled ones
        "median_generation_seconds": median_finite(r["generation_seconds"] for r in rows),
        "diverged": sum(r["diverged_at"] is not None for r in rows),
    }
    if base_rows is not None:
        base = summarise(base_rows)
        out["steps_ratio"] = ratio(steps, base["median_steps_to_target"])
        out["wall_ratio"] = ratio(wall, base["median_wall_to_target_s"])
        out["never_worse"] = sum(_not_worse(r["final_test_loss"], b["final_test_loss"])
                                 for r, b in zip(rows, base_rows, strict=True)) / len(rows)
    return out


def median_curve(values: Sequence[Sequence[float]]) -> list[float]:
    """The median over inits at each grid step ``[G]`` of per-init curves ``[N, G]``; a diverged
    run's NaN counts as +inf (worse than any loss), so every init counts."""
    worst = [[math.inf if not _finite(v) else float(v) for v in column] for column in zip(*values)]
    return [statistics.median(column) for column in worst]


def curve_summary(grid: Sequence[int], runs: Sequence[Run], target: float | None, base: dict | None = None) -> dict:
    """Steps and seconds to the target of the **median curve** (the median test loss over inits at each
    grid step) and, with the base alone's ``base`` summary, their ratios to it: every init counts, and
    the base alone reaches its own target (the median of its final losses) by its last step."""
    losses = median_curve([r.test_loss for r in runs])
    walls = median_curve([r.wall_s for r in runs])
    reach = None
    if target is not None:
        reach = next((g for g, v in zip(grid, losses) if v <= target), None)
    wall = None if reach is None else walls[list(grid).index(reach)]
    wall = wall if wall is None or math.isfinite(wall) else None
    out = {"curve_steps_to_target": reach, "curve_wall_to_target_s": wall}
    if base is not None:
        out["curve_steps_ratio"] = ratio(reach, base["curve_steps_to_target"])
        out["curve_wall_ratio"] = ratio(wall, base["curve_wall_to_target_s"])
    return out


def _not_worse(loss: float, base_loss: float) -> bool:
    """A final loss at or below the base alone's; a diverged base is beaten by any finite loss."""
    if not _finite(loss):
        return False
    return loss <= base_loss if _finite(base_loss) else True
