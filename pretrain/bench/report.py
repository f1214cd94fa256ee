"""The report of ``learned-opt bench``: ``periodic.png`` and the printed summary table."""

from __future__ import annotations

import math
from pathlib import Path

from ..evaluate.plots import save_figure
from .config import BASE_LABEL
from .summaries import median_curve


def plot_periodic(result: dict, path: Path) -> Path:
    """Median test loss over inits against steps, one line per configuration, one panel per base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = result["bases"]
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False)
    grid = result["grid"]
    for ax, (base, section) in zip(axes[0], bases.items()):
        for label, c in section["configs"].items():
            median = median_curve(c["test_loss"])  # the curve the headline ratio is read from
            alone = label == BASE_LABEL  # drawn on top, thin: periodic runs equal to it hide beneath
            ax.plot(grid, [v if math.isfinite(v) else math.nan for v in median], label=f"{base} alone" if alone else label, color="k" if alone else None,
                    lw=1.2 if alone else 2, zorder=3 if alone else 2)
        if section["target"] is not None:
            ax.axhline(section["target"], color="grey", ls="--", label=f"target {section['target']:.4f}")
        ax.set_yscale("log")
        ax.set_xlabel("training steps (batch 128)")
        ax.set_ylabel(f"{result['task']} test loss (median of {len(result['seeds'])} inits)")
        ax.set_title(f"{base}: generator {result['generator']['name']}, moments {result['moments']}")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_summary(result: dict) -> str:
    """The printed summary table: one row per base and configuration."""
    header = ("base", "config", "curve steps", "ratio", "curve s", "s ratio", "reached", "steps to target",
              "ratio", "final loss", "never worse", "accepted")
    rows = []
    for base, section in result["bases"].items():
        for label, c in section["configs"].items():
            s, alone = c["summary"], label == BASE_LABEL
            rows.append((
                base, label, _fmt(s["curve_steps_to_target"], ".0f"),
                _fmt(1.0 if alone else s["curve_steps_ratio"], ".3f"),
                _fmt(s["curve_wall_to_target_s"], ".2f"),
                _fmt(1.0 if alone else s["curve_wall_ratio"], ".3f"),
                f"{s['reached']}/{s['inits']}", _fmt(s["median_steps_to_target"], ".0f"),
                _fmt(1.0 if alone else s["steps_ratio"], ".3f"),
                _fmt(s["median_final_test_loss"], ".4f"),
                "-" if alone else f"{s['never_worse'] * 100:.0f}%",
                "-" if not s["attempted"] else f"{s['accepted']}/{s['attempted']} ({s['acceptance_rate'] * 100:.0f}%)",
            ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for r in rows:
        lines.append("  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    targets = ", ".join(f"{b} {_fmt(s['target'], '.4f')}" for b, s in result["bases"].items())
    lines.append(f"target: median test loss of the base alone at step {result['config']['steps']} ({targets}); "
                 f"'curve': the first grid step where the median test loss over all inits is at or below the target "
                 f"(and the median seconds to it); 'steps to target': the median over the inits that reached it; "
                 f"ratios below 1 are faster than the base")
    lines.append(f"closure metric: {result['closure_metric']}; prompt: {result['prompt']['rule']}; "
                 f"moments: {result['moments']}")
    return "\n".join(lines)
