"""Can a late periodic update be prompted for anything better than the network it starts from?

    OMP_NUM_THREADS=1 python benchmarks/heldout_scale.py --generator mnist-mlp --data-root DIR \
        --out benchmarks/results/heldout-scale-mnist

In periodic mode the guard's closure measures the held-out training images (the last 5,000 MNIST
training images, which the base optimizer never trains on) and hands that loss to the generator
as its metric, while the generator learned its metric from its corpus: the test loss. This follows
runs as ``learned-opt bench --mode periodic --bases adam --every 100`` makes them (seeded inits
3,000,000 + i, Adam lr 1e-3, batch 128, one best-prompt update at step 100, then Adam alone; here
batches are drawn at random rather than epoch by epoch) and records, at a grid of steps, the held-out loss the generator would be conditioned on, the test
loss, and whether the held-out loss is already below the lowest metric the generator may be
prompted with (its ``metric_range``): there every prompt asks for a network no better than the one
it has. Writes ``heldout_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from learned_opt import tasks
from learned_opt.pretrained import load_generator
from pretrain.sampling import best_prompt_updates

GRID = (100, 500, 1000, 2000, 3000, 5000, 8000, 11700)


def follow(task, gen, data, val, seed: int, steps: int) -> dict[int, dict[str, float]]:
    """One run: held-out and test loss at every grid step (after the update at step 100)."""
    layout = task.layout()
    torch.manual_seed(seed)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    x, y = val.train_x, val.train_y  # validation_data's training set excludes the held-out images
    out = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (128,), generator=order)
        opt.zero_grad()
        task.loss(model(x[idx]), y[idx]).backward()
        opt.step()
        if step == 100:
            flat = layout.flatten_module(model)[None]
            metric = task.evaluate(flat, val)[gen.metric_name]
            new = best_prompt_updates(gen, flat, metric, 1, torch.Generator().manual_seed(seed))
            layout.load_into(new[0], list(model.parameters()))
        if step in GRID:
            flat = layout.flatten_module(model)[None]
            out[step] = {"heldout_loss": float(task.evaluate(flat, val)[gen.metric_name]),
                         "test_loss": float(task.evaluate(flat, data)[gen.metric_name])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="mnist-mlp")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--inits", type=int, default=5)
    args = parser.parse_args()
    gen = load_generator(args.generator)
    task = tasks.get(gen.task)
    data = task.load_data(args.data_root)
    val = task.validation_data(data)
    lo = gen.metric_range[0]
    runs = [follow(task, gen, data, val, 3_000_000 + i, max(GRID)) for i in range(args.inits)]
    grid = {}
    for step in GRID:
        held = [r[step]["heldout_loss"] for r in runs]
        test = [r[step]["test_loss"] for r in runs]
        grid[step] = {"heldout_loss": statistics.median(held), "test_loss": statistics.median(test),
                      "below_prompt_range": sum(h < lo for h in held)}
        print(f"step {step:>6}: held-out {grid[step]['heldout_loss']:.4f}, test {grid[step]['test_loss']:.4f} "
              f"(medians), {grid[step]['below_prompt_range']}/{len(runs)} held-out below the lowest prompt {lo:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"generator": {"name": gen.name, "sha256": gen.sha256, "metric_range": list(gen.metric_range)},
              "grid": grid, "runs": runs}
    (out / "heldout_scale.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
