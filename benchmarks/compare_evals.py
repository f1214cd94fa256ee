"""Is one generator's update better than another's, init by init?

    python benchmarks/compare_evals.py benchmarks/results/mnist-cnn-v14-cpu benchmarks/results/mnist-cnn-v13-cpu

Reads two ``learned-opt eval`` results (folders or their ``eval.json``) measured on the same unseen
inits (the same task, ``--seed`` and ``--inits``) and compares the one-update test metrics init by
init: the first's minus the second's, as a mean ± standard error, a median, and on how many inits
the first is lower. A paired comparison removes what the inits share, so a difference of a few
tenths of a point that two medians cannot separate can be told from noise. Prints a line per metric
and writes ``compare.json`` beside the first result (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

METRICS = ("test_error", "test_loss")


def load(path: str | Path) -> dict:
    """An ``eval.json``, from its path or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {path} ({exc}): give a `learned-opt eval --out` folder or its eval.json")


def paired(new: list[float], old: list[float]) -> dict:
    """``new - old`` per init: mean, its standard error, median, and counts lower/higher."""
    diff = [a - b for a, b in zip(new, old, strict=True)]
    n = len(diff)
    se = statistics.stdev(diff) / math.sqrt(n) if n > 1 else float("nan")
    return {"inits": n, "new_median": statistics.median(new), "old_median": statistics.median(old),
            "mean_difference": statistics.fmean(diff), "standard_error": se,
            "median_difference": statistics.median(diff),
            "lower": sum(d < 0 for d in diff), "higher": sum(d > 0 for d in diff)}


def compare(new: dict, old: dict) -> dict:
    """The paired one-update comparison of two eval results; refuses results of other inits."""
    if new["generator"]["task"] != old["generator"]["task"]:
        raise SystemExit(f"the two results are of different tasks ({new['generator']['task']!r}, "
                         f"{old['generator']['task']!r}): compare results of one task")
    if new["seeds"] != old["seeds"]:
        raise SystemExit("the two results were measured on different inits: run `learned-opt eval` with the same "
                         "--seed and --inits for both")
    rows = {}
    for metric in METRICS:
        a, b = new["one_step"]["after"].get(metric), old["one_step"]["after"].get(metric)
        if a is not None and b is not None:
            rows[metric] = paired(a, b)
    return {"new": {"sha256": new["generator"]["sha256"], "out": new["config"]["out"]},
            "old": {"sha256": old["generator"]["sha256"], "out": old["config"]["out"]},
            "one_update": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", help="an eval result (folder or eval.json)")
    parser.add_argument("old", help="the eval result to compare it with, on the same inits")
    parser.add_argument("--out", default=None, help="folder for compare.json (default: the new result's folder)")
    args = parser.parse_args()
    result = compare(load(args.new), load(args.old))
    out = Path(args.out) if args.out else (Path(args.new) if Path(args.new).is_dir() else Path(args.new).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{result['new']['sha256'][:8]} against {result['old']['sha256'][:8]}, one update, init by init:")
    for metric, r in result["one_update"].items():
        print(f"  {metric}: median {r['new_median']:.4g} against {r['old_median']:.4g}; new - old "
              f"{r['mean_difference']:+.4g} ± {r['standard_error']:.2g} (mean ± s.e.), median {r['median_difference']:+.4g}, "
              f"lower on {r['lower']} of {r['inits']}")


if __name__ == "__main__":
    main()
