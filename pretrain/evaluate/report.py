"""The report of ``learned-opt eval``: its plots and its printed summary table."""

from __future__ import annotations

from pathlib import Path

from learned_opt import tasks

from .config import METRIC_LABELS, REPEATS_REPORTED
from .plots import plot_denoising, save_figure
from .suites import ClassifierSuite, ControlSuite, suite_for


def _suite_of(result: dict) -> ClassifierSuite | ControlSuite:
    return suite_for(tasks.get(result["generator"]["task"]))


def plot_eval(result: dict, out: Path) -> list[Path]:
    """``one_step.png``, ``prompt_alignment.png``, ``baselines.png`` and (when the section ran)
    ``denoising.png`` in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = _suite_of(result)
    paths = [suite.plot_one_step(result, out)]
    name = result["generator"]["metric"]
    # prompt alignment: prompted against achieved, with the identity
    pa = result["prompt_alignment"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for p, q in zip(pa["prompts"], pa["achieved"]):
        ax.plot(p, q, marker=".", alpha=0.5)
    lo = min(min(map(min, pa["prompts"])), min(map(min, pa["achieved"])))
    hi = max(max(map(max, pa["prompts"])), max(map(max, pa["achieved"])))
    ax.plot([lo, hi], [lo, hi], "k--", label="identity")
    ax.set_xlabel(f"prompted {name}")
    ax.set_ylabel(f"achieved {name}")
    ax.set_title(f"prompt alignment: mean R² = {pa['r2_mean']:.3f}")
    ax.legend()
    paths.append(save_figure(fig, out / "prompt_alignment.png"))
    paths.append(suite.plot_baselines(result, out))
    if "ratio" in result.get("denoising", {}):
        paths.append(plot_denoising(result["denoising"], out))
    return paths


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(result: dict) -> str:
    """The printed summary table."""
    suite = _suite_of(result)
    one, tm, rep = result["one_step"]["summary"], result["timing"], result["repeated"]["summary"]
    rows = []
    for i, m in enumerate(suite.metrics):
        label = METRIC_LABELS.get(m, m)
        rows += [(f"{label}, init" + (" (median [q1, q3])" if i == 0 else ""), one[f"before_{m}"]),
                 (f"{label}, 1 update", one[f"after_{m}"])]
    t, t_label = suite.table_metric, METRIC_LABELS.get(suite.table_metric, suite.table_metric)
    rows += [(f"{t_label}, {r} updates", rep[f"{t}_after_{r}"]) for r in REPEATS_REPORTED[1:] if f"{t}_after_{r}" in rep]
    rows += suite.share_rows(result) + suite.baseline_rows(result)
    rows += [(f"prompt alignment R² per net (mean {result['prompt_alignment']['r2_mean']:.3f})",
              result["prompt_alignment"]["r2_summary"])]
    memo = result["memorisation"]
    if "summary" in memo:
        rows += [("distance to nearest corpus checkpoint", memo["summary"]["nearest_distance"]),
                 ("corpus nearest-neighbour distance", memo["summary"]["corpus_nn_distance"]),
                 (f"{METRIC_LABELS.get(suite.memo_metric, suite.memo_metric)} of that nearest checkpoint",
                  memo["summary"][f"nearest_{suite.memo_metric}"])]
    for kind, sec in result["ood"].items():
        s = sec["summary"]
        rows += [(f"OOD {kind}: {t_label}, {r} updates", s[f"{t}_after_{r}"])
                 for r in (0, *REPEATS_REPORTED) if f"{t}_after_{r}" in s]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'median':>10}  {'q1':>10}  {'q3':>10}"]
    for label, s in rows:
        lines.append(f"{label:{width}}  {_fmt(s.get('median')):>10}  {_fmt(s.get('q1')):>10}  {_fmt(s.get('q3')):>10}")
    b, unit = suite.baseline, suite.unit.replace("_", " ")
    if "sampler" in result:  # results written before the sampler was recorded lack it
        sm = result["sampler"]
        chooser = "by the generator's own prediction" if sm.get("rank") == "self" else "on validation data"
        lines.append(f"sampler: {sm['method']}, {sm['steps']} steps, t_min {sm['t_min']}"
                     + (f", guidance {sm['guidance']:g}" + (" (tapered)" if sm.get("guidance_taper") else " (constant)")
                        if sm.get("guidance", 1.0) != 1.0 else "")
                     + (f", temperature {sm['temperature']:g}" if sm.get("temperature", 1.0) != 1.0 else "")
                     + (f", best of {sm['candidates']} candidates {chooser}" if sm["candidates"] > 1 else ""))
    choosing = " and choosing among the candidates" if result.get("sampler", {}).get("candidates", 1) > 1 else ""
    lines.append(f"one update: {tm['update_seconds']:.3f} s (sampling{choosing} {tm['sample_seconds']:.3f} s + measuring the "
                 f"metric {tm['metric_seconds']:.3f} s); {suite.baseline_label}: "
                 f"{tm[f'{b}_seconds_per_{suite.unit}'] * 1e3:.3f} ms/{unit}; median speed-up vs the "
                 f"{suite.baseline_label} {unit}s it replaces: {_fmt(tm[f'median_speedup_vs_{b}'], '.2f')}x")
    if "skipped" in memo:
        lines.append(f"memorisation: {memo['skipped']}")
    lines += denoising_lines(result.get("denoising", {}))
    lines += property_lines(result.get("property_head", {}))
    return "\n".join(lines)


def property_lines(prop: dict) -> list[str]:
    """The property head's rank correlations, one line (nothing for a generator without a head)."""
    if "generated_one_step" not in prop:
        return []
    held = prop["heldout_checkpoints"]
    parts = [f"held-out checkpoints {_fmt(held['spearman'], '.3f')} (n={held['count']})" if "spearman" in held
             else f"held-out checkpoints skipped ({held['skipped']})"]
    for key, label in (("generated_one_step", "one-step samples"), ("generated_prompt_alignment", "prompted samples")):
        parts.append(f"{label} {_fmt(prop[key]['spearman'], '.3f')} (n={prop[key]['count']})")
    within = prop["generated_prompt_alignment"]["within_init_spearman_mean"]
    return [f"property head, Spearman with the true {prop['metric']}: " + "; ".join(parts)
            + f"; within an init's prompted samples {_fmt(within, '.3f')}"]


def denoising_lines(den: dict) -> list[str]:
    """The denoising section as a small table (t, ratio, cosine), or the reason it was skipped."""
    if "ratio" not in den:
        return [f"denoising: {den['skipped']}"] if "skipped" in den else []

    def row(label: str, values) -> str:
        return f"  {label:<8}" + "".join(f"{_fmt(v, '.3f'):>7}" for v in values)

    lines = [f"denoising, {den['runs_used']} held-out runs (x0 MSE / MSE of returning θ; below 1 beats returning θ):",
             f"  {'t':<8}" + "".join(f"{t:>7d}" for t in den["timesteps"]),
             row("ratio", den["ratio"]), row("cosine", den["cosine"])]
    train = den.get("train_runs", {})
    if "ratio" in train:
        lines.append(row("train", train["ratio"]) + f"   (ratio on {train['runs_used']} training runs)")
    return lines
