"""Statistics of a checkpoint store: what ``learned-opt corpus`` reports and ``index.json`` caches."""

from __future__ import annotations

import math


def compute_stats(store, ids: list[int], dropped: list[int]) -> dict:
    total = total_sq = 0.0
    count = checkpoints = nbytes = 0
    absmax = 0.0
    mins: dict[str, float] = {}
    maxs: dict[str, float] = {}
    sums: dict[str, float] = {}
    for run_id in ids:
        params = store.read_run(run_id).params
        for part in params.split(64):  # stream: one run's rows at a time, in float64
            p = part.double()
            total += float(p.sum())
            total_sq += float((p * p).sum())
            absmax = max(absmax, float(p.abs().max()))
        count += params.numel()
        checkpoints += params.shape[0]
        nbytes += store.run_path(run_id).stat().st_size
        for name, v in store.read_metrics(run_id)[1].items():
            mins[name] = min(mins.get(name, math.inf), float(v.min()))
            maxs[name] = max(maxs.get(name, -math.inf), float(v.max()))
            sums[name] = sums.get(name, 0.0) + float(v.double().sum())
    mean = total / count if count else float("nan")
    var = max(total_sq / count - mean * mean, 0.0) if count else float("nan")
    return {
        "task": store.task_name,
        "runs": len(ids),
        "dropped": len(dropped),
        "checkpoints": checkpoints,
        "bytes": nbytes,
        "bytes_per_checkpoint": nbytes / checkpoints if checkpoints else float("nan"),
        "num_params": store.num_params,
        "param_mean": mean,
        "param_std": math.sqrt(var) if count else float("nan"),
        "param_absmax": absmax,
        "metrics": {
            n: {"min": mins[n], "max": maxs[n], "mean": sums[n] / checkpoints} for n in sorted(mins)
        },
    }
