"""Do the late generative updates that the guard accepts lower the test loss, or only the held-out
loss that the guard measures?

    OMP_NUM_THREADS=1 python benchmarks/late_updates.py --data-root DIR --out runs/late-updates.json \
        --step-size 1,0.5,0.25 --min-improvement 0.01

Periodic runs as ``learned-opt bench --mode periodic --bases adam --every 100 --no-keep-if-met``
makes them (fresh inits with seeds 3,000,000 + i, Adam lr 1e-3 through the one baseline loop, the
guard measuring the last 5,000 training images, held out from training), except that the loop
calls each generative update itself, so that the test loss is measured just before and just
after it, and the loss on the first 5,000 training examples beside it (the bench measures the test
loss only on its grid). Per run: the updates accepted after step 1,000, and the sum of their
changes to the held-out, test and training losses. A guard that
keeps updates which help only the data it measures shows a held-out sum below zero beside a test
sum at or above zero. Prints a table and writes every update's record as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from learned_opt import GptOptimizer, tasks
from learned_opt.baselines.supervised import train_baseline
from learned_opt.pretrained import load_generator
from pretrain.bench.config import parse_floats
from pretrain.bench.runs import holdout_closure, load_split
from pretrain.bench.summaries import LATE_STEP
from pretrain.evaluate import init_params


def periodic_run(task, gen, split, init, seed: int, args) -> tuple[list[dict], float]:
    """One run's generative updates (step, accepted, step size, and before and after it the held-out
    loss, the test loss and the loss on the first 5,000 training examples) and its final test loss."""
    updates = []

    def wrap(model, base):
        return GptOptimizer(model.named_parameters(), gen, base=base, seed=seed, keep_if_met=False,
                            step_size=args.step_size, min_improvement=args.min_improvement)

    def on_step(t, model, opt):
        if t % args.every:
            return
        held_out = holdout_closure(task, model, split.holdout_x, split.holdout_y)
        test = holdout_closure(task, model, split.train.test_x, split.train.test_y)
        train = holdout_closure(task, model, split.train.train_x[:5000], split.train.train_y[:5000])
        test_before, train_before = test(), train()
        report = opt.generate(held_out)
        updates.append({"step": t, "accepted": report.accepted, "step_size": report.step_size,
                        "held_out": [report.metric_before, report.metric_after], "test": [test_before, test()],
                        "train": [train_before, train()]})

    curve = train_baseline(task, init, split.train, "adam", args.steps, [args.steps], seed=seed, wrap=wrap,
                           on_step=on_step)
    return updates, curve.test_loss[-1]


def periodic_parser(doc: str, inits: int) -> argparse.ArgumentParser:
    """The options of the benchmarks that follow the periodic bench's Adam runs (this one and
    ``late_proposals.py``)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--generator", default="mnist-mlp")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--inits", type=int, default=inits)
    parser.add_argument("--steps", type=int, default=11_700)
    parser.add_argument("--every", type=int, default=100)
    return parser


def periodic_setup(args) -> tuple:
    """The generator, its task, the bench's split (the last 5,000 training images held out) and the
    bench's init seeds."""
    gen = load_generator(args.generator)
    task = tasks.for_generator(gen, kind="supervised", what="this benchmark")
    split = load_split(task, None, args.data_root, 5000, torch.device("cpu"))
    return gen, task, split, [3_000_000 + i for i in range(args.inits)]


def main() -> None:
    parser = periodic_parser(__doc__, inits=10)
    parser.add_argument("--step-size", type=lambda s: parse_floats(s, "--step-size"), default=(1.0,))
    parser.add_argument("--min-improvement", type=float, default=0.0)
    args = parser.parse_args()
    gen, task, split, seeds = periodic_setup(args)
    runs = []
    print(f"step sizes {list(args.step_size)}, min_improvement {args.min_improvement:g}")
    print(f"{'seed':>8}  {'late accepted':>13}  {'held-out sum':>12}  {'test sum':>9}  {'train sum':>9}  "
          f"{'final test loss':>15}")
    for seed, init in zip(seeds, init_params(task, seeds)):
        updates, final = periodic_run(task, gen, split, init, seed, args)
        late = [u for u in updates if u["step"] > LATE_STEP and u["accepted"]]
        run = {"seed": seed, "final_test_loss": final, "late_attempted": sum(u["step"] > LATE_STEP for u in updates),
               "late_accepted": len(late),
               "late_held_out_change": sum(u["held_out"][1] - u["held_out"][0] for u in late),
               "late_test_change": sum(u["test"][1] - u["test"][0] for u in late),
               "late_train_change": sum(u["train"][1] - u["train"][0] for u in late), "updates": updates}
        runs.append(run)
        print(f"{seed:>8}  {len(late):>6} / {run['late_attempted']:<4}  {run['late_held_out_change']:>+12.4f}  "
              f"{run['late_test_change']:>+9.4f}  {run['late_train_change']:>+9.4f}  {final:>15.4f}", flush=True)
    medians = {k: statistics.median(r[k] for r in runs)
               for k in ("late_accepted", "late_held_out_change", "late_test_change", "late_train_change",
                         "final_test_loss")}
    print("median  " + "  ".join(f"{k} {v:.4g}" for k, v in medians.items()))
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "late_after_step": LATE_STEP, "medians": medians, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
