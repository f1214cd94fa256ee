"""Statistics of a checkpoint store: what ``learned-opt corpus`` reports and ``index.json`` caches."""

from __future__ import annotations

import json
import math
from pathlib import Path

from learned_opt.fileio import atomic_write

from .store_meta import STORE_FORMAT_VERSION, json_bytes

INDEX_FILE = "index.json"


def cached_stats(store, refresh: bool = False) -> dict:
    """:func:`compute_stats` of the store's runs, from ``index.json`` while the set of runs is
    unchanged (and unless ``refresh``), else computed and cached."""
    ids, dropped = store.run_ids(), store.dropped_ids()
    if not refresh:
        cached = read_index(store.root)
        if cached and cached.get("run_ids") == ids and cached.get("dropped_ids") == dropped:
            return cached["stats"]
    stats = compute_stats(store, ids, dropped)
    write_index(store, ids, dropped, stats)
    return stats


def write_index(store, ids: list[int] | None = None, dropped: list[int] | None = None, stats: dict | None = None) -> None:
    """Rewrite ``index.json`` (atomically; last writer wins, every version is valid)."""
    ids = store.run_ids() if ids is None else ids
    dropped = store.dropped_ids() if dropped is None else dropped
    stats = compute_stats(store, ids, dropped) if stats is None else stats
    payload = {"format_version": STORE_FORMAT_VERSION, "run_ids": ids, "dropped_ids": dropped, "stats": stats}
    try:
        data = json_bytes(payload)
        atomic_write(Path(store.root) / INDEX_FILE, lambda tmp: tmp.write_bytes(data))
    except OSError:
        pass  # the index is a cache: a read-only store still works


def read_index(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None


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
