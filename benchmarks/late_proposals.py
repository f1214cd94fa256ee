"""Can the generator improve a network late in plain Adam training, when none of its updates was kept?

    OMP_NUM_THREADS=1 python benchmarks/late_proposals.py --data-root DIR --inits 3 --out runs/late-proposals.json

Plain Adam runs (lr 1e-3, through the one baseline loop, on the training set less the last 5,000
images, fresh inits with seeds 3,000,000 + i, as ``bench --mode periodic`` makes them). Every
``--every`` steps after step 1,000 the generator proposes θ′ from the run's θ, prompted with its best
prompt, twice: conditioned on the held-out loss (the last 5,000 training images, what the guard's
closure measures) and on the test loss (the metric the generator was trained on). Each θ′ is
measured on both sets and then put back: the run itself is Adam alone. Per run and conditioning:
how many proposals are better than θ on each set, and the median change. Set against the periodic
bench, where the first update is kept and late ones are rarely better, this tells apart a generator
that cannot improve a trained network from one whose first update leaves little to gain.
"""

from __future__ import annotations

import json
import statistics

import torch

from late_updates import periodic_parser, periodic_setup  # this folder, as the script runs from it
from learned_opt import GptOptimizer
from learned_opt.baselines.supervised import train_baseline
from pretrain.bench.runs import holdout_closure
from pretrain.bench.summaries import LATE_STEP
from pretrain.evaluate import init_params

CONDITIONS = ("held_out", "test")


def probe_run(task, gen, split, init, seed: int, args) -> list[dict]:
    """One Adam run's late proposals: per probe step, θ's held-out and test loss and, for each
    conditioning, the proposal's."""
    rows = []

    def wrap(model, base):
        return GptOptimizer(model.named_parameters(), gen, base=base, seed=seed, keep_if_met=False)

    def on_step(t, model, opt):
        if t % args.every or t <= LATE_STEP:
            return
        held_out = holdout_closure(task, model, split.holdout_x, split.holdout_y)
        test = holdout_closure(task, model, split.train.test_x, split.train.test_y)
        params = [p for g in opt.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        row = {"step": t, "held_out": float(held_out()), "test": float(test())}
        for condition in CONDITIONS:
            opt.generate(metric=row[condition])  # no closure: no guard, θ′ goes in
            row[f"by_{condition}"] = {"held_out": float(held_out()), "test": float(test())}
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        rows.append(row)

    train_baseline(task, init, split.train, "adam", args.steps, [args.steps], seed=seed, wrap=wrap, on_step=on_step)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for condition in CONDITIONS:
        for measured in ("held_out", "test"):
            changes = [r[f"by_{condition}"][measured] - r[measured] for r in rows]
            out[f"by_{condition}"] = {**out.get(f"by_{condition}", {}),
                                      f"better_on_{measured}": sum(c < 0 for c in changes),
                                      f"median_change_{measured}": statistics.median(changes)}
    return {"probes": len(rows), **out}


def main() -> None:
    args = periodic_parser(__doc__, inits=3).parse_args()
    gen, task, split, seeds = periodic_setup(args)
    runs = []
    for seed, init in zip(seeds, init_params(task, seeds)):
        rows = probe_run(task, gen, split, init, seed, args)
        runs.append({"seed": seed, "summary": summary(rows), "probes": rows})
        s = runs[-1]["summary"]
        print(f"seed {seed}: {s['probes']} probes; Adam's test loss at step {rows[-1]['step']}: {rows[-1]['test']:.4f}")
        for condition in CONDITIONS:
            c = s[f"by_{condition}"]
            print(f"  conditioned on the {condition.replace('_', '-')} loss: better on held-out "
                  f"{c['better_on_held_out']}, on test {c['better_on_test']}; median change held-out "
                  f"{c['median_change_held_out']:+.4f}, test {c['median_change_test']:+.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "after_step": LATE_STEP, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
