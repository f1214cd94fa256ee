"""The report of ``learned-opt bench``: ``bench.json``, the PNGs (``periodic.png``; one per task in
``--mode lopt``) and the printed summary tables."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from learned_opt import __version__
from learned_opt.fileio import atomic_write

from ..evaluate.plots import save_figure
from ..evaluate.run import hardware
from .config import BASE_LABEL
from .summaries import LATE_STEP, median_curve


def finish_result(result: dict, config, t_start: float) -> Path:
    """Add what every ``bench.json`` records (hardware, wall seconds since ``t_start``, version) to
    ``result`` and write it into ``config.out``."""
    result.update(hardware=hardware(config.device), wall_seconds=time.perf_counter() - t_start, learned_opt=__version__)
    return write_bench_json(Path(config.out), result)


def write_bench_json(out: Path, result: dict) -> Path:
    """``out/bench.json`` (strict JSON: NaN and Inf written as null), written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(result), indent=1) + "\n"
    atomic_write(out / "bench.json", lambda p: p.write_text(text, encoding="utf-8"))
    return out / "bench.json"


def json_safe(x):
    """NaN and Inf become None (strict JSON); tuples become lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


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
        label_axes(ax, section["target"], f"{result['task']} test loss (median of {len(result['seeds'])} inits)",
                   f"{base}: generator {result['generator']['name']}, moments {result['moments']}")
    return save_figure(fig, path)


def label_axes(ax, target: float | None, ylabel: str, title: str) -> None:
    """The target as a dashed line, a log loss axis against training steps, labels and legend."""
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("training steps (batch 128)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Aligned lines: the first ``left`` columns flush left, the others flush right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in (header, *rows)]


def _late(s: dict) -> str:
    """Accepted of the late updates that drew a sample, and how many were kept without one."""
    rate = "-" if s["late_acceptance_rate"] is None else f"{s['late_acceptance_rate'] * 100:.0f}%"
    return f"{s['late_accepted']}/{s['late_sampled']} ({rate}; {s['late_kept']} kept)"


def format_summary(result: dict) -> str:
    """The printed summary table: one row per base and configuration."""
    header = ("base", "config", "curve steps", "ratio", "curve s", "s ratio", "reached", "steps to target",
              "ratio", "final loss", "never worse", "accepted", "accepted late (kept)")
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
                "-" if not s.get("late_attempted") else _late(s),
            ))
    lines = _table(header, rows, left=2)
    targets = ", ".join(f"{b} {_fmt(s['target'], '.4f')}" for b, s in result["bases"].items())
    lines.append(f"target: median test loss of the base alone at step {result['config']['steps']} ({targets}); "
                 f"'curve': the first grid step where the median test loss over all inits is at or below the target "
                 f"(and the median seconds to it); 'steps to target': the median over the inits that reached it; "
                 f"ratios below 1 are faster than the base; 'accepted late': of the generative updates sampled after "
                 f"step {LATE_STEP}, those accepted; 'kept': those that drew no sample, the metric meeting the prompt")
    lines.append(f"closure metric: {result['closure_metric']}; prompt: {result['prompt']['rule']}; "
                 f"moments: {result['moments']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- --mode lopt


def optimizer_label(name: str, section: dict) -> str:
    """``adam`` -> ``Adam(1e-3)``, ``adam-tuned`` -> ``Adam(3e-3), grid-tuned``, ``lopt`` -> ``learned (weights)``."""
    h = section["hparams"]
    if name == "lopt":
        return f"learned ({h.get('weights') or 'shipped'})"
    if name == "sgd":
        return "SGD, G.pt's recipe"
    mantissa, exponent = f"{h['lr']:e}".split("e")
    return f"Adam({float(mantissa):g}e{int(exponent)})" + (", grid-tuned" if name == "adam-tuned" else "")


def plot_lopt_task(result: dict, task: str, path: Path) -> Path:
    """One task's median test loss over inits against steps, one line per optimizer, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section, grid = result["tasks"][task], result["grid"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, o in section["optimizers"].items():
        values = [v if math.isfinite(v) else math.nan for v in o["median_test_loss"]]
        ax.plot(grid, values, label=optimizer_label(name, o), lw=1.6)
    ax.axvline(result["config"]["grid_steps"], color="grey", ls=":", lw=1)
    label_axes(ax, section["target"], f"test loss (median of {len(result['seeds'])} inits)",
               f"{task} ({section['num_params']:,} parameters)")
    return save_figure(fig, path)


def format_lopt_summary(result: dict) -> str:
    """The printed summary of ``--mode lopt``: one block per task, one row per optimizer."""
    c = result["config"]
    header = ("task", "optimizer", "curve steps", "ratio", "per-init steps", f"loss@{c['grid_steps']}",
              f"loss@{c['steps']}", "diverged", "ms/step")
    rows, verdicts = [], []
    for task, section in result["tasks"].items():
        for name, o in section["optimizers"].items():
            s = o["summary"]
            per_init = ",".join(_fmt(r["steps_to_target"], "d") for r in o["rows"])
            ratio = 1.0 if name == "adam" else s.get("curve_steps_ratio")
            seconds = s["median_seconds_per_step"]
            rows.append((task, optimizer_label(name, o), _fmt(s["curve_steps_to_target"], "d"), _fmt(ratio, ".3f"),
                         per_init, _fmt(s["median_test_loss_at_grid_steps"], ".4f"),
                         _fmt(s["median_final_test_loss"], ".4f"), f"{s['diverged']}/{s['inits']}",
                         _fmt(None if seconds is None else 1e3 * seconds, ".2f")))
        beat = section["lopt_beats_tuned_adam"]
        verdict = {True: "yes", False: "no", None: "not measured"}[beat]
        verdicts.append(f"{task}: target {_fmt(section['target'], '.4f')}; learned optimizer beat grid-tuned Adam "
                        f"(fewer steps to the target): {verdict}")
    lines = _table(header, rows, left=2)
    lines += verdicts
    lines.append(f"target: {result['target']}; 'curve steps': the first evaluated step where the median test loss "
                 f"over inits is at or below it ('-': never), 'ratio' to Adam(1e-3)'s (below 1: faster); "
                 f"'per-init steps': each init's; lr grid chosen by {result['lr_choice']}")
    return "\n".join(lines)
