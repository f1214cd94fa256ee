"""Evaluate a generator on fresh inits: one step, baselines, prompt alignment, repeats, memorisation.

What ``learned-opt eval`` measures, on ``--inits N`` fresh initialisations (PyTorch's default init
after ``torch.manual_seed(seed)``, seeds ``--seed + i``, default ``1_000_000 + i``: corpus runs use
``corpus_seed + run_id`` with small seeds; with ``--store`` an overlap is refused). The baselines
depend on the generator's task's kind (:func:`suite_for`): Adam and SGD for classifiers such as
``mnist-mlp``, PPO for control tasks such as ``cartpole-mlp``.

* **one step** — one update prompted with the generator's best prompt (clamped into its metric
  range, as :class:`~learned_opt.GptOptimizer` does), with the generator's own sampler (its
  manifest's ``sampling`` entry, else DDIM-50) unless ``--sampling-steps``, ``--method`` or
  ``--t-min`` say otherwise; test loss and error before and after (median and quartiles). With
  ``--candidates N`` every update (one step, repeats, OOD, timing; not prompt alignment, which
  measures the generator itself) draws N samples and keeps the best by the generator's metric on
  the task's validation data (:meth:`~learned_opt.tasks.Task.validation_data`: the last
  ``--holdout`` MNIST training examples, or CartPole episodes from other starting states), as
  ``GptOptimizer(candidates=N)`` does with a held-out closure; the test set is only reported. On a control task the greedy return,
  and, where the task has a ``solved_return`` (``cartpole-mlp``: 475, CartPole-v1's "solved"
  threshold), the share of inits whose return is at least that at init and after 1, 2, 5 and 10 updates.
* **baselines** — ``mnist-mlp``: the same inits trained with Adam (lr 1e-3, batch 128, constant
  lr) and SGD with G.pt's recipe (Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, cosine over 25 epochs
  stepped per epoch), together, by :class:`pretrain.corpus.BatchedTrainer`; test loss at a
  1-2-3-5 log grid up to ``--max-steps``. Per init: the first grid step at or below the update's
  test loss (None: not reached). Wall time: one update for one network (measuring its metric on
  the full test set, which conditions the generator, plus ``LoadedGenerator.sample`` with B = 1;
  medians of 3) against that many Adam steps, timed with a plain ``torch.optim.Adam`` loop
  (evaluation excluded). The Adam loop always runs on the CPU: with ``--device cuda`` the update is
  timed on the GPU and the ratio compares different hardware.
  Control tasks (``cartpole-mlp``): the same inits trained with PPO
  (:func:`learned_opt.baselines.ppo.train_ppo`, the default :class:`~learned_opt.baselines.ppo.PPOHparams`, the corpus's step structure ``CORPUS_SHAPE``: 8 environments x
  128 steps per update, 4 epochs of 4 minibatches; run seeds = the init seeds, so it is
  reproducible) for ``--max-env-steps`` environment steps (rounded down to whole updates), a
  checkpoint after every update (every 1,024 env steps) and its greedy return. Per init: the first
  checkpoint's env steps at or above the update's return, and at or above the task's
  ``solved_return`` if it has one (None: not reached). Wall time: one update (measuring the return, plus sampling; medians of 3) against the
  PPO env steps it replaces, PPO's seconds per env step timed by a separate call training one run
  alone for min(``--max-env-steps``, 4,096) env steps (checkpointing only its ends, evaluation
  excluded), since the batched baseline shares each step among all inits.
* **prompt alignment** — ``--prompts`` prompts per network evenly spaced between the best prompt
  and the network's starting metric; R² between prompted and achieved metric per network (G.pt's
  definition: ``1 - Σ(achieved - prompted)² / Σ(prompted - mean prompted)²``), averaged.
* **repeated prompting** — the metrics after 1..10 successive best-prompt updates, feeding each new
  θ and its measured metric back (reported at 1, 2, 5, 10). As ``GptOptimizer(keep_if_met=True)``
  does, a network whose metric already meets the prompt keeps θ and draws no sample
  (``--no-keep-if-met``: sample anyway); the others are sampled as one batch, so a row's noise
  depends on which rows were kept.
* **memorisation** — each generated network's distance to its nearest corpus checkpoint after
  aligning hidden units (:func:`aligned_distance`; exact for one hidden layer, weight matching for
  more), against the nearest-neighbour distance between checkpoints of different corpus runs, and
  the test loss (the return, on ``cartpole-mlp``) of that nearest checkpoint.
* **denoising** — what the generator learned, without sampling: on up to ``--denoise-runs``
  (default 64) corpus runs that its training split held out (``corpus.split.heldout`` of its
  manifest; the runs must be in ``--store``), the first checkpoint θ and the last θ′ with their
  metrics. In generator units, at t = 999, 700, 400, 200, 100, 30, 5 (scaled to the generator's
  schedule), θ′ is noised with one fixed draw, ``x_t = q_sample(θ′, t, ε)``, and the model predicts
  θ′ from ``(x_t, t, θ, l, l′)``: its x0 MSE against that of returning θ (``ratio`` below 1 beats
  returning θ; an untrained model returns θ, ratio 1) and the cosine between (prediction − θ) and
  (θ′ − θ). The same on training runs (``train_runs``): near the held-out figures, the generator
  is not overfitting its corpus. Task-independent
  (:func:`~pretrain.evaluate.denoising.measure_denoising`); skipped without a store or a recorded
  split.
* **property head** (a generator trained with ``--property-head``) — Spearman's rank correlation
  of its predicted metric with the true one on held-out corpus checkpoints and on the generated
  samples of the one-step and prompt-alignment sections (:mod:`pretrain.evaluate.property`).
  ``--rank self`` makes ``--candidates`` keep the best-predicted sample instead of the best on
  validation data; ``--guidance W`` samples with classifier-free guidance.
* **out-of-distribution inits** — Kaiming-normal weights (zero biases) and the default uniform init
  scaled by 3: one update and up to 10 repeated.

Writes ``eval.json`` (numbers, config, seeds, generator sha256, hardware, wall times) and PNG plots
(``one_step.png``, ``prompt_alignment.png``, ``baselines.png``, and ``denoising.png`` when that
section ran) into ``--out`` and prints a summary table.

Modules: ``config`` (:class:`EvalConfig` and constants), ``metrics`` (summaries, R², steps to
reach), ``sampler`` (prompted updates), ``suites`` (each task's baselines), ``memorisation``
(hidden-unit alignment and nearest corpus checkpoints), ``denoising``, ``property``, ``run``
(:func:`evaluate_generator`), ``plots`` and ``report`` (figures and the summary table), ``cli``.
"""

from .cli import add_sampler_arguments, check_rank_choice, configure, main
from .config import EvalConfig
from .denoising import denoise_timesteps
from .memorisation import align_hidden_units, aligned_distance, hungarian, nearest_aligned
from .metrics import init_params, log_grid, r2_score, reach_summary, solved_share, steps_to_reach, summary
from .report import format_summary, plot_eval
from .run import evaluate_generator
from .sampler import Sampler, prompt_alignment
from .suites import ClassifierSuite, ControlSuite, suite_for

__all__ = [
    "ClassifierSuite", "ControlSuite", "EvalConfig", "Sampler", "add_sampler_arguments", "check_rank_choice",
    "align_hidden_units", "aligned_distance", "configure", "denoise_timesteps", "evaluate_generator",
    "format_summary", "hungarian", "init_params", "log_grid", "main", "nearest_aligned", "plot_eval", "prompt_alignment", "r2_score",
    "reach_summary", "solved_share", "steps_to_reach", "suite_for", "summary",
]
