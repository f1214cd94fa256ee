"""Choose among a meta-training's saved rules on a validation task, never on a benchmark's.

    OMP_NUM_THREADS=1 python benchmarks/lopt_select.py --data-root DIR --out runs/lopt-select.json \
        runs/lopt/snapshots/*.pt

Each file is a ``learned-opt meta-train`` checkpoint (``checkpoint.pt`` copied at some outer
step). Every rule, and Adam(1e-3) beside it, trains the validation task — an MNIST MLP 784-32-10,
a size that neither ``bench --mode lopt`` nor meta-training under the shipped rule's settings
uses (at 28x28 their ``--max-params 25000`` leaves widths up to 16 in one hidden layer) — for ``--steps`` steps on the training set minus its last
5,000 images, from ``--seeds`` inits (seeds 5,000,000 + i) with the same minibatches, through the
one baseline loop. The loss on those 5,000 held-out images (never the test set) is measured every
100 steps. Score per rule: the first step at which its median curve reaches Adam's final median
held-out loss (lower is better; never: ``--steps`` + 1), then its final median loss. Prints a table
and writes the scores as JSON; the best rule is the one to export (``learned-opt meta-train
--resume`` from that checkpoint, or ``learned_opt.lopt.save_rule`` on its ``theta``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from learned_opt.baselines.supervised import train_baseline
from learned_opt.lopt import rule_from_theta
from learned_opt.recipes import ADAM_BASELINE, LOPT_BASELINE
from tasks import Mlp32


def median_curve(curves):
    """The median over inits at each step; a non-finite loss (a diverged run) counts as +inf."""
    return [statistics.median(x if math.isfinite(x) else math.inf for x in v) for v in zip(*curves)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    task = Mlp32()
    data = task.validation_data(task.load_data(args.data_root))  # "test" metrics = the held-out 5,000
    grid = list(range(0, args.steps + 1, 100))
    inits = []
    for i in range(args.seeds):
        torch.manual_seed(5_000_000 + i)
        inits.append(task.layout().flatten_module(task.build_model()))

    def curves(recipe):
        return [train_baseline(task, init, data, recipe, args.steps, grid, seed=5_000_000 + i).test_loss
                for i, init in enumerate(inits)]

    adam = median_curve(curves(ADAM_BASELINE))
    rows = []
    for path in args.checkpoints:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        rule = rule_from_theta(blob["theta"], f"outer step {blob['outer_step']}")
        curve = median_curve(curves({**LOPT_BASELINE, "weights": rule}))
        reach = next((s for s, v in zip(grid, curve) if v <= adam[-1]), args.steps + 1)
        rows.append({"checkpoint": path, "outer_step": blob["outer_step"], "steps_to_adam": reach,
                     "final": curve[-1], "curve": curve})
        print(f"{path}: outer step {blob['outer_step']}: steps to Adam's final {reach}, final {curve[-1]:.4f} "
              f"(Adam {adam[-1]:.4f})", flush=True)
    best = min(rows, key=lambda r: (r["steps_to_adam"], r["final"]))
    print(f"best: {best['checkpoint']} (outer step {best['outer_step']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"task": task.description, "steps": args.steps, "seeds": args.seeds, "adam": adam, "rules": rows,
                       "best": best["checkpoint"]}, f, indent=1)


if __name__ == "__main__":
    main()
