"""One update from inits narrower and wider than the task's own, for generators side by side.

    OMP_NUM_THREADS=2 python benchmarks/init_scale.py --generators mnist-cnn runs/x/mnist-cnn.json \
        --data-root DIR --out benchmarks/results/init-scale-mnist-cnn

Each init is the task's seeded init (seeds ``--seed`` + i, apart from those of ``eval``, ``bench``,
``tune-sampling`` and ``tune-head``) with every parameter multiplied by a scale, as
``learned-opt corpus --init-scale`` makes a run's init; ``eval``'s "uniform-x3" is scale 3. Every
generator updates the same inits once, at its best prompt with its own sampler and the same noise,
and each update is measured on the whole test set. Writes ``init_scale.json`` (per generator and
scale: the test error and loss of every init before and after, and their medians) and
``init_scale.png`` (median test error after the update against the scale, quartiles shaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from learned_opt import tasks
from learned_opt.pretrained import load_generator
from pretrain.evaluate import init_params
from pretrain.evaluate.plots import save_figure
from pretrain.sampling import best_prompt_updates

SCALES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
SAMPLER_KEYS = ("method", "steps", "t_min", "guidance", "temperature", "guidance_taper")


def measure(generators: list[str], data_root: str | None, scales=SCALES, inits: int = 20, seed: int = 6_000_000,
            batch: int = 32) -> dict:
    gens = [load_generator(g) for g in generators]
    task = tasks.for_generator(gens[0])
    if any(g.layout.signature != gens[0].layout.signature for g in gens):
        raise SystemExit("the generators must generate parameters of one task's model")
    data = task.load_data(data_root)
    metrics = [m for m in ("test_error", "test_loss") if m in task.metrics]
    base = init_params(task, [seed + i for i in range(inits)])  # [N, P]
    samplers = [{k: gen.sampling[k] for k in SAMPLER_KEYS if k in gen.sampling} for gen in gens]
    rows = {f"{source} ({gen.sha256[:8]})": {"sha256": gen.sha256, "sampler": sampler, "scales": {}}
            for gen, source, sampler in zip(gens, generators, samplers)}
    for scale in scales:
        theta = base * scale
        before = task.evaluate(theta, data, metrics)  # one evaluation of the inits for every generator
        for gen, row, sampler in zip(gens, rows.values(), samplers):
            rng = torch.Generator().manual_seed(seed)  # the same noise for every generator and scale
            after = task.evaluate(best_prompt_updates(gen, theta, before[gen.metric_name], batch, rng, **sampler),
                                  data, metrics)
            row["scales"][str(scale)] = {
                "before": {m: before[m].tolist() for m in metrics},
                "after": {m: after[m].tolist() for m in metrics},
                "median_after": {m: statistics.median(after[m].tolist()) for m in metrics},
            }
            print(f"{gen.name} {gen.sha256[:8]} scale {scale}: " + ", ".join(
                f"{m} {statistics.median(before[m].tolist()):.3g} -> {row['scales'][str(scale)]['median_after'][m]:.3g}"
                for m in metrics), flush=True)
    return {"task": task.name, "seeds": [seed, seed + inits - 1], "scales": list(scales), "metrics": metrics,
            "threads": torch.get_num_threads(), "generators": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metrics"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, row in result["generators"].items():
        q = torch.tensor([row["scales"][str(s)]["after"][metric] for s in result["scales"]])  # [S, N]
        lo, mid, hi = torch.quantile(q, torch.tensor([0.25, 0.5, 0.75]), dim=1)
        ax.plot(result["scales"], mid, marker="o", label=label)
        ax.fill_between(result["scales"], lo, hi, alpha=0.2)
    ax.axvline(1.0, color="k", lw=0.5)
    ax.set_xlabel("init scale (times the task's own init)")
    ax.set_ylabel(f"{metric} after one update (median, quartiles)")
    ax.set_title(f"{result['task']}: one update from scaled inits")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", required=True, help="names or manifest paths, of one task")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--inits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=6_000_000)
    parser.add_argument("--scales", type=lambda s: tuple(float(x) for x in s.split(",")), default=SCALES)
    args = parser.parse_args()
    result = measure(args.generators, args.data_root, args.scales, args.inits, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_scale.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "init_scale.png")
    print(f"wrote {out / 'init_scale.json'} and {out / 'init_scale.png'}")


if __name__ == "__main__":
    main()
