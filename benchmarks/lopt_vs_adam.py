"""LearnedOptimizer against Adam(1e-3) on a held-out MNIST MLP, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/lopt_vs_adam.py --data-root DIR --weights runs/lopt/lopt.json \
        --sizes 784,48,24,10 --steps 500 --seeds 3

Per seed: one init (PyTorch's default, seed ``seed``) and one minibatch order (batch 128) shared by
every optimizer; full test-set loss every ``--eval-every`` steps. Reported per optimizer: the
median over seeds of the final test loss, and the first evaluated step at which the median curve
reaches Adam(1e-3)'s final median loss (None: never), with its ratio to Adam's step count (below
1: faster). The architecture is not one of meta-training's (its inputs are 28x28, meta-training's
14x14). Writes ``--out`` (JSON) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from learned_opt.lopt import LearnedOptimizer, hand_set_theta
from learned_opt.tasks import load_mnist


def build(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


@torch.no_grad()
def test_loss(model, data) -> float:
    return float(F.cross_entropy(model(data.test_x), data.test_y))


def run(make_opt, sizes, seed, data, steps, eval_every, batch=128) -> tuple[list[float], float]:
    model = build(sizes, seed)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    curve, seconds = [test_loss(model, data)], 0.0
    n = data.train_x.shape[0]
    for step in range(1, steps + 1):
        idx = torch.randint(n, (batch,), generator=gen)
        t = time.perf_counter()
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - t
        if step % eval_every == 0:
            curve.append(test_loss(model, data))
    return curve, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--weights", default=None, help="learned optimizer weights (default: the shipped ones)")
    p.add_argument("--sizes", default="784,48,24,10")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/lopt-vs-adam.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    data = load_mnist(args.data_root)
    opts = {
        "adam-1e-3": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "learned": lambda ps: LearnedOptimizer(ps, weights=args.weights),
        "hand-set (meta-training's start)": lambda ps: LearnedOptimizer(ps, weights=hand_set_theta()),
    }
    results = {}
    for name, make in opts.items():
        curves, secs = zip(*(run(make, sizes, 10_000 + s, data, args.steps, args.eval_every) for s in range(args.seeds)))
        median = torch.tensor(curves).median(0).values.tolist()
        results[name] = {"median_curve": median, "final": median[-1], "seconds_per_step": sum(secs) / len(secs) / args.steps,
                         "diverged": sum(not torch.isfinite(torch.tensor(c)).all() for c in curves)}
    target = results["adam-1e-3"]["final"]
    grid = [0] + list(range(args.eval_every, args.steps + 1, args.eval_every))
    for r in results.values():
        hit = next((s for s, v in zip(grid, r["median_curve"]) if v <= target), None)
        r["steps_to_adam_final"] = hit
    adam_steps = results["adam-1e-3"]["steps_to_adam_final"]
    for name, r in results.items():
        r["steps_ratio_to_adam"] = None if r["steps_to_adam_final"] is None else r["steps_to_adam_final"] / adam_steps
        r["final_ratio_to_adam"] = r["final"] / target
        print(f"{name:34s} final test loss {r['final']:.4f} (x{r['final_ratio_to_adam']:.3f} Adam's)  steps to Adam's "
              f"final: {r['steps_to_adam_final']} (ratio {r['steps_ratio_to_adam']})  {1e3 * r['seconds_per_step']:.2f} ms/step")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sizes": sizes, "steps": args.steps, "seeds": args.seeds, "weights": args.weights,
                               "grid": grid, "results": results}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(grid, r["median_curve"], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"test loss (median of {args.seeds} seeds)")
    ax.set_yscale("log")
    ax.set_title(f"MNIST MLP {'-'.join(map(str, sizes))}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
