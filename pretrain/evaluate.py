"""Evaluate a generator on fresh inits: one step, baselines, prompt alignment, repeats, memorisation.

What ``learned-opt eval`` measures, on ``--inits N`` fresh initialisations (PyTorch's default init
after ``torch.manual_seed(seed)``, seeds ``--seed + i``, default ``1_000_000 + i``: corpus runs use
``corpus_seed + run_id`` with small seeds; with ``--store`` an overlap is refused). The baselines
depend on the generator's task (:func:`suite_for`): Adam and SGD for ``mnist-mlp``, PPO for
``cartpole-mlp``.

* **one step** — one update prompted with the generator's best prompt (clamped into its metric
  range, as :class:`~learned_opt.GptOptimizer` does), with the generator's own sampler (its
  manifest's ``sampling`` entry, else DDIM-50) unless ``--sampling-steps``, ``--method`` or
  ``--t-min`` say otherwise; test loss and error before and after (median and quartiles). With
  ``--candidates N`` every update (one step, repeats, OOD, timing; not prompt alignment, which
  measures the generator itself) draws N samples and keeps the best by the generator's metric on
  the task's validation data (:meth:`~learned_opt.tasks.Task.validation_data`: the last
  ``--holdout`` MNIST training examples, or CartPole episodes from other starting states), as
  ``GptOptimizer(candidates=N)`` does with a held-out closure; the test set is only reported. On ``cartpole-mlp`` the greedy return,
  and the share of inits whose return is at least ``SOLVED_RETURN`` = 475 (CartPole-v1's "solved"
  threshold) at init and after 1, 2, 5 and 10 updates.
* **baselines** — ``mnist-mlp``: the same inits trained with Adam (lr 1e-3, batch 128, constant
  lr) and SGD with G.pt's recipe (Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, cosine over 25 epochs
  stepped per epoch), together, by :class:`pretrain.corpus.BatchedMLPTrainer`; test loss at a
  1-2-3-5 log grid up to ``--max-steps``. Per init: the first grid step at or below the update's
  test loss (None: not reached). Wall time: one update for one network (measuring its metric on
  the full test set, which conditions the generator, plus ``LoadedGenerator.sample`` with B = 1;
  medians of 3) against that many Adam steps, timed with a plain ``torch.optim.Adam`` loop
  (evaluation excluded). The Adam loop always runs on the CPU: with ``--device cuda`` the update is
  timed on the GPU and the ratio compares different hardware.
  ``cartpole-mlp``: the same inits trained with PPO (:func:`pretrain.ppo.train_ppo`, the default
  :class:`~pretrain.ppo.PPOHparams`, the corpus's step structure ``CORPUS_SHAPE``: 8 environments x
  128 steps per update, 4 epochs of 4 minibatches; run seeds = the init seeds, so it is
  reproducible) for ``--max-env-steps`` environment steps (rounded down to whole updates), a
  checkpoint after every update (every 1,024 env steps) and its greedy return. Per init: the first
  checkpoint's env steps at or above the update's return, and at or above 475 (None: not
  reached). Wall time: one update (measuring the return, plus sampling; medians of 3) against the
  PPO env steps it replaces, PPO's seconds per env step timed by a separate call training one run
  alone for min(``--max-env-steps``, 4,096) env steps (checkpointing only its ends, evaluation
  excluded), since the batched baseline shares each step among all inits.
* **prompt alignment** — ``--prompts`` prompts per network evenly spaced between the best prompt
  and the network's starting metric; R² between prompted and achieved metric per network (G.pt's
  definition: ``1 - Σ(achieved - prompted)² / Σ(prompted - mean prompted)²``), averaged.
* **repeated prompting** — the metrics after 1..10 successive best-prompt updates, feeding each new
  θ and its measured metric back (reported at 1, 2, 5, 10).
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
  is not overfitting its corpus. Task-independent (:func:`_denoising`); skipped without a store or
  a recorded split.
* **out-of-distribution inits** — Kaiming-normal weights (zero biases) and the default uniform init
  scaled by 3: one update and up to 10 repeated.

Writes ``eval.json`` (numbers, config, seeds, generator sha256, hardware, wall times) and PNG plots
(``one_step.png``, ``prompt_alignment.png``, ``baselines.png``, and ``denoising.png`` when that
section ran) into ``--out`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from learned_opt import __version__, tasks
from learned_opt.demo import first_step_at_or_below, train_baseline
from learned_opt.demo_cartpole import first_step_at_or_above
from learned_opt.diffusion import METHODS
from learned_opt.errors import ConfigError
from learned_opt.pretrained import LoadedGenerator, load_generator
from learned_opt.tasks import Task
from learned_opt.tasks.cartpole_mlp import CartPoleMLP

from .corpus import ADAM, CORPUS_SHAPE, GPT_RECIPE, BatchedMLPTrainer, RunPlan
from .ppo import PPOHparams, PPOShape, train_ppo
from .store import Store

REPEATS_REPORTED = (1, 2, 5, 10)
# The batched trainer always applies a per-epoch cosine; with this many nominal epochs its factor
# stays 1 to within 1e-15 over any evaluated run, i.e. Adam trains at a constant lr of 1e-3.
CONSTANT_LR_EPOCHS = 10**9
ADAM_BASELINE = {"optimizer": ADAM, "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 128,
                 "epochs": CONSTANT_LR_EPOCHS, "schedule": "constant", "adam_beta2": 0.999, "adam_eps": 1e-8}
SGD_BASELINE = {**GPT_RECIPE, "schedule": "cosine-per-epoch", "adam_beta2": 0.999, "adam_eps": 1e-8}
SOLVED_RETURN = 475.0  # CartPole-v1's reward threshold: a policy with this mean return "solves" it
PPO_TIMING_ENV_STEPS = 4096  # env steps of the single PPO run timed for seconds per env step
RETURN_BATCH = 1024  # policies rolled out at once when measuring the PPO checkpoints' returns
SCREEN_ELEMENTS = 2**22  # bounds the [Q, m, H, H] tensors of the memorisation screening per chunk
METRIC_LABELS = {"test_loss": "test loss", "test_error": "test error %", "return": "return"}


@dataclass
class EvalConfig:
    """What ``learned-opt eval`` measures (one field per command-line option)."""

    generator: str  # registry name or manifest path
    out: str = "eval"
    store: str | None = None  # corpus store for the memorisation and denoising checks (skipped when None)
    data_root: str | None = None
    inits: int = 20
    seed: int = 1_000_000  # init i has seed seed + i
    sampling_steps: int | None = None  # None: the generator's own sampler (its manifest's, else DDIM-50)
    method: str | None = None
    t_min: int | None = None
    candidates: int = 1  # samples per update, the best on validation data kept
    holdout: int = 5000  # MNIST training examples held out as validation data for --candidates
    max_steps: int = 3000  # Adam / SGD steps (11,700 for the full comparison)
    max_env_steps: int = 100_000  # PPO environment steps per init (cartpole-mlp)
    prompts: int = 20  # per network, for prompt alignment
    repeats: int = 10  # successive updates
    memo_runs: int = 500  # corpus runs searched in the memorisation check
    memo_checkpoints: int = 4  # per run: the final checkpoint and evenly spaced intermediate ones
    memo_queries: int = 100  # corpus checkpoints whose nearest neighbour in other runs is measured
    denoise_runs: int = 64  # held-out corpus runs of the denoising check (0: not run)
    timing_steps: int = 200  # plain Adam steps timed for seconds per step
    sample_batch: int = 128  # networks sampled at once
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        for name in ("inits", "sampling_steps", "max_steps", "max_env_steps", "prompts", "repeats", "memo_runs",
                     "memo_checkpoints", "memo_queries", "timing_steps", "sample_batch", "candidates"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.t_min is not None and self.t_min < 0:
            raise ConfigError(f"--t-min must be >= 0, got {self.t_min}")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown sampling --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.prompts < 2:
            raise ConfigError("--prompts must be >= 2 (R² needs prompts that differ)")
        if self.denoise_runs < 0:
            raise ConfigError(f"--denoise-runs must be >= 0, got {self.denoise_runs}")


# ---------------------------------------------------------------------- small helpers


def r2_score(prompted: torch.Tensor, achieved: torch.Tensor) -> torch.Tensor:
    """G.pt's prompt alignment per network: R² of achieved against prompted, ``[..., K]`` -> ``[...]``.

    ``1 - Σ(achieved - prompted)² / Σ(prompted - mean(prompted))²`` (the coefficient of
    determination with the identity as the model; 1 is perfect, it can be negative).
    """
    p, a = prompted.double(), achieved.double()
    ss_res = ((a - p) ** 2).sum(-1)
    ss_tot = ((p - p.mean(-1, keepdim=True)) ** 2).sum(-1)
    return (1.0 - ss_res / ss_tot).float()


def log_grid(max_steps: int) -> list[int]:
    """0 and the 1-2-3-5 steps of each decade up to ``max_steps`` (which is always included)."""
    out, scale = {0, int(max_steps)}, 10
    while scale <= max_steps:
        out.update(m * scale for m in (1, 2, 3, 5) if m * scale <= max_steps)
        scale *= 10
    return sorted(out)


def summary(values: Sequence[float | None]) -> dict:
    """Median, quartiles, mean, min, max and count of the finite values (None and NaN skipped)."""
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return {"n": 0, "median": None, "q1": None, "q3": None, "mean": None, "min": None, "max": None}
    t = torch.tensor(v, dtype=torch.float64)
    q1, med, q3 = (float(x) for x in torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
    return {"n": len(v), "median": med, "q1": q1, "q3": q3, "mean": statistics.fmean(v), "min": v[0], "max": v[-1]}


def steps_to_reach(grid: Sequence[int], curves: torch.Tensor, targets: torch.Tensor,
                   direction: str = "min") -> list[int | None]:
    """Per network, the first grid step whose value is at or below its target (``direction="max"``:
    at or above): ``[N, G]``, ``[N]``; None where never reached (or the target is NaN)."""
    first = {"min": first_step_at_or_below, "max": first_step_at_or_above}[direction]
    return [first(grid, c.tolist(), float(t)) for c, t in zip(curves, targets)]


def solved_share(returns: torch.Tensor) -> float:
    """The share of ``[N]`` returns at or above :data:`SOLVED_RETURN`."""
    return float((returns >= SOLVED_RETURN).double().mean())


def _reach_summary(reach: list[int | None], curves: torch.Tensor) -> dict:
    """Steps-to-reach statistics; a baseline whose curve is all NaN (dropped: it diverged) is
    counted as diverged, not as "not reached", and left out of both."""
    diverged = curves.isnan().all(-1).tolist()
    kept = [r for r, d in zip(reach, diverged) if not d]
    return {"steps_to_reach": summary(kept), "not_reached": kept.count(None), "diverged": sum(diverged)}


def init_params(task: Task, seeds: Sequence[int], kind: str = "default") -> torch.Tensor:
    """Fresh inits ``[N, P]``: ``torch.manual_seed(seed); task.build_model()``, then ``kind``.

    ``"default"``: PyTorch's init; ``"kaiming-normal"``: weights ``kaiming_normal_`` (fan-in,
    ReLU), biases zero; ``"uniform-x3"``: the default init times 3. The global RNG is restored.
    """
    layout = task.layout()
    out = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(int(seed))
            model = task.build_model()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if kind == "kaiming-normal":
                        torch.nn.init.kaiming_normal_(p, nonlinearity="relu") if p.dim() > 1 else p.zero_()
                    elif kind == "uniform-x3":
                        p.mul_(3.0)
                    elif kind != "default":
                        raise ConfigError(f"unknown init kind {kind!r}")
            out.append(layout.flatten_module(model))
    return torch.stack(out)  # [N, P]


# ---------------------------------------------------------------------- hidden-unit alignment


def hungarian(cost: torch.Tensor) -> torch.Tensor:
    """Exact minimum-cost assignment of a square ``[H, H]`` cost matrix: ``col[i]`` for row ``i``.

    The O(H³) Hungarian algorithm with potentials (Kuhn-Munkres); for the few units of a hidden
    layer plain Python is fast enough (scipy is not a dependency).
    """
    a = cost.double().tolist()
    n = len(a)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[j]: row (1-based) assigned to column j
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [inf] * (n + 1), [False] * (n + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = a[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[match[j] - 1] = j - 1
    return torch.tensor(col, dtype=torch.long)


def _hidden_layers(task: Task) -> int:
    """The number of hidden layers of the task's MLP (``fc1`` .. ``fc{L+1}``); at least one."""
    depth = len(task.hidden_sizes())
    if depth < 1:
        raise ConfigError(f"the memorisation check aligns hidden units; task {task.name!r} has no hidden layer")
    return depth


def _units(p: dict[str, torch.Tensor], layer: int, outgoing: bool) -> torch.Tensor:
    """What is attached to each unit of hidden layer ``layer`` (1-based), ``[..., H, D]``: its row of
    ``fc{layer}.weight`` and its ``fc{layer}.bias``, and with ``outgoing`` its column of
    ``fc{layer+1}.weight`` (``p``: unflattened parameters with leading dims ``...``)."""
    parts = [p[f"fc{layer}.weight"], p[f"fc{layer}.bias"][..., None]]
    if outgoing:
        parts.append(p[f"fc{layer + 1}.weight"].transpose(-1, -2))
    return torch.cat(parts, -1)


def align_hidden_units(task: Task, a: torch.Tensor, b: torch.Tensor, sweeps: int = 20) -> list[torch.Tensor]:
    """Permutations of ``b``'s hidden units, one ``[H_l]`` per layer, that bring flat ``b`` [P] near ``a`` [P].

    Layer by layer from the input, each layer's units are matched by the exact assignment
    (:func:`hungarian`) minimising the squared distance of their incoming weights and biases (the
    earlier layers already aligned) and, in the last hidden layer, their outgoing weights too. With
    one hidden layer that is the exact optimum. With more, sweeps of weight matching (Ainsworth et
    al., 2023) follow: each layer re-matched on everything attached to its units with the other
    layers fixed, which never increases the distance, until a sweep changes nothing (at most
    ``sweeps``): a local optimum.
    """
    depth, layout = _hidden_layers(task), task.layout()
    pa = layout.unflatten(a[None].double())
    perms = [torch.arange(h) for h in task.hidden_sizes()]

    def match(layer: int, outgoing: bool) -> torch.Tensor:  # that layer as stored, the others aligned
        others = [torch.arange(len(p)) if i == layer else p for i, p in enumerate(perms, start=1)]
        pb = layout.unflatten(task.permute(b[None].double(), [p[None] for p in others]))
        return hungarian(torch.cdist(_units(pa, layer, outgoing)[0], _units(pb, layer, outgoing)[0]) ** 2)

    for layer in range(1, depth + 1):
        perms[layer - 1] = match(layer, layer == depth)
    for _ in range(sweeps if depth > 1 else 0):
        changed = False
        for layer in range(1, depth + 1):
            new = match(layer, True)
            changed |= not torch.equal(new, perms[layer - 1])
            perms[layer - 1] = new
        if not changed:
            break
    return perms


def _greedy_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A greedy assignment of each ``[..., H, H]`` matrix: its total cost (an upper bound of the
    optimum) and the column of each row, ``[..., H]``."""
    c = cost.clone()
    h = c.shape[-1]
    total = torch.zeros(c.shape[:-2], dtype=c.dtype, device=c.device)
    flat = c.reshape(-1, h * h)
    cols = torch.empty(flat.shape[0], h, dtype=torch.long, device=c.device)
    for _ in range(h):
        best, idx = flat.min(-1)
        total += best.reshape(total.shape)
        row, col = idx // h, idx % h
        view = flat.view(-1, h, h)
        cols[torch.arange(view.shape[0]), row] = col
        view[torch.arange(view.shape[0]), row, :] = math.inf
        view[torch.arange(view.shape[0]), :, col] = math.inf
    return total, cols.view(c.shape[:-1])


def aligned_distance(task: Task, a: torch.Tensor, b: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """``(‖a - perm(b)‖, perms)``: L2 distance of flat ``a`` [P] to ``b`` [P] after permuting ``b``'s
    hidden units to match ``a``'s (:func:`align_hidden_units`; exact for one hidden layer)."""
    perms = align_hidden_units(task, a, b)
    aligned = task.permute(b[None], [p[None] for p in perms])[0]
    return float((a.double() - aligned.double()).norm()), perms


def _screen(task: Task, queries: torch.Tensor, candidates: torch.Tensor, chunk: int) -> torch.Tensor:
    """Squared distances ``[Q, M]`` after a greedy alignment of every (query, candidate) pair, batched.

    Layer by layer as in :func:`align_hidden_units`, each layer assigned greedily, the candidates'
    incoming weights reordered by each pair's assignment of the layer before: an upper bound of the
    aligned squared distance.
    """
    depth, layout = _hidden_layers(task), task.layout()
    pq = layout.unflatten(queries.double())
    nq = queries.shape[0]
    chunk = max(1, min(chunk, SCREEN_ELEMENTS // (nq * sum(h * h for h in task.hidden_sizes()))))
    scores = []
    for start in range(0, candidates.shape[0], chunk):
        pc = layout.unflatten(candidates[start : start + chunk].double())
        total, prev = 0, None  # prev [Q, m, H]: each pair's assignment in the layer before
        for layer in range(1, depth + 1):
            uq, uc = _units(pq, layer, layer == depth), _units(pc, layer, layer == depth)  # [Q, H, D], [m, H, D]
            if prev is None:
                cross = torch.einsum("qid,mjd->qmij", uq, uc)
            else:  # the candidates' incoming weights, columns in each pair's order: [Q, m, H, H_prev]
                w = pc[f"fc{layer}.weight"]
                k = w.shape[-1]
                w = w[None].expand(nq, -1, -1, -1).gather(3, prev[:, :, None, :].expand(-1, -1, w.shape[1], -1))
                cross = torch.einsum("qik,qmjk->qmij", uq[..., :k], w) + torch.einsum("qid,mjd->qmij", uq[..., k:], uc[..., k:])
            # squared distances between every query unit and every candidate unit: [Q, m, H, H]
            sq = (uq * uq).sum(-1)[:, None, :, None] + (uc * uc).sum(-1)[None, :, None, :] - 2 * cross
            cost, prev = _greedy_assignment(sq.clamp_min(0))
            total = total + cost
        rest = torch.cdist(pq[f"fc{depth + 1}.bias"], pc[f"fc{depth + 1}.bias"]) ** 2  # [Q, m]
        scores.append(total + rest)
    return torch.cat(scores, 1)


def nearest_aligned(
    task: Task, queries: torch.Tensor, candidates: torch.Tensor, exclude: torch.Tensor | None = None,
    refine: int = 8, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest candidate of each query after hidden-unit alignment: ``[Q, P]``, ``[M, P]`` -> ``[Q]``, ``[Q]``.

    Screening: a greedy assignment for every (query, candidate) pair, batched (:func:`_screen`);
    then :func:`aligned_distance` for the ``refine`` best candidates of each query, whose smallest
    distance is returned with the candidate's index. ``exclude`` ``[Q, M]`` bool masks pairs (e.g.
    checkpoints of the query's own run). Distances are L2 in raw parameter units.
    """
    screened = _screen(task, queries, candidates, chunk)  # [Q, M] greedy squared distances
    if exclude is not None:
        screened = screened.masked_fill(exclude, math.inf)
    k = min(refine, screened.shape[1])
    top = screened.topk(k, dim=1, largest=False).indices  # [Q, k]
    dist = torch.full((queries.shape[0],), math.inf, dtype=torch.float64)
    index = torch.full((queries.shape[0],), -1, dtype=torch.long)
    for q in range(queries.shape[0]):
        for m in top[q].tolist():
            if not math.isfinite(float(screened[q, m])):
                continue
            d, _ = aligned_distance(task, queries[q], candidates[m])
            if d < dist[q]:
                dist[q], index[q] = d, m
    return dist.float(), index


# ---------------------------------------------------------------------- sampling


class Sampler:
    """Batched prompted updates with one generator: raw θ, metric and prompt in, raw θ′ out.

    With ``candidates`` > 1 each update draws that many samples and keeps the one ``score`` (the
    generator's metric on validation data, ``[M, P]`` -> ``[M]``) rates best.
    """

    def __init__(self, generator: LoadedGenerator, config: EvalConfig, seed: int,
                 score: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.gen, self.config, self.score = generator, config, score
        self.rng = torch.Generator().manual_seed(seed)  # CPU noise: same draws on any device
        self.lo, self.hi = generator.metric_range
        # the sampler actually used: the config's choices over the generator's own
        self.settings = {**generator.sampler(config.method, config.sampling_steps, config.t_min),
                         "candidates": config.candidates}
        if config.candidates > 1 and score is None:
            raise ConfigError("--candidates needs validation data to choose among the samples")

    def clamp(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt.clamp(self.lo, self.hi)

    def __call__(self, theta: torch.Tensor, metric: torch.Tensor, prompt: torch.Tensor,
                 candidates: int | None = None, rng: torch.Generator | None = None) -> torch.Tensor:
        """``[B, P]``, ``[B]``, ``[B]`` -> ``[B, P]`` (prompts clamped into the metric range); ``candidates``
        (default: the configured number) samples per row, the best by ``score`` kept."""
        c = self.config.candidates if candidates is None else candidates
        if c > 1:
            theta, metric, prompt = (v.repeat_interleave(c, 0) for v in (theta, metric, prompt))
        dev, s = self.gen.device, self.settings
        out = []
        for i in range(0, theta.shape[0], self.config.sample_batch):
            sl = slice(i, i + self.config.sample_batch)
            out.append(self.gen.sample(
                theta[sl].to(dev), metric[sl].to(dev), self.clamp(prompt[sl]).to(dev),
                steps=s["steps"], method=s["method"], t_min=s["t_min"], generator=rng or self.rng,
            ).cpu())
        out = torch.cat(out)
        if c == 1:
            return out
        scores = self.score(out).view(-1, c)  # [B, C]
        best = scores.argmin(1) if self.gen.metric_direction == "min" else scores.argmax(1)
        return out.view(-1, c, out.shape[-1])[torch.arange(scores.shape[0]), best]


Measure = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _metrics(task: Task, flat: torch.Tensor, data, device, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The metrics ``names`` of ``[B, P]`` networks, on the CPU: name -> ``[B]``."""
    m = task.evaluate(flat.to(device), data, list(names))
    return {k: v.float().cpu() for k, v in m.items()}


def repeated_updates(sampler: Sampler, theta: torch.Tensor, measure: Measure, n: int, metric: str) -> tuple[dict, torch.Tensor]:
    """Metrics after 0..n successive best-prompt updates, ``{name: [n+1, B]}``, and θ after the first
    update ``[B, P]``. Each update is conditioned on ``metric`` measured after the previous one."""
    m = measure(theta)
    hist = {k: [v] for k, v in m.items()}
    prompt = torch.full((theta.shape[0],), sampler.gen.best_prompt)
    first = None
    for _ in range(n):
        theta = sampler(theta, m[metric], prompt)
        first = theta if first is None else first
        m = measure(theta)
        for k, v in m.items():
            hist[k].append(v)
    return {k: torch.stack(v) for k, v in hist.items()}, first


# ---------------------------------------------------------------------- the baselines of each task


class ClassifierSuite:
    """``mnist-mlp``: Adam and SGD from the same inits, test loss on a 1-2-3-5 grid of steps."""

    metrics = ("test_loss", "test_error")  # measured for every network, besides the generator's metric
    memo_metric = "test_loss"  # reported for the nearest corpus checkpoint
    table_metric = "test_error"  # the repeated and OOD rows of the printed table
    baseline, baseline_label, unit = "adam", "Adam", "step"  # what one update's wall time is set against

    def check(self, task: Task, config: EvalConfig) -> None:
        for m in self.metrics:
            task.metric(m)

    def seconds_per_step(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig) -> tuple[float, dict]:
        """A plain ``torch.optim.Adam`` loop on one network (evaluation excluded)."""
        return train_baseline(task, theta0[0], data, "adam", config.timing_steps, (), seed=0).seconds_per_step, {}

    def run(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig,
            after: dict[str, torch.Tensor]) -> tuple[dict, list[int | None]]:
        """The ``baselines`` section, and per init the Adam steps to reach the update's test loss."""
        grid = log_grid(config.max_steps)
        curves = _baselines(task, theta0, seeds, data, config, grid)
        reach = {o: steps_to_reach(grid, c, after["test_loss"]) for o, c in curves.items()}
        return {
            "grid": grid,
            "adam": {"hparams": ADAM_BASELINE, "test_loss": curves["adam"].tolist(), "steps_to_reach": reach["adam"]},
            "sgd": {"hparams": SGD_BASELINE, "test_loss": curves["sgd"].tolist(), "steps_to_reach": reach["sgd"]},
            "summary": {
                **{f"{o}_{k}": v for o in ("adam", "sgd") for k, v in _reach_summary(reach[o], curves[o]).items()},
            },
        }, reach["adam"]

    def one_step_extra(self, hist: dict[str, torch.Tensor]) -> dict:
        return {}

    def share_rows(self, result: dict) -> list:
        return []

    def baseline_rows(self, result: dict) -> list:
        bl, n = result["baselines"]["summary"], len(result["seeds"])
        return [(f"Adam steps to reach (not reached: {bl['adam_not_reached']}/{n}, diverged: {bl['adam_diverged']})",
                 bl["adam_steps_to_reach"]),
                (f"SGD steps to reach (not reached: {bl['sgd_not_reached']}/{n}, diverged: {bl['sgd_diverged']})",
                 bl["sgd_steps_to_reach"])]

    def plot_one_step(self, result: dict, out: Path) -> Path:
        return _plot_before_after(result, out, "test_loss", log=True)

    def plot_baselines(self, result: dict, out: Path) -> Path:
        bl = result["baselines"]
        return _plot_curves(
            out, [max(s, 1) for s in bl["grid"]],  # log axis: step 0 drawn at 1
            [("Adam lr 1e-3", bl["adam"]["test_loss"]), ("SGD (G.pt recipe)", bl["sgd"]["test_loss"])],
            [(result["one_step"]["summary"]["after_test_loss"]["median"], "--", "1 generative update (median)")],
            "training steps (batch 128; step 0 drawn at 1)", f"{result['generator']['task']} test loss", log_x=True,
        )


class CartPoleSuite:
    """``cartpole-mlp``: PPO from the same inits, the greedy return after every PPO update."""

    metrics = ("return",)
    memo_metric = table_metric = "return"
    baseline, baseline_label, unit = "ppo", "PPO", "env_step"

    @staticmethod
    def shape(config: EvalConfig) -> PPOShape:
        return replace(CORPUS_SHAPE, total_steps=config.max_env_steps)

    def check(self, task: Task, config: EvalConfig) -> None:
        shape = self.shape(config)
        if config.max_env_steps < shape.envs * shape.horizon:
            raise ConfigError(f"--max-env-steps must be >= {shape.envs * shape.horizon} (one PPO update of {shape.envs} "
                              f"environments x {shape.horizon} steps), got {config.max_env_steps}")

    def seconds_per_step(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig) -> tuple[float, dict]:
        """One PPO run alone (the baseline's hyperparameters and step structure), evaluation excluded."""
        shape = replace(self.shape(config), total_steps=min(config.max_env_steps, PPO_TIMING_ENV_STEPS))
        t = time.perf_counter()
        res = train_ppo(task, theta0[:1], PPOHparams(), shape, run_seeds=seeds[:1], checkpoint_at=[0, shape.grad_steps])
        seconds, env_steps = time.perf_counter() - t, int(res.env_steps[0, -1])
        return seconds / env_steps, {"ppo_timing_env_steps": env_steps,
                                     "ppo_timing": "one PPO run trained alone (not the batched baseline)"}

    def run(self, task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig,
            after: dict[str, torch.Tensor]) -> tuple[dict, list[int | None]]:
        """The ``baselines`` section, and per init the PPO env steps to reach the update's return."""
        shape = self.shape(config)
        per_update = shape.epochs * shape.minibatches
        bar = tqdm(total=shape.grad_steps, desc="PPO baseline", unit="grad step", disable=not config.progress)
        res = train_ppo(task, theta0, PPOHparams(), shape, seed=config.seed, run_seeds=seeds,
                        checkpoint_at=[u * per_update for u in range(shape.updates + 1)],
                        progress=lambda done: bar.update(done - bar.n))
        bar.close()
        grid = res.env_steps[0].tolist()  # the same for every run: after each update
        n, g = res.checkpoints.shape[:2]
        flat = res.checkpoints.reshape(n * g, -1)
        returns = torch.cat([task.evaluate(flat[s : s + RETURN_BATCH], data)["return"]
                             for s in range(0, n * g, RETURN_BATCH)]).float().view(n, g)
        reach = steps_to_reach(grid, returns, after["return"], "max")
        solve = steps_to_reach(grid, returns, torch.full((n,), SOLVED_RETURN), "max")
        r, s = _reach_summary(reach, returns), _reach_summary(solve, returns)
        return {
            "env_steps": grid,
            "ppo": {"hparams": asdict(PPOHparams()), "shape": asdict(shape), "return": returns.tolist(),
                    "steps_to_reach": reach, "steps_to_solve": solve},
            "summary": {
                "ppo_steps_to_reach": r["steps_to_reach"], "ppo_not_reached": r["not_reached"],
                "ppo_steps_to_solve": s["steps_to_reach"], "ppo_not_solved": s["not_reached"],
                "ppo_final_return": summary(returns[:, -1].tolist()),
                "ppo_final_solved_share": solved_share(returns[:, -1]),
            },
        }, reach

    def one_step_extra(self, hist: dict[str, torch.Tensor]) -> dict:
        """The share of inits at or above the solved return after 0, 1, 2, 5, 10 updates."""
        returns = hist["return"]  # [n+1, N]
        reported = [r for r in (0, *REPEATS_REPORTED) if r < returns.shape[0]]
        return {"solved": {"threshold": SOLVED_RETURN, "share": {str(r): solved_share(returns[r]) for r in reported}}}

    def share_rows(self, result: dict) -> list:
        solved = result["one_step"]["solved"]
        return [(f"share with return >= {solved['threshold']:g}, {_updates(int(r))}", {"median": s})
                for r, s in solved["share"].items()]

    def baseline_rows(self, result: dict) -> list:
        bl, n = result["baselines"]["summary"], len(result["seeds"])
        steps = result["baselines"]["env_steps"][-1]
        return [(f"PPO env steps to reach the update (not reached: {bl['ppo_not_reached']}/{n})", bl["ppo_steps_to_reach"]),
                (f"PPO env steps to reach {SOLVED_RETURN:g} (not reached: {bl['ppo_not_solved']}/{n})",
                 bl["ppo_steps_to_solve"]),
                (f"PPO return after {steps:,} env steps", bl["ppo_final_return"])]

    def plot_one_step(self, result: dict, out: Path) -> Path:
        return _plot_before_after(result, out, "return", log=False, solved=SOLVED_RETURN)

    def plot_baselines(self, result: dict, out: Path) -> Path:
        bl = result["baselines"]
        return _plot_curves(
            out, bl["env_steps"], [("PPO (default hyperparameters)", bl["ppo"]["return"])],
            [(result["one_step"]["summary"]["after_return"]["median"], "--", "1 generative update (median)"),
             (SOLVED_RETURN, ":", f"solved ({SOLVED_RETURN:g})")],
            "environment steps", f"{result['generator']['task']} greedy return", log_x=False,
        )


def suite_for(task: Task) -> ClassifierSuite | CartPoleSuite:
    """The baselines and metrics ``eval`` uses for ``task``."""
    return CartPoleSuite() if isinstance(task, CartPoleMLP) else ClassifierSuite()


def _updates(r: int) -> str:
    return "init" if r == 0 else "1 update" if r == 1 else f"{r} updates"


# ---------------------------------------------------------------------- the sections


def _baselines(task, theta0: torch.Tensor, seeds: Sequence[int], data, config: EvalConfig, grid: list[int]) -> dict:
    """Adam and SGD test-loss curves of every init on ``grid``: name -> ``[N, G]`` (NaN if dropped)."""

    class GridPlan(RunPlan):  # the trainer saves at the plan's checkpoint steps and stops after total_steps
        def checkpoint_steps(self) -> torch.Tensor:
            return torch.tensor(grid)

        @property
        def total_steps(self) -> int:
            return grid[-1]

    n = theta0.shape[0]
    plans = [GridPlan(i, int(seeds[i]), dict(ADAM_BASELINE), len(data.train_x), len(grid)) for i in range(n)]
    plans += [GridPlan(n + i, int(seeds[i]), dict(SGD_BASELINE), len(data.train_x), len(grid)) for i in range(n)]
    trainer = BatchedMLPTrainer(task, data.train_x, data.train_y, config.device)
    params: dict[int, torch.Tensor] = {}
    bar = tqdm(total=2 * n, desc="Adam + SGD baselines", unit="run", disable=not config.progress)

    def done(runs) -> None:
        for r in runs:
            params[r.plan.run_id] = r.params  # [G, P] or None
        bar.update(len(runs))

    trainer.train(plans, done)
    bar.close()
    out = {}
    for name, offset in (("adam", 0), ("sgd", n)):
        curves = torch.full((n, len(grid)), math.nan)
        for i in range(n):
            p = params.get(offset + i)
            if p is not None:
                curves[i] = _metrics(task, p, data, config.device, ("test_loss",))["test_loss"]
        out[name] = curves
    return out


def _corpus_seeds(store: Store) -> set[int]:
    settings = store.settings or {}
    base = settings.get("seed")
    ids = store.run_ids() + store.dropped_ids()
    if base is not None:
        return {int(base) + r for r in ids}
    return {int(store.read_info(r)[0]) for r in store.run_ids()}


def _memorisation(task, store: Store, generated: torch.Tensor, achieved: torch.Tensor, config: EvalConfig,
                  metric: str = "test_loss") -> dict:
    """Nearest corpus checkpoints of the generated networks (with their ``metric``), and the corpus's
    own NN distances."""
    ids = store.run_ids()
    if len(ids) > config.memo_runs:  # evenly spaced run ids: deterministic
        ids = [ids[round(i * (len(ids) - 1) / (config.memo_runs - 1))] for i in range(config.memo_runs)] \
            if config.memo_runs > 1 else ids[:1]
    cand, cand_run, cand_step, cand_metric = [], [], [], []
    for r in tqdm(ids, desc="memorisation: reading corpus", unit="run", disable=not config.progress):
        steps, metrics = store.read_metrics(r)
        k = len(steps)
        rows = sorted({k - 1, *(round(j * (k - 1) / config.memo_checkpoints) for j in range(1, config.memo_checkpoints))})
        cand.append(store.read_checkpoints(r, rows))
        cand_run += [r] * len(rows)
        cand_step += steps[rows].tolist()
        cand_metric += metrics[metric][rows].tolist() if metric in metrics else [math.nan] * len(rows)
    cands = torch.cat(cand)  # [M, P]
    runs = torch.tensor(cand_run)
    dist, idx = nearest_aligned(task, generated, cands)
    # the corpus's own scale: nearest checkpoint of another run, for a sample of its checkpoints
    q = torch.linspace(0, len(cands) - 1, min(config.memo_queries, len(cands))).round().long().unique()
    exclude = runs[q][:, None] == runs[None, :]  # [Q, M]: same run
    corpus_dist, _ = nearest_aligned(task, cands[q], cands, exclude=exclude)
    unaligned = (generated[:, None, :] - cands[None, :, :]).norm(dim=-1).min(1).values  # [N]
    typical = summary(corpus_dist.tolist())["median"]
    nearest = [float(cand_metric[i]) for i in idx.tolist()]
    return {
        "runs_searched": len(ids),
        "checkpoints_searched": len(cands),
        "nearest_distance": dist.tolist(),
        "nearest_distance_unaligned": unaligned.tolist(),
        "nearest_run": [cand_run[i] for i in idx.tolist()],
        "nearest_step": [int(cand_step[i]) for i in idx.tolist()],
        f"nearest_{metric}": nearest,
        f"generated_{metric}": achieved.tolist(),
        "corpus_nn_distance": corpus_dist.tolist(),
        "summary": {
            "nearest_distance": summary(dist.tolist()),
            "corpus_nn_distance": summary(corpus_dist.tolist()),
            "ratio_to_corpus_nn_median": [d / typical if typical else None for d in dist.tolist()],
            f"nearest_{metric}": summary(nearest),
        },
        "method": "hidden units aligned by the exact assignment (Hungarian) minimising the squared L2 distance; "
                  "candidates screened with a greedy assignment, the 8 best per query solved exactly"
                  if len(task.hidden_sizes()) == 1 else
                  "hidden units aligned layer by layer by the exact assignment (Hungarian), then by weight matching "
                  "(each layer re-assigned with the others fixed) until nothing changes; candidates screened with a "
                  "greedy layer-by-layer assignment, the 8 best per query aligned as above",
    }


DENOISE_TIMESTEPS = (999, 700, 400, 200, 100, 30, 5)  # on a 1000-step schedule; rescaled to the generator's
DENOISE_NOISE_SEED = 0


def denoise_timesteps(num_steps: int) -> list[int]:
    """:data:`DENOISE_TIMESTEPS` scaled to a ``num_steps`` schedule (``round(t (num_steps - 1) / 999)``),
    deduplicated, from the noisiest down."""
    out: list[int] = []
    for t in DENOISE_TIMESTEPS:
        s = round(t * (num_steps - 1) / 999)
        if s not in out:
            out.append(s)
    return out


_SPLIT_WORDS = {"heldout": "held-out", "train": "training"}


def _denoising(gen: LoadedGenerator, store: Store | None, config: EvalConfig, split: str = "heldout") -> dict:
    """How well the generator predicts θ′ from a noised θ′ on held-out corpus runs, against returning θ.

    Pairs: the first checkpoint (θ, the init) and the last (θ′) of up to ``config.denoise_runs``
    runs that the generator's training split held out (``split="train"``: runs it trained on, to
    tell overfitting from underfitting), conditioned on both metrics as in training.
    In generator units, at each of :func:`denoise_timesteps`: ``x_t = q_sample(θ′, t, ε)`` (one
    fixed draw of ε, shared by every t) and the model's x0 prediction, called as
    :meth:`~learned_opt.diffusion.Diffusion.sample` calls it (model in eval mode, no gradients).
    """
    ids = ((gen.manifest.get("corpus") or {}).get("split") or {}).get(split) or []
    if config.denoise_runs == 0:
        return {"skipped": "--denoise-runs 0: denoising check not run"}
    if store is None:
        return {"skipped": "no --store given: denoising check not run"}
    if not ids:
        return {"skipped": f"the generator's manifest records no {_SPLIT_WORDS[split]} runs (corpus.split.{split}): "
                           "denoising check not run"}
    runs, theta, target, metric, prompt = [], [], [], [], []
    for r in (int(r) for r in ids):
        if len(runs) == config.denoise_runs:
            break
        if not store.has_run(r):
            continue
        _, metrics = store.read_metrics(r)
        values = metrics.get(gen.metric_name)
        if values is None or len(values) < 2:
            continue
        pair = store.read_checkpoints(r, [0, len(values) - 1])  # [2, P]
        runs.append(r)
        theta.append(pair[0])
        target.append(pair[1])
        metric.append(values[0])
        prompt.append(values[-1])
    if not runs:
        return {"skipped": f"none of the {len(ids)} {_SPLIT_WORDS[split]} runs of the generator's split is in --store "
                           f"(with {gen.metric_name!r} and two checkpoints): denoising check not run"}
    norm, model, diffusion = gen.normalization, gen.model, gen.diffusion
    dev, dtype = gen.device, next(model.parameters()).dtype
    theta_n = norm.params(torch.stack(theta).to(dtype))  # [N, P] generator units
    target_n = norm.params(torch.stack(target).to(dtype))  # [N, P]
    metric_n = norm.metric(torch.stack(metric).to(dtype))  # [N]
    prompt_n = norm.metric(torch.stack(prompt).to(dtype))  # [N]
    noise = torch.randn(theta_n.shape, generator=torch.Generator().manual_seed(DENOISE_NOISE_SEED), dtype=dtype)
    timesteps = denoise_timesteps(diffusion.num_steps)
    sq_err = torch.zeros(len(timesteps), dtype=torch.float64)  # summed over pairs and parameters
    cos = torch.zeros(len(timesteps), dtype=torch.float64)  # summed over pairs
    identity = ((theta_n.double() - target_n.double()) ** 2).sum()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(runs), config.sample_batch):
                sl = slice(s, s + config.sample_batch)
                th, x0 = theta_n[sl].to(dev), target_n[sl].to(dev)
                cond = dict(theta=th, metric=metric_n[sl].to(dev), target=prompt_n[sl].to(dev))
                if callable(getattr(model, "condition", None)):  # as Diffusion.sample conditions the model
                    denoise = model.condition(**cond)
                else:
                    denoise = functools.partial(model, **cond)
                for i, t in enumerate(timesteps):
                    t_batch = torch.full((th.shape[0],), t, dtype=torch.long, device=dev)
                    pred = denoise(diffusion.q_sample(x0, t_batch, noise[sl].to(dev)), t_batch).double()
                    sq_err[i] += float(((pred - x0.double()) ** 2).sum())
                    cos[i] += float(F.cosine_similarity(pred - th.double(), x0.double() - th.double(), dim=1).sum())
    finally:
        model.train(was_training)
    count = theta_n.numel()
    x0_mse = (sq_err / count).tolist()
    identity_mse = float(identity / count)
    return {
        "runs_used": len(runs),
        "split": split,
        "run_ids": runs,
        "timesteps": timesteps,
        "num_steps": diffusion.num_steps,
        "x0_mse": x0_mse,
        "identity_mse": [identity_mse] * len(timesteps),
        "ratio": [m / identity_mse if identity_mse > 0 else None for m in x0_mse],
        "cosine": (cos / len(runs)).tolist(),
        "noise_seed": DENOISE_NOISE_SEED,
        "corpus_store": (gen.manifest.get("corpus") or {}).get("store"),
        "what_it_means": "x0 MSE of the generator's prediction of θ′ (last checkpoint) from x_t = q_sample(θ′, t) "
                         f"given θ (first checkpoint) and both metrics, on {split} corpus runs, in generator units, "
                         "over the MSE of returning θ: below 1 the generator does better than returning θ; "
                         "cosine: of (prediction - θ) with (θ′ - θ), 1 is the right direction",
    }


def evaluate_generator(config: EvalConfig, data=None) -> dict:
    """Run every section; returns the results (also written to ``out/eval.json``)."""
    t_start = time.perf_counter()
    gen = load_generator(config.generator, device=config.device)
    task = tasks.get(gen.task)
    suite = suite_for(task)
    suite.check(task, config)
    if data is None:
        data = task.load_data(config.data_root)
    dev_data = data.to(config.device) if config.device != "cpu" and hasattr(data, "to") else data  # CartPole: no tensors
    store = Store.open(config.store) if config.store else None
    if store is not None and store.task_name != gen.task:
        raise ConfigError(f"--store holds {store.task_name!r} runs but the generator is for {gen.task!r}")
    seeds = [config.seed + i for i in range(config.inits)]
    if store is not None:
        overlap = sorted(set(seeds) & _corpus_seeds(store))
        if overlap:
            raise ConfigError(f"init seeds {overlap[:5]} were used for corpus runs; choose another --seed")
    name = gen.metric_name
    names = sorted({*suite.metrics, name})

    def measure(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return _metrics(task, flat, dev_data, config.device, names)

    score, scored = None, {"networks": 0, "env_steps": 0}
    if config.candidates > 1:
        val_data = task.validation_data(data, config.holdout)
        val_data = val_data.to(config.device) if config.device != "cpu" and hasattr(val_data, "to") else val_data

        def score_on_validation(flat: torch.Tensor) -> torch.Tensor:
            values = _metrics(task, flat, val_data, config.device, [name])[name]
            scored["networks"] += flat.shape[0]
            if isinstance(task, CartPoleMLP):  # a return is the steps an episode lasted: count the interaction
                scored["env_steps"] += int(round(float(values.sum()) * len(val_data.start_states)))
            return values

        score = score_on_validation

    sampler = Sampler(gen, config, seed=config.seed, score=score)
    times: dict[str, float] = {}
    bar = tqdm(total=7, desc="eval", unit="section", disable=not config.progress)

    # one step + repeated prompting (the first of the repeats is the one-step update)
    t = time.perf_counter()
    theta0 = init_params(task, seeds)  # [N, P]
    hist, generated = repeated_updates(sampler, theta0, measure, config.repeats, name)
    times["one_step_and_repeats_s"] = time.perf_counter() - t
    scored_in_repeats = dict(scored)  # what choosing among candidates cost over the inits' config.repeats updates
    before, after = {k: v[0] for k, v in hist.items()}, {k: v[1] for k, v in hist.items()}
    bar.update(1)

    # timing: one update of one network (measure its metric, then sample), and the baseline's s/step
    t = time.perf_counter()
    one, metric_runs = [], []
    for _ in range(3):
        s = time.perf_counter()
        m0 = measure(theta0[:1])[name]  # [1]: the conditioning input
        metric_runs.append(time.perf_counter() - s)
        s = time.perf_counter()
        sampler(theta0[:1], m0, torch.full((1,), gen.best_prompt), rng=torch.Generator().manual_seed(0))
        one.append(time.perf_counter() - s)
    sample_s, metric_s = statistics.median(one), statistics.median(metric_runs)
    update_s = sample_s + metric_s
    base_s, base_info = suite.seconds_per_step(task, theta0, seeds, data, config)
    times["timing_s"] = time.perf_counter() - t
    bar.update(1)

    # baselines
    t = time.perf_counter()
    baselines, reach = suite.run(task, theta0, seeds, data, config, after)
    times["baselines_s"] = time.perf_counter() - t
    bar.update(1)

    # prompt alignment: K prompts per network between the best prompt and its starting metric
    t = time.perf_counter()
    k, n = config.prompts, len(seeds)
    frac = torch.linspace(0, 1, k)  # [K]
    prompts = sampler.clamp(gen.best_prompt + frac[None, :] * (before[name][:, None] - gen.best_prompt))  # [N, K]
    theta_k = theta0.repeat_interleave(k, 0)  # [N*K, P]
    out_k = sampler(theta_k, before[name].repeat_interleave(k), prompts.reshape(-1), candidates=1)
    achieved_k = measure(out_k)[name].view(n, k)  # [N, K]
    r2 = r2_score(prompts, achieved_k)  # [N]
    times["prompt_alignment_s"] = time.perf_counter() - t
    bar.update(1)

    # memorisation
    t = time.perf_counter()
    if store is not None and len(store.run_ids()) > 1:
        memo = _memorisation(task, store, generated, after[suite.memo_metric], config, suite.memo_metric)
    else:
        memo = {"skipped": "no --store given (or it holds fewer than 2 runs): memorisation check not run"}
    times["memorisation_s"] = time.perf_counter() - t
    bar.update(1)

    # denoising: x0 predictions on held-out corpus pairs against returning θ
    t = time.perf_counter()
    denoising = _denoising(gen, store, config)
    if "ratio" in denoising:  # the same on runs it trained on: close to the held-out figures = not overfitting
        denoising["train_runs"] = _denoising(gen, store, config, split="train")
    times["denoising_s"] = time.perf_counter() - t
    bar.update(1)

    # out-of-distribution inits
    t = time.perf_counter()
    ood = {}
    for kind in ("kaiming-normal", "uniform-x3"):
        h, _ = repeated_updates(sampler, init_params(task, seeds, kind), measure, config.repeats, name)
        ood[kind] = _repeat_section(h)
    times["ood_s"] = time.perf_counter() - t
    bar.update(1)
    bar.close()
    times["total_s"] = time.perf_counter() - t_start

    result = {
        "config": asdict(config),
        "seeds": seeds,
        "generator": {"name": gen.name, "task": gen.task, "sha256": gen.sha256, "metric": name, "best_prompt": gen.best_prompt,
                      "prompt_used": float(sampler.clamp(torch.tensor(gen.best_prompt))),
                      "metric_range": list(gen.metric_range), "model_config": gen.manifest.get("model_config")},
        "sampler": {**sampler.settings, **({"candidates_scored": {"one_step_and_repeats": scored_in_repeats,
                                                                   "all_sections": scored}}
                                           if config.candidates > 1 else {})},
        "hardware": _hardware(config.device),
        "one_step": {
            "before": {k: v.tolist() for k, v in before.items()},
            "after": {k: v.tolist() for k, v in after.items()},
            "summary": {f"{w}_{k}": summary(v.tolist()) for w, d in (("before", before), ("after", after)) for k, v in d.items()},
            **suite.one_step_extra(hist),
        },
        "baselines": baselines,
        "timing": {
            "update_seconds": update_s, "sample_seconds": sample_s, "metric_seconds": metric_s,
            "sample_seconds_runs": one, **_speedups(suite.baseline, suite.unit, reach, base_s, update_s), **base_info,
            "torch_threads": torch.get_num_threads(),
        },
        "prompt_alignment": {
            "prompts": prompts.tolist(), "achieved": achieved_k.tolist(), "r2": r2.tolist(),
            "r2_mean": float(r2.mean()), "r2_summary": summary(r2.tolist()),
        },
        "repeated": _repeat_section(hist),
        "memorisation": memo,
        "denoising": denoising,
        "ood": ood,
        "wall_times": times,
        "learned_opt": __version__,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if config.plots:
        result["plots"] = [str(p) for p in plot_eval(result, out)]
    return result


def _speedups(baseline: str, unit: str, reach: list[int | None], per_step: float, update_s: float) -> dict:
    """The baseline's seconds per step, those of the steps each update replaces, and their ratio to
    the update's (per init, and the median over the inits the baseline reached)."""
    needed = [s for s in reach if s is not None]
    return {
        f"{baseline}_seconds_per_{unit}": per_step,
        f"{baseline}_seconds_for_{unit}s_to_reach": [None if s is None else s * per_step for s in reach],
        f"speedup_vs_{baseline}": [None if s is None else s * per_step / update_s for s in reach],
        f"median_speedup_vs_{baseline}": (statistics.median(needed) * per_step / update_s) if needed else None,
    }


def _repeat_section(hist: dict[str, torch.Tensor]) -> dict:
    """Per-update metrics ``[n+1, N]`` as lists, and median/quartiles after 1, 2, 5, 10 updates."""
    n = next(iter(hist.values())).shape[0] - 1
    return {
        "updates": list(range(n + 1)),
        **{k: v.tolist() for k, v in hist.items()},
        "summary": {f"{k}_after_{r}": summary(v[r].tolist()) for k, v in hist.items()
                    for r in (0, *REPEATS_REPORTED) if r <= n},
    }


def _hardware(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---------------------------------------------------------------------- report


def _suite_of(result: dict) -> ClassifierSuite | CartPoleSuite:
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
    paths.append(_save(fig, out / "prompt_alignment.png"))
    paths.append(suite.plot_baselines(result, out))
    if "ratio" in result.get("denoising", {}):
        paths.append(_plot_denoising(result["denoising"], out))
    return paths


def _plot_denoising(den: dict, out: Path) -> Path:
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
    return _save(fig, out / "denoising.png")


def _plot_before_after(result: dict, out: Path, metric: str, log: bool, solved: float | None = None) -> Path:
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
    return _save(fig, out / "one_step.png")


def _plot_curves(out: Path, x: list, curves: list[tuple[str, list]], lines: list[tuple[float, str, str]],
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
    return _save(fig, out / "baselines.png")


def _save(fig, path: Path) -> Path:
    """Lay out, write and close one figure; return its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        lines.append(f"sampler: {sm['method']}, {sm['steps']} steps, t_min {sm['t_min']}"
                     + (f", best of {sm['candidates']} candidates on validation data" if sm["candidates"] > 1 else ""))
    choosing = " and choosing among the candidates" if result.get("sampler", {}).get("candidates", 1) > 1 else ""
    lines.append(f"one update: {tm['update_seconds']:.3f} s (sampling{choosing} {tm['sample_seconds']:.3f} s + measuring the "
                 f"metric {tm['metric_seconds']:.3f} s); {suite.baseline_label}: "
                 f"{tm[f'{b}_seconds_per_{suite.unit}'] * 1e3:.3f} ms/{unit}; median speed-up vs the "
                 f"{suite.baseline_label} {unit}s it replaces: {_fmt(tm[f'median_speedup_vs_{b}'], '.2f')}x")
    if "skipped" in memo:
        lines.append(f"memorisation: {memo['skipped']}")
    lines += _denoising_lines(result.get("denoising", {}))
    return "\n".join(lines)


def _denoising_lines(den: dict) -> list[str]:
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


# ---------------------------------------------------------------------- command line


def add_sampler_arguments(parser: argparse.ArgumentParser, chosen_how: str) -> None:
    """``--sampling-steps``, ``--method``, ``--t-min`` (each defaulting to the generator's own sampler)
    and ``--candidates`` (samples per update; ``chosen_how`` says which one is kept)."""
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's own, else 50)")
    parser.add_argument("--method", default=None,
                        help="sampler: ddim, ddpm or dpm++2m (default: the generator's own, else ddim)")
    parser.add_argument("--t-min", type=int, default=None,
                        help="stop sampling at this timestep and return its x0 prediction (default: the generator's own, else 0)")
    parser.add_argument("--candidates", type=int, default=1, help=f"samples per update, {chosen_how} (default: 1)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", required=True, help="shipped generator name or path to a .json manifest")
    parser.add_argument("--store", default=None,
                        help="corpus store for the memorisation and denoising checks (both skipped without)")
    parser.add_argument("--out", required=True, help="folder for eval.json and the PNG plots")
    parser.add_argument("--data-root", default=None,
                        help="dataset root (default: $LEARNED_OPT_DATA; cartpole-mlp needs none and ignores it)")
    parser.add_argument("--inits", type=int, default=20, help="fresh initialisations (default: 20)")
    parser.add_argument("--seed", type=int, default=1_000_000, help="init i has seed SEED + i (default: 1000000)")
    add_sampler_arguments(parser, "the best by the generator's metric on validation data kept")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="MNIST training examples held out as validation data for --candidates (default: 5000)")
    parser.add_argument("--max-steps", type=int, default=3000,
                        help="Adam/SGD steps, for mnist-mlp generators (default 3000; 11700 in full)")
    parser.add_argument("--max-env-steps", type=int, default=100_000,
                        help="PPO environment steps per init, for cartpole-mlp generators only (default: 100000)")
    parser.add_argument("--prompts", type=int, default=20, help="prompts per network for alignment (default: 20)")
    parser.add_argument("--repeats", type=int, default=10, help="successive updates (default: 10)")
    parser.add_argument("--memo-runs", type=int, default=500, help="corpus runs searched (default: 500)")
    parser.add_argument("--memo-checkpoints", type=int, default=4, help="checkpoints per searched run (default: 4)")
    parser.add_argument("--denoise-runs", type=int, default=64,
                        help="held-out corpus runs (the generator's split) of the denoising check; "
                             "0: skip (default: 64)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def main(args: argparse.Namespace) -> int:
    config = EvalConfig(
        generator=args.generator, out=args.out, store=args.store, data_root=args.data_root, inits=args.inits,
        seed=args.seed, sampling_steps=args.sampling_steps, method=args.method, t_min=args.t_min,
        candidates=args.candidates, holdout=args.holdout, max_steps=args.max_steps,
        max_env_steps=args.max_env_steps, prompts=args.prompts, repeats=args.repeats, memo_runs=args.memo_runs,
        memo_checkpoints=args.memo_checkpoints, denoise_runs=args.denoise_runs, device=args.device,
        progress=not args.no_progress, plots=not args.no_plots,
    )
    result = evaluate_generator(config)
    print(format_summary(result))
    print(f"wrote {Path(config.out) / 'eval.json'}" + "".join(f", {p}" for p in result.get("plots", [])))
    return 0
