"""Where do runs that start from a generator's update end, beside runs that start from their init?

    python benchmarks/warm_runs.py --store runs/mnist-corpus --out benchmarks/results/warm-runs-mnist
    python benchmarks/warm_runs.py --store runs/cnn-boot --plain runs/cnn-corpus --out benchmarks/results/warm-runs-cnn
    python benchmarks/warm_runs.py --store runs/cnn-boot5 --against runs/cnn-boot4 --out benchmarks/results/warm-runs-cnn5

Reads a store that holds both (built by ``learned-opt corpus`` and then ``--warm-start GEN
--warm-from N``; docs/corpus.md), or a store of warm runs and, with ``--plain``, a store of plain
runs built with the same seed, whose runs with the warm runs' ids are the same runs started from
their inits (then also compared run by run). Both kinds draw their hyperparameters from the same
ranges, each run from its own seed, so the two groups differ only in where they start. A warm
run's first checkpoint is its start, or its init where the store records
``--warm-first-checkpoint init``. Per group and per number
of epochs: runs, runs dropped, the median test error and loss at the first and the last
checkpoint, and the ratio of the warm group's median final test error to the plain group's.
With ``--against``, another store built with the same task and seed (an earlier bootstrap round, or
runs of other ``--epochs``), whose runs with the warm runs' ids started from the same inits: the two
compared run by run. Writes ``warm_runs.json`` and ``warm_runs.png`` (final test error per run
against its epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pretrain.evaluate.plots import save_figure
from pretrain.store import Store


def run_row(store: Store, run_id: int, metric: str = "test_error") -> dict:
    """One run's epochs, optimizer and first/last metrics."""
    _, metrics = store.read_metrics(run_id)
    _, hparams, _ = store.read_info(run_id)
    return {"run": run_id, "epochs": hparams["epochs"], "optimizer": hparams["optimizer"],
            **{f"{name}_{where}": float(metrics[name][i]) for name in (metric, "test_loss")
               for where, i in (("first", 0), ("last", -1))}}


def warm_run_ids(store: Store, from_run: int) -> set[int]:
    """The ids of ``store``'s warm runs, kept or dropped."""
    return {r for r in store.run_ids() + store.dropped_ids() if r >= from_run}


def runs_by_start(store: Store, from_run: int, plain: Store | None = None) -> dict:
    """``{"plain": [...], "warm": [...]}``, a :func:`run_row` per run: below ``from_run`` plain, at or above
    it warm; with a ``plain`` store, its runs with the ids of ``store``'s warm runs (kept or dropped) are the
    plain group."""
    groups = {"plain": [], "warm": []}
    for run_id in store.run_ids():
        groups["warm" if run_id >= from_run else "plain"].append(run_row(store, run_id))
    if plain is not None:
        ids = warm_run_ids(store, from_run)
        groups["plain"] = [run_row(plain, r) for r in plain.run_ids() if r in ids]
    return groups


def check_plain(store: Store, plain: Store, warm_ids: set[int]) -> None:
    """Refuse a ``plain`` store whose runs with ``warm_ids`` are not the same runs from their inits."""
    mine = {k: v for k, v in (store.settings or {}).items() if k != "warm_start"}
    theirs = {k: v for k, v in (plain.settings or {}).items() if k != "warm_start"}
    if mine != theirs or store.task_name != plain.task_name:
        raise SystemExit(f"{plain.root} was built with other settings than {store.root}: --plain needs a store "
                         "built with the same task and settings (seed, epochs, examples, checkpoints, ranges)")
    first_warm = ((plain.settings or {}).get("warm_start") or {}).get("from_run")
    held = set(plain.run_ids()) | set(plain.dropped_ids())
    bad = sorted(r for r in warm_ids if r not in held or (first_warm is not None and r >= first_warm))
    if bad:
        raise SystemExit(f"{plain.root} has no plain run with id {bad[0]} ({len(bad)} of the warm runs' ids): "
                         "build its plain runs that far first")


def paired(groups: dict) -> dict:
    """Run by run, where both kept it: warm − plain final test error (median), and how many warm runs end lower."""
    plain = {r["run"]: r["test_error_last"] for r in groups["plain"]}
    diffs = [r["test_error_last"] - plain[r["run"]] for r in groups["warm"] if r["run"] in plain]
    return {"runs": len(diffs), "median_difference": statistics.median(diffs) if diffs else None,
            "warm_lower": sum(d < 0 for d in diffs)}


def against(groups: dict, store: Store, other: Store) -> dict:
    """The warm runs of ``store`` against the runs of ``other`` with the same ids (same task and seed:
    the same inits), run by run: both medians, the median difference, how many end lower, and
    ``other``'s median per number of epochs."""
    if store.task_name != other.task_name or (store.settings or {}).get("seed") != (other.settings or {}).get("seed"):
        raise SystemExit(f"{other.root} was built with another task or seed than {store.root}: --against needs "
                         "the same runs' inits")
    mine = {r["run"]: r for r in groups["warm"]}
    theirs = [run_row(other, r) for r in other.run_ids() if r in mine]
    if not theirs:
        raise SystemExit(f"{other.root} holds none of the warm runs' ids")
    diffs = [mine[r["run"]]["test_error_last"] - r["test_error_last"] for r in theirs]
    med = statistics.median
    return {"store": Path(other.root).name, "runs": len(theirs),
            "test_error_last": med(mine[r["run"]]["test_error_last"] for r in theirs),
            "their_test_error_last": med(r["test_error_last"] for r in theirs),
            "median_difference": med(diffs), "lower": sum(d < 0 for d in diffs),
            "their_by_epochs": {str(e): {"runs": sum(r["epochs"] == e for r in theirs),
                                         "test_error_last": med(r["test_error_last"] for r in theirs if r["epochs"] == e)}
                                for e in sorted({r["epochs"] for r in theirs})}}


def summary(runs: list[dict], dropped: int) -> dict:
    if not runs:
        return {"runs": 0, "dropped": dropped}
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"runs": len(runs), "dropped": dropped, "test_error_first": med("test_error_first"),
            "test_error_last": med("test_error_last"), "test_loss_first": med("test_loss_first"),
            "test_loss_last": med("test_loss_last"), "best_test_error_last": min(r["test_error_last"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--plain", default=None, help="a store of plain runs built with the same seed (default: "
                        "the plain runs of --store)")
    parser.add_argument("--against", default=None, help="another store built with the same task and seed (e.g. "
                        "an earlier bootstrap round): its runs with the warm runs' ids, compared run by run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    store = Store.open(args.store)
    warm = (store.settings or {}).get("warm_start")
    if warm is None:
        raise SystemExit(f"{store.root} records no warm start: add runs with `learned-opt corpus --warm-start`")
    plain = None if args.plain is None else Store.open(args.plain)
    warm_ids = warm_run_ids(store, warm["from_run"])
    if plain is not None:
        check_plain(store, plain, warm_ids)
    groups = runs_by_start(store, warm["from_run"], plain)
    dropped = [("warm" if r >= warm["from_run"] else "plain", store.read_dropped(r)["hparams"]["epochs"])
               for r in store.dropped_ids()]
    if plain is not None:
        dropped = [d for d in dropped if d[0] == "warm"] + [("plain", plain.read_dropped(r)["hparams"]["epochs"])
                                                            for r in plain.dropped_ids() if r in warm_ids]
    epochs = sorted({r["epochs"] for g in groups.values() for r in g})
    result = {"store": Path(args.store).name, "plain_store": None if plain is None else Path(args.plain).name,
              "warm_start": {k: warm[k] for k in ("generator", "sha256", "from_run", "first_checkpoint") if k in warm},
              "all": {k: summary(g, sum(d == k for d, _ in dropped)) for k, g in groups.items()},
              "by_epochs": {str(e): {k: summary([r for r in g if r["epochs"] == e], dropped.count((k, e)))
                                     for k, g in groups.items()} for e in epochs},
              "runs": groups}
    if result["all"]["plain"]["runs"]:
        result["ratio_final_test_error"] = result["all"]["warm"]["test_error_last"] / result["all"]["plain"]["test_error_last"]
    result["paired"] = paired(groups)
    if args.against is not None:
        result["against"] = against(groups, store, Store.open(args.against))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "warm_runs.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    print(f"{'':>10} {'runs':>5} {'dropped':>7} {'error first':>11} {'error last':>10} {'loss last':>9}")
    for label, rows in [("all", result["all"])] + [(f"{e} epochs", result["by_epochs"][str(e)]) for e in epochs]:
        for kind, s in rows.items():
            if s["runs"]:
                print(f"{label:>10} {kind:>5}: {s['runs']:>4} {s['dropped']:>7} {s['test_error_first']:>10.2f}% "
                      f"{s['test_error_last']:>9.2f}% {s['test_loss_last']:>9.4f}")
    if "ratio_final_test_error" in result:
        print(f"warm / plain, median final test error: {result['ratio_final_test_error']:.3f}")
    if result["paired"]["runs"]:
        p = result["paired"]
        print(f"run by run ({p['runs']} runs in both): warm - plain final test error, median "
              f"{p['median_difference']:+.2f} points; warm lower in {p['warm_lower']}")
    if "against" in result:
        a = result["against"]
        print(f"against {a['store']}, run by run ({a['runs']} runs in both): final test error {a['test_error_last']:.2f}% "
              f"against {a['their_test_error_last']:.2f}%, median difference {a['median_difference']:+.2f} points, "
              f"lower in {a['lower']}; theirs by epochs: "
              + ", ".join(f"{e}: {v['test_error_last']:.2f}% ({v['runs']})" for e, v in a["their_by_epochs"].items()))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for offset, (kind, rows) in zip((-0.8, 0.8), groups.items()):
        if not rows:  # a store of warm runs only
            continue
        ax.scatter([r["epochs"] + offset for r in rows], [r["test_error_last"] for r in rows], s=6, alpha=0.4,
                   label=f"{kind} start ({len(rows)} runs)")
        shown = [e for e in epochs if result["by_epochs"][str(e)][kind]["runs"]]
        ax.plot([e + offset for e in shown], [result["by_epochs"][str(e)][kind]["test_error_last"] for e in shown],
                marker="_", markersize=18, linestyle="none", color="black", label="medians" if offset > 0 else None)
    finals = sorted(r["test_error_last"] for g in groups.values() for r in g)
    top = finals[int(0.95 * (len(finals) - 1))]  # the worst 5% (diverged-looking runs) would flatten the rest
    ax.set(xlabel="epochs of the run", ylabel="final test error (%)", ylim=(0.9 * finals[0], 1.1 * top), xticks=epochs,
           title="Runs from their init and from the generator's update")
    ax.legend()
    save_figure(fig, out / "warm_runs.png")


if __name__ == "__main__":
    main()
