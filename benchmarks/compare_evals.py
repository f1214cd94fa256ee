"""Is one generator's update better than another's, init by init?

    python benchmarks/compare_evals.py benchmarks/results/mnist-cnn-v14-cpu benchmarks/results/mnist-cnn-v13-cpu

Reads two ``learned-opt eval`` results (folders or their ``eval.json``) measured on the same unseen
inits (the same task, ``--seed`` and ``--inits``) and compares the one-update test metrics init by
init: the first's minus the second's, as a mean ± standard error, a median, and on how many inits
the first is lower. A paired comparison removes what the inits share, so a difference of a few
tenths of a point that two medians cannot separate can be told from noise. Prints a line per metric
and writes ``compare.json`` beside the first result (or into ``--out``).

``--pool NEW2 NEW3 ...`` adds results of other samplers (or generators) on the same inits to the
first, and compares the best of them per init, chosen by its test loss (``--by test_error``: by
its test error), with the second: for the metric it is chosen by, an upper bound on what any pick
among those samples (the generator's own ranking included) could gain:

    python benchmarks/compare_evals.py runs/g1 benchmarks/results/mnist-mix-cpu --pool runs/g3 runs/s20
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


def best_of(results: list[dict], by: str = "test_loss") -> dict:
    """One eval result whose one-update metrics are, init by init, those of the result with the
    lowest ``by`` there (the test set's own pick: an upper bound for any ranking)."""
    first = results[0]
    for r in results[1:]:
        if r["seeds"] != first["seeds"] or r["generator"]["task"] != first["generator"]["task"]:
            raise SystemExit(f"{r['config']['out']} was measured on other inits or another task than "
                             f"{first['config']['out']}: pool results of one `learned-opt eval --seed --inits`")
    key = [r["one_step"]["after"][by] for r in results]
    chosen = [min(range(len(results)), key=lambda j: key[j][i]) for i in range(len(first["seeds"]))]
    after = {m: [results[j]["one_step"]["after"][m][i] for i, j in enumerate(chosen)]
             for m in METRICS if all(m in r["one_step"]["after"] for r in results)}
    outs = [r["config"]["out"] for r in results]
    label = f"best of {len(results)} by {by}: {', '.join(outs)}"
    return {**first, "one_step": {"after": after}, "config": {"out": label},
            "generator": {**first["generator"], "sha256": f"pool of {len(results)}"},
            "chosen": [outs[j] for j in chosen]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", help="an eval result (folder or eval.json)")
    parser.add_argument("old", help="the eval result to compare it with, on the same inits")
    parser.add_argument("--pool", nargs="+", default=[], metavar="EVAL",
                        help="more results on the same inits: compare the best of them and NEW per init")
    parser.add_argument("--by", choices=METRICS, default="test_loss",
                        help="what --pool's best is chosen by (default: test_loss)")
    parser.add_argument("--out", default=None, help="folder for compare.json (default: the new result's folder)")
    args = parser.parse_args()
    new = best_of([load(p) for p in (args.new, *args.pool)], args.by) if args.pool else load(args.new)
    result = compare(new, load(args.old))
    if args.pool:
        result["chosen"] = {o: new["chosen"].count(o) for o in dict.fromkeys(new["chosen"])}
    out = Path(args.out) if args.out else (Path(args.new) if Path(args.new).is_dir() else Path(args.new).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    label = result["new"]["sha256"] if args.pool else result["new"]["sha256"][:8]
    print(f"{label} against {result['old']['sha256'][:8]}, one update, init by init:")
    for metric, r in result["one_update"].items():
        print(f"  {metric}: median {r['new_median']:.4g} against {r['old_median']:.4g}; new - old "
              f"{r['mean_difference']:+.4g} ± {r['standard_error']:.2g} (mean ± s.e.), median {r['median_difference']:+.4g}, "
              f"lower on {r['lower']} of {r['inits']}")


if __name__ == "__main__":
    main()
