"""The figures of ``learned-opt eval``: before/after, curves and denoising, and how each is written."""

from __future__ import annotations

from pathlib import Path

import torch

from learned_opt.fileio import atomic_write

from .config import METRIC_LABELS


def plot_denoising(den: dict, out: Path) -> Path:
    """``denoising.png``: the x0 MSE over returning θ's against the diffusion step, with 1 drawn."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    train = den.get("train_runs", {})
    curves = [(den, dict(marker="o", label="generator's x0 prediction"))]
    if "ratio" in train:
        curves.append((train, dict(marker=".", ls=":", label=f"the same on {train['runs_used']} training runs")))
    for section, style in curves:
        pts = sorted((t, r) for t, r in zip(section["timesteps"], section["ratio"]) if r is not None)
        ax.plot([t for t, _ in pts], [r for _, r in pts], **style)
    ax.axhline(1.0, color="k", ls="--", label="returning θ")
    ax.set_xscale("symlog", linthresh=1.0)  # log steps; t = 0 (possible on short schedules) stays on the axis
    ax.set_xlim(0, 1.3 * max(den["timesteps"]))
    ax.set_xlabel(f"diffusion step t (of {den['num_steps']}; symlog)")
    ax.set_ylabel("x0 MSE / MSE of returning θ")
    ax.set_title(f"denoising on {den['runs_used']} held-out corpus runs")
    ax.legend()
    return save_figure(fig, out / "denoising.png")


def plot_before_after(result: dict, out: Path, metric: str, log: bool, solved: float | None = None) -> Path:
    """``one_step.png``: ``metric`` of each init before and after one update (``solved``: a dotted line)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    b, a = result["one_step"]["before"][metric], result["one_step"]["after"][metric]
    for x, y in zip(b, a):
        ax.plot([0, 1], [x, y], color="tab:blue", alpha=0.4, marker="o")
    if solved is not None:
        ax.axhline(solved, color="k", ls=":", label=f"solved ({solved:g})")
        ax.legend()
    ax.set_xticks([0, 1], ["random init", "1 update"])
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(f"{result['generator']['task']} {METRIC_LABELS.get(metric, metric)}")
    ax.set_title(f"one generative update ({len(b)} inits)")
    return save_figure(fig, out / "one_step.png")


def plot_curves(out: Path, x: list, curves: list[tuple[str, list]], lines: list[tuple[float, str, str]],
                 xlabel: str, ylabel: str, log_x: bool) -> Path:
    """``baselines.png``: the median of each ``[N, G]`` curve with its quartile band against ``x``,
    and horizontal ``(value, style, label)`` lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves:
        q = torch.nanquantile(torch.tensor(values), torch.tensor([0.25, 0.5, 0.75]), dim=0)
        ax.plot(x, q[1], label=label)
        ax.fill_between(x, q[0], q[2], alpha=0.2)
    for value, style, label in lines:
        ax.axhline(value, color="k", ls=style, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return save_figure(fig, out / "baselines.png")


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close one figure; return its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:  # atomically: a kill while a rerun draws leaves the previous figure, not a cut-off one
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return path
