"""Teach a generator's property head to rank its own samples (``learned-opt tune-head``).

``GptOptimizer(candidates=N, rank="self")`` keeps the sample that the generator's property head
predicts best, with no closure call. A head trained on corpus checkpoints orders networks across
the metric's range, but the N samples of one update lie within a few hundredths of a loss of each
other, and there it may rank no better than chance. This command fine-tunes the head, and nothing
else, on exactly that situation:

* ``--groups G`` fresh inits (seeds ``--seed + i``, default ``5_000_000 + i``: apart from corpus
  runs, ``eval``'s ``1_000_000 + i``, ``tune-sampling``'s ``2_000_000 + i``, ``bench``'s
  ``3_000_000 + i`` and ``bench --mode lopt``'s ``4_000_000 + i``) each get ``--samples N`` updates
  from the generator's own sampler (at ``--temperature``, default its own, above 0) and best
  prompt: a *group*. These are first updates from fresh inits, where ``rank="self"`` matters
  most; updates later in training are not drawn;
* every sample is labelled with its metric on **labelling data** that neither the test set nor the
  validation data holds (:meth:`Task.labelling_data`: for a supervised task ``--label-examples``
  training examples just before the ``--holdout`` validation examples; for a control task episodes
  from a third set of starting states). Groups with a non-finite sample or label are dropped;
* the head (its block, features and read-out; the θ encoder it reads is shared with the diffusion
  model and stays frozen, so every sample the generator draws is unchanged) is trained with a
  pairwise logistic ranking loss within each group (RankNet, Burges et al. 2005), scaled by the
  labels' mean spread within a group, plus ``--mse-weight`` x the squared error of its values in
  those units, so that they stay calibrated;
* before and after, ``--check-groups`` groups of other fresh inits are measured on the task's
  **validation data** (never the test set): the mean Spearman correlation within a group, and the
  median metric of one sample, of the sample the head picks, and of the best sample (the ceiling).

Writes ``NAME.safetensors`` + ``NAME.json`` into ``--out`` (the source's manifest, sampler entry
included, with the record of this tuning under ``training.head_tuning``; only the head's weights
differ), ``head.json`` (the figures) and ``head.png`` (the within-group correlation per epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from learned_opt import tasks
from learned_opt.diffusion import check_temperature
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.fileio import atomic_write, is_plain_name
from learned_opt.options import check_export_target, check_out_dir, check_plots, check_seed
from learned_opt.pretrained import LoadedGenerator, load_generator, save_generator
from learned_opt.saving import sha256_file
from learned_opt.selection import check_candidates

from .evaluate import init_params
from .evaluate.metrics import spearman
from .evaluate.plots import save_figure
from .evaluate.property import predict
from .evaluate.run import hardware
from .sampling import best_prompt_updates


@dataclass
class HeadTuneConfig:
    """What ``learned-opt tune-head`` does (one field per command-line option)."""

    generator: str  # registry name or manifest path; needs a property head
    out: str = "tune-head"
    task: str | None = None  # the generator's task where its manifest's cannot be found ("file.py:Class")
    data_root: str | None = None
    groups: int = 2048  # fresh inits whose samples train the head
    samples: int = 8  # samples per init: one group, which the head learns to order
    check_groups: int = 128  # fresh inits of other seeds, measured on validation data before and after
    seed: int = 5_000_000  # training group i has seed seed + i, check group j seed + groups + j
    epochs: int = 30
    lr: float = 3e-4
    batch_groups: int = 32  # groups per optimizer step
    mse_weight: float = 0.1  # weight of the squared error (in units of the within-group spread) beside the ranking loss
    holdout: int = 5000  # supervised tasks: training examples held out as validation data
    label_examples: int = 10_000  # supervised tasks: training examples before the holdout that label the samples
    sample_batch: int = 256  # networks sampled at once
    temperature: float | None = None  # of the groups' samples (as candidates are drawn); None: the generator's own
    name: str | None = None  # of the written generator (default: the source's)
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        for field in ("groups", "samples", "check_groups", "epochs", "batch_groups", "holdout", "label_examples",
                      "sample_batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{field.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.samples < 2:
            raise ConfigError(f"--samples must be >= 2 (a group is ranked), got {self.samples}")
        if not 0 < self.lr < math.inf or not 0 <= self.mse_weight < math.inf:
            raise ConfigError(f"--lr must be a finite number > 0 and --mse-weight one >= 0, got {self.lr!r} and "
                              f"{self.mse_weight!r}")
        if self.temperature is not None:
            check_temperature(self.temperature, "--temperature")
        if self.name is not None and not is_plain_name(self.name):
            raise ConfigError(f"--name {self.name!r} must be a plain file name (no '/', '\\', not starting with '.')")


def draw_groups(gen: LoadedGenerator, task: tasks.Task, data: Any, seeds: list[int], samples: int,
                batch: int, temperature: float | None = None) -> torch.Tensor:
    """``samples`` one-step updates of each fresh init of ``seeds`` -> θ′ ``[len(seeds), samples, P]``:
    the generator's sampler (at ``temperature``, None: its own) and best prompt, conditioned on the
    init's metric on ``data``."""
    inits = init_params(task, seeds)
    start = task.evaluate(inits, data, [gen.metric_name])[gen.metric_name]
    out = best_prompt_updates(gen, inits.repeat_interleave(samples, 0), start.repeat_interleave(samples), batch,
                              torch.Generator().manual_seed(seeds[0]), temperature=temperature)
    return out.view(len(seeds), samples, -1)


def ranking_figures(predicted: torch.Tensor, values: dict[str, torch.Tensor], metric: str, direction: str) -> dict:
    """How well ``predicted`` [G, S] orders each group: the mean Spearman correlation with
    ``values[metric]`` within a group, and per measured metric the median of one sample (the
    first), of the sample the head picks, and of the best sample by ``metric`` (the ceiling), and
    the means of one sample and of the pick."""
    truth = values[metric]
    pick_best = (lambda v: v.argmin(1)) if direction == "min" else (lambda v: v.argmax(1))
    rows = torch.arange(len(truth))
    picked, best = pick_best(predicted), pick_best(truth)
    within = [c for c in (spearman(predicted[i], truth[i]) for i in range(len(truth))) if c is not None]
    out: dict = {"within_group_spearman": sum(within) / len(within) if within else None,
                 "groups_ranked": len(within)}  # the others' labels, or predictions, are all equal
    for name, v in values.items():
        out[name] = {"one_sample_median": float(v[:, 0].median()), "head_pick_median": float(v[rows, picked].median()),
                     "best_of_group_median": float(v[rows, best].median()),
                     "one_sample_mean": float(v.mean()), "head_pick_mean": float(v[rows, picked].mean())}
    return out


def train_head(gen: LoadedGenerator, theta: torch.Tensor, labels: torch.Tensor, config: HeadTuneConfig,
               check=None) -> list[dict]:
    """Fine-tune ``gen``'s property head (in place) to order the groups ``theta`` [G, S, P] as their
    ``labels`` [G, S] (raw metric) do; ``check()`` -> dict is called after every epoch. Returns the log."""
    model, norm = gen.model, gen.normalization
    head = model.property_head
    g, s = labels.shape
    with torch.no_grad():  # the encoder is frozen: its tokens are computed once
        dtype = next(model.parameters()).dtype
        tokens = torch.cat([model.encode_params(norm.params(t.to(gen.device, dtype)))
                            for t in theta.reshape(g * s, -1).split(config.sample_batch)])
    tokens = tokens.view(g, s, *tokens.shape[1:])
    y = norm.metric(labels.to(gen.device, torch.float32))  # [G, S] generator units
    spread = float(y.std(1).mean()) or 1.0
    was_training, was_trainable = head.training, [q.requires_grad for q in head.parameters()]
    head.train()
    head.requires_grad_(True)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    draw = torch.Generator().manual_seed(config.seed)
    log = []
    try:
        for epoch in tqdm(range(config.epochs), desc="head epochs", disable=not config.progress):
            losses = []
            for idx in torch.randperm(g, generator=draw).split(config.batch_groups):
                pred = head(tokens[idx].flatten(0, 1)).float().view(len(idx), s)
                d_pred = pred[:, :, None] - pred[:, None, :]  # [b, S, S]
                d_y = y[idx][:, :, None] - y[idx][:, None, :]
                ordered = d_y != 0
                rank = F.softplus(-d_pred * torch.sign(d_y) / spread)[ordered].mean() if ordered.any() else pred.sum() * 0
                loss = rank + config.mse_weight * F.mse_loss(pred, y[idx]) / spread**2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            head.eval()
            log.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), **(check() if check else {})})
            head.train()
    finally:  # the head as it was found: a loaded generator's is frozen and in eval mode
        head.train(was_training)
        for q, trainable in zip(head.parameters(), was_trainable):
            q.requires_grad_(trainable)
    return log


def tune_head(config: HeadTuneConfig) -> dict:
    """Draw and label the groups, tune the head, measure it before and after, write the generator."""
    gen = load_generator(config.generator)
    if not gen.has_property_head:
        raise ConfigError(f"generator {gen.name!r} has no property head to tune: train it with "
                          f"`learned-opt train --property-head W` first (e.g. the self-ranking recipe)")
    check_candidates(config.samples, gen.sampler(temperature=config.temperature)["temperature"], "--temperature",
                     fewer=None)
    target = Path(config.out) / f"{config.name or gen.name}.json"
    weights = target.with_suffix(".safetensors")  # the manifest may have been renamed away from its weights
    if gen.sha256 in (_manifest_field(target, "weights_sha256"), weights.is_file() and sha256_file(weights)):
        raise ConfigError(f"{target} is the generator being tuned: writing there would replace it; "
                          f"pass another --out or --name")
    # a rerun's own: an earlier tune-head of this same generator, whatever became of head.json
    tuned_from = _manifest_field(target, "training", "head_tuning", "source", "sha256")
    check_export_target(config.out, target.stem, own=tuned_from == gen.sha256)
    task = tasks.for_generator(gen, config.task)
    data = task.load_data(config.data_root)
    val_data = task.validation_data(data, config.holdout)
    try:
        label_data = task.labelling_data(data, config.holdout, config.label_examples)
    except NotImplementedError as exc:
        raise ConfigError(f"{exc}: define Task.labelling_data for it to use tune-head") from None
    except ConfigError as exc:
        raise ConfigError(f"--label-examples: {exc}") from None
    metric, direction = gen.metric_name, gen.metric_direction
    extra = [m for m in ("test_error",) if m in task.metrics and m != metric]
    began = time.perf_counter()

    train_seeds = [config.seed + i for i in range(config.groups)]
    check_seeds = [config.seed + config.groups + j for j in range(config.check_groups)]
    theta = draw_groups(gen, task, label_data, train_seeds, config.samples, config.sample_batch, config.temperature)
    labels = task.evaluate(theta.flatten(0, 1), label_data, [metric])[metric].view(config.groups, config.samples)
    finite = torch.isfinite(theta).flatten(1).all(1) & torch.isfinite(labels).all(1)  # [G]
    if not finite.any():
        raise GenerationError(f"every one of the {config.groups} groups holds a non-finite sample or metric: "
                              f"the generator's samples cannot be ranked")
    theta, labels = theta[finite], labels[finite]
    check_theta = draw_groups(gen, task, val_data, check_seeds, config.samples, config.sample_batch,
                              config.temperature)
    measured = task.evaluate(check_theta.flatten(0, 1), val_data, [metric, *extra])
    check_values = {m: v.view(config.check_groups, config.samples) for m, v in measured.items()}
    drawn_s = time.perf_counter() - began

    def check() -> dict:
        pred = predict(gen, check_theta.flatten(0, 1), config.sample_batch)
        return ranking_figures(pred.view(config.check_groups, config.samples), check_values, metric, direction)

    before = check()
    log = train_head(gen, theta, labels, config, check)
    after = log[-1]
    record = {
        "command": "learned-opt tune-head",
        "source": {"name": gen.name, "sha256": gen.sha256},
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress", "plots", "out", "generator")},
        "loss": "pairwise logistic ranking loss within each group of samples, scaled by the labels' mean spread "
                "within a group, + mse_weight x the squared error in those units; only the property head trained",
        "labels": "the metric on the task's labelling data, apart from its validation data: training examples "
                  "before the validation holdout (supervised tasks) or episodes from labelling_episode_seed (control tasks)",
        "check_within_group_spearman": {"before": before["within_group_spearman"],
                                        "after": after["within_group_spearman"]},
    }
    m = gen.manifest
    training = {**m.get("training", {}), "head_tuning": record}
    for stale in ("head.json", "head.png"):  # an earlier run's report never sits beside this run's generator
        (Path(config.out) / stale).unlink(missing_ok=True)
    written = save_generator(
        config.out, config.name or gen.name, gen.model, gen.diffusion.config, gen.normalization,
        task=m["task"], metric=metric, best_prompt=gen.best_prompt, metric_range=gen.metric_range, metric_direction=direction,
        corpus=m.get("corpus"), training=training, extra=m.get("extra"),
        input_normalization=m.get("input_normalization"), sampling=m.get("sampling"),
    )
    result = {
        "config": asdict(config), "generator": {"name": gen.name, "sha256": gen.sha256, "written": str(written)},
        "hardware": hardware("cpu"), "metric": metric, "direction": direction, "sampling": gen.sampling,
        "label_spread": float(labels.std(1).mean()), "groups_dropped": int((~finite).sum()), "drawing_s": drawn_s,
        "wall_time_s": time.perf_counter() - began, "before": before, "after": after, "log": log,
    }
    out = Path(config.out)
    if config.plots:
        result["plots"] = [str(_plot(result, out))]
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(out / "head.json", lambda p: p.write_text(text, encoding="utf-8"))
    return result


def _manifest_field(manifest: Path, *keys: str) -> Any:
    """``manifest[keys[0]][keys[1]]...`` of a manifest on disk (None where it cannot be read or lacks them)."""
    try:
        value = json.loads(manifest.read_text(encoding="utf-8"))
        for key in keys:
            value = value.get(key)
        return value
    except (OSError, ValueError, AttributeError):
        return None


def _plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [(0, result["before"]["within_group_spearman"])] + [(r["epoch"], r["within_group_spearman"])
                                                                for r in result["log"]]
    points = [(e, c) for e, c in points if c is not None]  # None: the head predicted one value for every sample
    ax.plot([e for e, _ in points], [c for _, c in points], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean Spearman within a group (validation data)")
    ax.set_title(f"property head ranking {result['config']['samples']} samples of one update")
    return save_figure(fig, out / "head.png")


def format_table(result: dict) -> str:
    """The before/after figures as aligned text."""
    lines = [f"{'':<28}{'before':>12}{'after':>12}"]
    b, a = result["before"], result["after"]
    corr = [("n/a" if r["within_group_spearman"] is None else f"{r['within_group_spearman']:.3f}") for r in (b, a)]
    lines.append(f"{'within-group Spearman':<28}{corr[0]:>12}{corr[1]:>12}")  # n/a: the head predicts one value
    for name in (k for k in b if isinstance(b[k], dict)):
        lines.append(f"{name + ', one sample':<28}{b[name]['one_sample_median']:>12.4g}{a[name]['one_sample_median']:>12.4g}")
        lines.append(f"{name + ', head picks':<28}{b[name]['head_pick_median']:>12.4g}{a[name]['head_pick_median']:>12.4g}")
        lines.append(f"{name + ', best of group':<28}{b[name]['best_of_group_median']:>12.4g}"
                     f"{a[name]['best_of_group_median']:>12.4g}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    d = HeadTuneConfig(generator="")
    add = parser.add_argument
    add("--generator", required=True, help="registry name or path to a generator's .json manifest (with a property head)")
    add("--out", default=d.out, help=f"output folder: the tuned generator, head.json, head.png (default: {d.out})")
    add("--task", default=None, help="the generator's task, where its manifest names one that cannot be found: "
                                     "path/to/file.py:ClassName or package.module:ClassName")
    add("--data-root", default=None, help="dataset folder (default: $LEARNED_OPT_DATA)")
    add("--groups", type=int, default=d.groups, help=f"fresh inits whose samples train the head (default: {d.groups})")
    add("--samples", type=int, default=d.samples, help=f"samples per init, ranked together (default: {d.samples})")
    add("--check-groups", type=int, default=d.check_groups,
        help=f"fresh inits measured on validation data before and after (default: {d.check_groups})")
    add("--seed", type=int, default=d.seed, help=f"training group i has seed SEED + i (default: {d.seed})")
    add("--epochs", type=int, default=d.epochs, help=f"passes over the groups (default: {d.epochs})")
    add("--lr", type=float, default=d.lr, help=f"AdamW learning rate of the head (default: {d.lr:g})")
    add("--batch-groups", type=int, default=d.batch_groups, help=f"groups per step (default: {d.batch_groups})")
    add("--mse-weight", type=float, default=d.mse_weight,
        help=f"weight of the squared error beside the ranking loss (default: {d.mse_weight:g})")
    add("--holdout", type=int, default=d.holdout,
        help=f"supervised tasks: training examples held out as validation data (default: {d.holdout})")
    add("--label-examples", type=int, default=d.label_examples,
        help=f"supervised tasks: training examples before the holdout that label the samples (default: {d.label_examples})")
    add("--temperature", type=float, default=None,
        help="sampling temperature of the groups, as candidates will be drawn (default: the generator's own; "
             "it must be above 0, where samples differ)")
    add("--name", default=None, help="name of the written generator (default: the source's)")
    add("--no-progress", action="store_true", help="no progress bars")
    add("--no-plots", action="store_true", help="no PNG")


def main(args: argparse.Namespace) -> int:
    config = HeadTuneConfig(
        generator=args.generator, out=args.out, task=args.task, data_root=args.data_root, groups=args.groups,
        samples=args.samples, check_groups=args.check_groups, seed=args.seed, epochs=args.epochs, lr=args.lr,
        batch_groups=args.batch_groups, mse_weight=args.mse_weight, holdout=args.holdout,
        label_examples=args.label_examples, temperature=args.temperature, name=args.name, progress=not args.no_progress, plots=not args.no_plots,
    )
    check_seed(config.seed, config.groups + config.check_groups)
    check_out_dir(config.out)
    check_plots(config.plots)
    result = tune_head(config)
    print(format_table(result))
    print("wrote " + ", ".join([result["generator"]["written"], str(Path(config.out) / "head.json"),
                                *result.get("plots", [])]))
    return 0
