"""The learned optimizer trains itself: two meta-trainings, Adam or the rule as the outer optimizer.

Run::

    OMP_NUM_THREADS=1 python benchmarks/lopt_trains_itself.py --data-root DIR \
        --out benchmarks/results/lopt-trains-itself

Both runs start from the same hand-set rule (Adam(1e-3) itself), see the same tasks, inits,
minibatches and perturbations (one seed; the outer optimizer draws no random numbers) and differ
only in what turns each PES gradient estimate into a step of the rule's weights: Adam (lr 1e-3),
or ``--outer-optimizer learned --outer-weights self``, the rule being meta-trained, at steps of
Adam(1e-3)'s size (Metz et al. 2020's "using them to train themselves"). At the first outer step
the two outer optimizers are the same function; they part as the rule learns. Each run is a
``learned-opt meta-train`` run in ``OUT/adam`` and ``OUT/learned`` (resumed if it is there).
Writes ``OUT/trains_itself.json`` (per task: the mean meta-loss over its unroll, for both) and
``OUT/trains_itself.png`` (those curves side by side).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.metatrain import MetaConfig, meta_train

SMALL = dict(unroll=200, truncation=10, pairs=4, outer_lr=1e-3, outer_loss="log-mean", image_size=14, widths=(8, 16),
             depths=(1,), checkpoint_every=100)


def task_means(log: Path) -> list[dict]:
    """One row per task: the outer step its unroll ended at, its sizes, the mean meta-loss over it."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out, start = [], 0
    for i, r in enumerate(rows):
        if i + 1 == len(rows) or rows[i + 1]["inner_step"] <= r["inner_step"]:
            chunk = [x["meta_loss"] for x in rows[start:i + 1]]
            out.append({"outer_step": r["outer_step"], "sizes": r["task"]["sizes"], "mean": sum(chunk) / len(chunk)})
            start = i + 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/lopt-trains-itself")
    p.add_argument("--outer-steps", type=int, default=1000)
    args = p.parse_args()
    out = Path(args.out)
    results = {}
    for kind in ("adam", "learned"):
        config = MetaConfig(outer_steps=args.outer_steps, outer_optimizer=kind, **SMALL)
        folder = out / kind
        data = config.family().load_data(args.data_root)
        meta_train(config, data, folder, resume=(folder / "checkpoint.pt").exists(), name=f"lopt-outer-{kind}",
                   progress=True)
        results[kind] = task_means(folder / "log.jsonl")
    a, b = results["adam"], results["learned"]
    tail = max(1, len(a) // 4)
    summary = {
        "config": {**SMALL, "outer_steps": args.outer_steps}, "tasks": len(a),
        "mean_over_last_quarter_of_tasks": {k: sum(t["mean"] for t in v[-tail:]) / tail for k, v in results.items()},
        "learned_below_adam_on_tasks": sum(x["mean"] < y["mean"] for x, y in zip(b, a)),
        "per_task": results,
    }
    (out / "trains_itself.json").write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, label in (("adam", "outer optimizer: Adam(1e-3)"), ("learned", "outer optimizer: the rule itself")):
        ax.plot([t["outer_step"] for t in results[kind]], [t["mean"] for t in results[kind]], "o-", ms=3, label=label)
    ax.set_xlabel("outer step (one PES truncation each)")
    ax.set_ylabel("mean validation loss over each task's unroll")
    ax.set_title("Meta-training: Adam or the rule itself as outer optimizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "trains_itself.png", dpi=100)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_task"}, indent=1))


if __name__ == "__main__":
    main()
