"""Benchmark GptOptimizer's periodic mode against its base optimizer (``--mode periodic``), and the
learned optimizer against Adam, grid-tuned Adam and SGD (``--mode lopt``): steps to a target.

What ``learned-opt bench --mode periodic`` measures, on ``--inits N`` fresh initialisations of the
generator's task (its manifest's ``task``, or ``--task`` for a task of your own; supervised tasks
only) (PyTorch's default init, seeds ``--seed + i``, default ``3_000_000 + i``: far from
the small seeds of corpus runs and from ``learned-opt eval``'s ``1_000_000 + i``), for each base
optimizer in ``--bases`` (``adam``: lr 1e-3; ``sgd``: G.pt's recipe, Nesterov 0.9, lr 0.1, wd 5e-4,
cosine over 25 epochs stepped per epoch; ``lopt``: :class:`~learned_opt.LearnedOptimizer`, lr 1.0,
``--weights``; all with minibatches of 128, as in ``learned-opt demo``;
the recipes of :mod:`learned_opt.recipes`, trained by the one loop of
:mod:`learned_opt.baselines.supervised`):

* **the base alone** for ``--steps`` steps;
* **the same base inside** ``GptOptimizer(..., every=k, metric_closure=..., guard=True)`` for each
  ``k`` in ``--every``: the same init and the same minibatch order (a ``torch.Generator`` seeded with
  the init's seed), so until the first accepted generative update the two runs are the same run.

This is NiNo's way of counting (Knyazev et al. 2025, https://arxiv.org/abs/2409.04434): a target
loss, and how many steps each method needs to reach it in one and the same training run. The
target is the median over inits of the base alone's test loss at step ``--steps`` (one target per
base). Per init and configuration the command reports the first step of the evaluation grid (every
``--eval-every`` steps) whose test loss is at or below the target (None: never), the wall time to
that step (base steps and generative updates included, evaluation excluded), the final test loss,
the generative updates attempted / accepted / rejected / failed and the seconds they took. Summaries
per configuration, headline first: the steps (and median seconds) at which the **median curve** (the
median test loss over all inits at each grid step) first reaches the target, and their ratio to the
base alone's (below 1: periodic mode is faster; every init counts, and the base alone's median
curve reaches its own target by its last step); then how many inits reached the target, the median
steps and seconds to it over the inits that did and their ratios, the median final loss, and
"never worse": the share of inits whose final test loss is at or below the base alone's on the
same init.

**The closure's metric is not the test set.** The generator is conditioned on a cross-entropy
(``test_loss``), and the guard keeps an update only if that metric does not get worse. Measuring it
on the test set would let the test set steer training. So the last ``--holdout`` examples of the
training set are held out (the task's ``validation_data``): the networks train on the rest, and the
metric closure returns the full-batch training loss (``task.loss``, a cross-entropy) on the
held-out slice. The test set is read only by the evaluation on the grid, which is what is reported
and is not timed.

``--prompt`` is the generator's best prompt by default, a fixed value, or ``frac:X`` (X times the
current metric). The sampler is the generator's own (its manifest's ``sampling`` entry, else
DDIM-50) unless ``--sampling-steps``, ``--method`` or ``--t-min`` say otherwise; ``--candidates N``
keeps the best of N samples per update by the metric closure. ``--moments keep`` (default) leaves the base optimizer's state (Adam's moments) as
it was after an accepted update, as GptOptimizer does; ``reset`` clears it after every accepted
update, so both choices can be measured.

Writes ``bench.json`` (config, hardware, generator name and sha256, per-init rows, curves,
summaries) and ``periodic.png`` (median test loss against steps, one panel per base) into ``--out``
and prints a summary table.

``--mode lopt`` (:mod:`pretrain.bench.lopt`; no generator) trains, per ``--task`` (supervised tasks,
several at once) and init, the same init with the same minibatch order with Adam(1e-3), Adam with
the lr of ``--lr-grid`` chosen on the held-out slice at ``--grid-steps`` (``adam-tuned``), G.pt's
SGD recipe and the learned optimizer (``--weights``, lr 1.0), all for ``--steps``. The target is
Adam(1e-3)'s median test loss at ``--grid-steps``; per optimizer it reports the median curve's
steps to it and their ratio to Adam(1e-3)'s, each init's steps, the median test loss at
``--grid-steps`` and ``--steps``, divergences and seconds per step, and whether the learned
optimizer reached the target in fewer steps than grid-tuned Adam. Writes ``bench.json`` and one PNG
per task.

Modules: ``config`` (:class:`BenchConfig`, :class:`LoptBenchConfig`, option parsing), ``runs`` (the
held-out split and one training run), ``summaries`` (per-init rows, targets, median curves),
``periodic`` (:func:`run_bench`), ``lopt`` (:func:`run_lopt`), ``report`` (``bench.json``, the
PNGs, the summary tables), ``cli``.
"""

from .cli import configure, main
from .config import (
    LOPT_OPTIMIZERS,
    LR_GRID,
    MODES,
    BenchConfig,
    FractionPrompt,
    LoptBenchConfig,
    describe_prompt,
    parse_bases,
    parse_every,
    parse_floats,
    parse_prompt,
)
from .lopt import choose_lr, run_lopt
from .periodic import run_bench, run_periodic
from .report import format_lopt_summary, format_summary, plot_lopt_task, plot_periodic
from .runs import Run, Split, eval_grid, holdout_closure, split_holdout, train_run
from .summaries import curve_summary, init_row, median_curve, summarise, target_loss

__all__ = [
    "LOPT_OPTIMIZERS", "LR_GRID", "MODES", "BenchConfig", "FractionPrompt", "LoptBenchConfig", "Run", "Split",
    "choose_lr", "configure", "curve_summary", "describe_prompt", "eval_grid", "format_lopt_summary", "format_summary",
    "holdout_closure", "init_row", "main", "median_curve", "parse_bases", "parse_every", "parse_floats",
    "parse_prompt", "plot_lopt_task", "plot_periodic", "run_bench", "run_lopt", "run_periodic", "split_holdout",
    "summarise", "target_loss", "train_run",
]
