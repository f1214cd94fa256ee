"""Train many networks at once with randomized hyperparameters and store their checkpoints.

Each run ``r`` has the seed ``base_seed + r`` (stored with the run), from which everything about it
follows, so any run can be reproduced exactly: its hyperparameters (``random.Random(seed)``), its
initialisation (``torch.manual_seed(seed); task.build_model()``: PyTorch's default init), the order
in which it sees the training data (a fresh permutation every epoch, as a shuffling ``DataLoader``
would) and which iterations it saves.

Hyperparameter ranges (:class:`HParamRanges`, one draw per run; ``--gpt-recipe`` fixes G.pt's):

==================  ===========================================  ==================================
hyperparameter      default range                                G.pt's recipe (``--gpt-recipe``)
==================  ===========================================  ==================================
optimizer           SGD with Nesterov momentum, or Adam (1:1)    SGD Nesterov
learning rate       SGD log-uniform [0.01, 0.3];                 0.1
                    Adam log-uniform [3e-4, 1e-2]
momentum            uniform [0.8, 0.95] (Adam: beta1;            0.9
                    beta2 = 0.999, eps = 1e-8)
weight decay        0 with probability 0.1, else                 5e-4
                    log-uniform [1e-5, 1e-3] (L2, as torch.optim)
batch size          one of 64, 128, 256                          128
epochs              one of 5, 10, 15, 20, 25 (``--epochs``       25
                    overrides it for every run)
schedule            cosine, stepped per epoch (G.pt's)           cosine per epoch
==================  ===========================================  ==================================

Each run saves ``K = 200`` checkpoints: the initialisation (step 0), 198 distinct random
iterations, and the final step; a run with fewer than 200 steps saves every step. Step ``t`` means
"after ``t`` updates". Every checkpoint is evaluated with the task's batched ``evaluate`` (for
``mnist-mlp``: ``train_loss``, ``test_loss``, ``test_error``). A run whose weights become
non-finite or exceed ``|w| > 10`` (G.pt's filter) is dropped, recorded in the store so a resumed job
skips it, and counted.

How runs are trained together: runs are grouped by batch size (so that their steps align) and
trained ``--batch-runs`` at a time by a hand-written batched forward/backward of the MLP (batched
matmuls; on CPU it measured about 1.8x faster than ``vmap(grad(functional_call))``), each run with
its own learning rate, momentum, weight decay, optimizer and data order. A run that finishes
(fewer epochs) or diverges leaves the batch; the others continue.

``--train-examples N`` trains on the first ``N`` training images only (quick corpora and tests);
evaluation always uses the task's own sets. The store records these settings (seed, epochs,
recipe, training examples, checkpoints, hyperparameter ranges) when it is created; a later call
into the same store must use the same ones (only ``--runs`` may differ, to grow the corpus).
Under ``torchrun --nproc_per_node W``, rank ``r`` trains the run ids with ``run_id % W == r`` into
one shared store; rank 0 creates it.

Task families. Everything above except the training itself (run ids and seeds, resume, settings
check, sharding, evaluation of the checkpoints, the ``|w| > 10`` filter's markers, writing, the
progress bar) is shared by every task; what is particular to a family of tasks is a
:class:`TaskFamily`: its settings, its run plans, how plans are grouped, and a function that trains
one group and hands back :class:`FinishedRun` objects. :class:`MLPClassifierFamily` is the ReLU MLP
classifiers above (``mnist-mlp``); :class:`pretrain.ppo.PPOFamily` trains ``cartpole-mlp``
policies with batched PPO (``--env-steps N`` instead of ``--epochs``; its ranges are documented in
:mod:`pretrain.ppo`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from learned_opt import __version__, tasks
from learned_opt.errors import LearnedOptError, StoreError
from learned_opt.tasks import MLP, Task

from .store import RunRecord, Store

SGD, ADAM = "sgd-nesterov", "adam"
OPTIMIZERS = (SGD, ADAM)
WEIGHT_LIMIT = 10.0  # G.pt deletes runs with any |w| above this


# ---------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class HParamRanges:
    """Where each run's hyperparameters are drawn from (see the module's table)."""

    optimizers: tuple[str, ...] = OPTIMIZERS  # drawn uniformly
    sgd_lr: tuple[float, float] = (0.01, 0.3)  # log-uniform; contains G.pt's 0.1
    adam_lr: tuple[float, float] = (3e-4, 1e-2)  # log-uniform
    momentum: tuple[float, float] = (0.8, 0.95)  # uniform; SGD momentum or Adam beta1
    weight_decay: tuple[float, float] = (1e-5, 1e-3)  # log-uniform; contains G.pt's 5e-4
    p_no_weight_decay: float = 0.1  # probability of weight decay 0
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    epochs: tuple[int, ...] = (5, 10, 15, 20, 25)
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        unknown = set(self.optimizers) - set(OPTIMIZERS)
        if unknown or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of {OPTIMIZERS}, got {self.optimizers}")
        for name in ("sgd_lr", "adam_lr", "weight_decay"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if not 0 <= self.momentum[0] <= self.momentum[1] < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or not self.epochs or min(self.epochs) < 1:
            raise ValueError("batch_sizes and epochs need at least one positive value each")


GPT_RECIPE = {"optimizer": SGD, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128, "epochs": 25}


def sample_hparams(
    seed: int, ranges: HParamRanges = HParamRanges(), *, gpt_recipe: bool = False, epochs: int | None = None
) -> dict:
    """The hyperparameters of the run with this seed (same seed, same result)."""
    rng = random.Random(seed)
    # every value is drawn in a fixed order, so one setting never shifts the others
    optimizer = rng.choice(ranges.optimizers)
    u_lr, momentum = rng.random(), rng.uniform(*ranges.momentum)
    no_wd, u_wd = rng.random() < ranges.p_no_weight_decay, rng.random()
    batch_size, n_epochs = rng.choice(ranges.batch_sizes), rng.choice(ranges.epochs)
    lo, hi = ranges.sgd_lr if optimizer == SGD else ranges.adam_lr
    hp = {
        "optimizer": optimizer,
        "lr": _log_uniform(lo, hi, u_lr),
        "momentum": momentum,
        "weight_decay": 0.0 if no_wd else _log_uniform(*ranges.weight_decay, u_wd),
        "batch_size": int(batch_size),
        "epochs": int(n_epochs),
    }
    if gpt_recipe:
        hp.update(GPT_RECIPE)
    if epochs is not None:
        hp["epochs"] = int(epochs)
    hp.update(schedule="cosine-per-epoch", adam_beta2=ranges.adam_beta2, adam_eps=ranges.adam_eps)
    return hp


def _log_uniform(lo: float, hi: float, u: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """G.pt's schedule: cosine annealing to 0 over ``epochs``, stepped once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def checkpoint_steps(total_steps: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted steps to save: 0, ``k - 2`` distinct random steps in ``[1, total)``, and ``total``.

    With ``total_steps + 1 <= k`` every step ``0..total`` is saved.
    """
    if total_steps + 1 <= k:
        return torch.arange(total_steps + 1)
    middle = torch.randperm(total_steps - 1, generator=generator)[: k - 2] + 1
    return torch.cat([torch.tensor([0]), middle.sort().values, torch.tensor([total_steps])])


# ---------------------------------------------------------------------- one run's plan


def stream_seed(seed: int, stream: int) -> int:
    """The seed of an independent RNG stream of a run (1: checkpoint steps, 2: data order, ...)."""
    return (seed * 1_000_003 + stream * 7_919 + 17) % (2**63)


def _stream(seed: int, stream: int) -> torch.Generator:
    """An independent torch RNG stream of a run (1: checkpoint steps, 2: data order)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def seeded_init(task: Task, seed: int) -> torch.Tensor:
    """A run's initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``,
    without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.layout().flatten_module(task.build_model())


@dataclass
class RunPlan:
    """Everything that defines one run before it is trained."""

    run_id: int
    seed: int
    hparams: dict
    num_examples: int  # training examples per epoch
    num_checkpoints: int = 200

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.hparams["batch_size"])  # last batch may be partial

    @property
    def total_steps(self) -> int:
        return self.hparams["epochs"] * self.steps_per_epoch

    def checkpoint_steps(self) -> torch.Tensor:
        return checkpoint_steps(self.total_steps, self.num_checkpoints, _stream(self.seed, 1))

    def data_order(self) -> torch.Generator:
        """The generator whose successive ``randperm(num_examples)`` calls give each epoch's order."""
        return _stream(self.seed, 2)

    def init(self, task: Task) -> torch.Tensor:
        """The initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``."""
        return seeded_init(task, self.seed)


def plan_runs(
    run_ids: Sequence[int], *, base_seed: int, num_examples: int, ranges: HParamRanges = HParamRanges(),
    gpt_recipe: bool = False, epochs: int | None = None, num_checkpoints: int = 200,
) -> list[RunPlan]:
    return [
        RunPlan(r, base_seed + r, sample_hparams(base_seed + r, ranges, gpt_recipe=gpt_recipe, epochs=epochs),
                num_examples, num_checkpoints)
        for r in run_ids
    ]


# ---------------------------------------------------------------------- batched training


@dataclass
class FinishedRun:
    """A trained run: its checkpoints, or why it was dropped."""

    plan: Any  # a RunPlan, or another family's plan (run_id, seed, hparams)
    steps: torch.Tensor  # [K] int64
    params: torch.Tensor | None  # [K, P] float32 on CPU; None when dropped
    dropped: str | None = None  # reason
    dropped_at: int | None = None  # step at which the run was found bad
    info: dict = field(default_factory=dict)  # JSON-able extras for the run's record info


def mlp_sizes(task: Task) -> tuple[int, ...]:
    """Layer widths of a task whose model is a ReLU :class:`MLP`; otherwise an error saying so."""
    with torch.device("meta"):  # no weights: leaves the global RNG alone
        model = task.build_model()
    if not isinstance(model, MLP) or not isinstance(model.act, nn.ReLU):
        raise LearnedOptError(
            f"the corpus builder trains ReLU MLP classifiers; task {task.name!r} is not one "
            f"(choose one of: {', '.join(n for n in tasks.names() if _is_mlp(n))})"
        )
    return model.sizes


def _is_relu_mlp(task: Task) -> bool:
    with torch.device("meta"):
        model = task.build_model()
    return isinstance(model, MLP) and isinstance(model.act, nn.ReLU)


def _is_mlp(name: str) -> bool:
    try:
        with torch.device("meta"):
            m = tasks.get(name).build_model()
    except Exception:  # noqa: BLE001 - only used to list alternatives in a message
        return False
    return isinstance(m, MLP) and isinstance(m.act, nn.ReLU)


def _bad_rows(params: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: rows with a non-finite value or any ``|w| > 10``."""
    return ~torch.isfinite(params).all(-1) | (params.abs().amax(-1) > WEIGHT_LIMIT)


class BatchedMLPTrainer:
    """Trains R MLP classifiers of one batch size together, one batched step at a time.

    Parameters of all runs live in one flat ``[R, P]`` tensor (the layout's order); gradients are
    computed by a hand-written batched forward/backward (cross-entropy on softmax logits) and the
    optimizers (PyTorch's SGD-Nesterov and Adam, L2 weight decay) update rows with per-run
    hyperparameters held as ``[R, 1]`` tensors.
    """

    def __init__(self, task: Task, train_x: torch.Tensor, train_y: torch.Tensor, device: torch.device | str = "cpu"):
        self.task, self.layout = task, task.layout()
        self.sizes = mlp_sizes(task)
        self.device = torch.device(device)
        self.train_x = train_x.reshape(train_x.shape[0], -1).to(self.device, torch.float32).contiguous()  # [N, in]
        self.train_y = train_y.to(self.device, torch.long)  # [N]
        if self.train_x.shape[1] != self.sizes[0]:
            raise LearnedOptError(f"training inputs have {self.train_x.shape[1]} features, the MLP takes {self.sizes[0]}")

    def train(self, plans: Sequence[RunPlan], on_finish: Callable[[list[FinishedRun]], None],
              on_progress: Callable[[float], None] = lambda runs: None) -> None:
        """Train ``plans`` (all with one batch size) together; ``on_finish`` gets runs as they end.

        ``on_progress(delta)`` receives the fraction of a run completed since the last call.
        """
        if not plans:
            return
        batch = plans[0].hparams["batch_size"]
        n = plans[0].num_examples
        if any(p.hparams["batch_size"] != batch or p.num_examples != n for p in plans):
            raise ValueError("runs trained together must share batch size and number of examples")
        # SGD rows first, then Adam rows: each optimizer then updates a contiguous slice
        plans = sorted(plans, key=lambda p: (p.hparams["optimizer"] != SGD, p.run_id))
        dev, spe = self.device, plans[0].steps_per_epoch
        R, P = len(plans), self.layout.num_params

        def col(key: str) -> torch.Tensor:
            return torch.tensor([[float(p.hparams[key])] for p in plans], device=dev)  # [R, 1]

        params = torch.stack([p.init(self.task) for p in plans]).to(dev)  # [R, P]
        lr0, mom, wd = col("lr"), col("momentum"), col("weight_decay")
        epochs = col("epochs")
        beta2 = col("adam_beta2") if "adam_beta2" in plans[0].hparams else torch.full((R, 1), 0.999, device=dev)
        eps = col("adam_eps") if "adam_eps" in plans[0].hparams else torch.full((R, 1), 1e-8, device=dev)
        n_sgd = sum(p.hparams["optimizer"] == SGD for p in plans)
        buf = torch.zeros(R, P, device=dev)  # SGD momentum buffer, or Adam's first moment
        sq = torch.zeros(R - n_sgd, P, device=dev)  # Adam's second moment (Adam rows only)
        grad = torch.empty(R, P, device=dev)
        orders = [p.data_order() for p in plans]
        active = list(plans)
        ck_steps = [p.checkpoint_steps() for p in plans]
        saved = {p.run_id: torch.empty(len(s), P) for p, s in zip(plans, ck_steps)}  # [K, P] on CPU
        save_at: dict[int, list[tuple[RunPlan, int]]] = {}
        for p, s in zip(plans, ck_steps):
            for slot, step in enumerate(s.tolist()):
                save_at.setdefault(step, []).append((p, slot))
        steps_of = {p.run_id: s for p, s in zip(plans, ck_steps)}

        row = {p.run_id: i for i, p in enumerate(active)}  # run id -> row of params, while active

        def save(t: int) -> None:
            for p, slot in save_at.get(t, ()):
                if p.run_id in row:
                    saved[p.run_id][slot] = params[row[p.run_id]].to("cpu")

        save(0)
        t = 0
        while active:
            epoch = t // spe
            perm = torch.stack([torch.randperm(n, generator=g) for g in orders]).to(dev)  # [R, N]
            lr = lr0 * 0.5 * (1.0 + torch.cos(math.pi * epoch / epochs))  # [R, 1] cosine per epoch
            for s in range(spe):
                idx = perm[:, s * batch : (s + 1) * batch]  # [R, b]
                self._gradient(params, idx, grad)
                t += 1
                grad.add_(params * wd)  # L2 weight decay, as torch.optim
                if n_sgd:
                    self._sgd_nesterov(params[:n_sgd], grad[:n_sgd], buf[:n_sgd], lr[:n_sgd], mom[:n_sgd])
                if n_sgd < len(active):
                    a = slice(n_sgd, None)
                    self._adam(params[a], grad[a], buf[a], sq, lr[a], mom[a], beta2[a], eps[a], t)
                save(t)
            on_progress(float((1.0 / epochs).sum()))
            # end of an epoch: drop diverged runs, hand over finished ones
            bad = _bad_rows(params).tolist()
            done = [p.total_steps <= t for p in active]
            leaving = [i for i in range(len(active)) if bad[i] or done[i]]
            if not leaving:
                continue
            finished = []
            for i in leaving:
                p = active[i]
                if bad[i]:
                    finished.append(FinishedRun(p, steps_of[p.run_id], None, "non-finite or |w| > 10", t))
                    on_progress(1.0 - epoch_frac(p, t))
                else:
                    ck = saved[p.run_id]
                    reason = "non-finite or |w| > 10" if bool(_bad_rows(ck).any()) else None
                    finished.append(FinishedRun(p, steps_of[p.run_id], None if reason else ck, reason, t if reason else None))
                del saved[p.run_id]
            keep = [i for i in range(len(active)) if i not in set(leaving)]
            n_sgd_keep = sum(1 for i in keep if i < n_sgd)
            keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
            adam_keep = torch.tensor([i - n_sgd for i in keep if i >= n_sgd], dtype=torch.long, device=dev)
            params, buf, grad = params[keep_t], buf[keep_t], grad[keep_t]
            lr0, mom, wd, epochs, beta2, eps = (x[keep_t] for x in (lr0, mom, wd, epochs, beta2, eps))
            sq = sq[adam_keep]
            orders = [orders[i] for i in keep]
            active = [active[i] for i in keep]
            row = {p.run_id: i for i, p in enumerate(active)}
            n_sgd = n_sgd_keep
            on_finish(finished)

    def _gradient(self, params: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        """Mean cross-entropy gradient of every run on its own minibatch, written into ``out`` [R, P].

        Activations are kept feature-major (``[R, features, b]``): ``W @ x^T`` measured faster on
        CPU than ``x @ W^T`` for these narrow layers.
        """
        R, b = idx.shape
        x = self.train_x.index_select(0, idx.reshape(-1)).view(R, b, -1)  # [R, b, in]
        y = self.train_y[idx].unsqueeze(1)  # [R, 1, b]
        w = self.layout.unflatten(params)
        g = self.layout.unflatten(out)
        n_layers = len(self.sizes) - 1
        acts, pre = [x.transpose(1, 2)], []  # [R, in, b]
        for l in range(1, n_layers + 1):
            W, bias = w[f"fc{l}.weight"], w[f"fc{l}.bias"]  # [R, out, in], [R, out]
            h = torch.baddbmm(bias.unsqueeze(2), W, acts[-1])  # [R, out, b]
            pre.append(h)
            if l < n_layers:
                acts.append(h.clamp_min(0))
        dh = torch.softmax(pre[-1], dim=1)  # [R, C, b]: d(mean CE)/d(logits) = (softmax - onehot) / b
        dh.scatter_add_(1, y, torch.full((R, 1, b), -1.0, device=dh.device))
        dh.div_(b)
        for l in range(n_layers, 0, -1):
            a_prev = x if l == 1 else acts[l - 1].transpose(1, 2)  # [R, b, in]
            g[f"fc{l}.weight"].copy_(torch.bmm(dh, a_prev))  # [R, out, in]
            g[f"fc{l}.bias"].copy_(dh.sum(2))
            if l > 1:
                dh = torch.bmm(w[f"fc{l}.weight"].transpose(1, 2), dh).mul_(pre[l - 2] > 0)  # [R, in, b]

    @staticmethod
    def _sgd_nesterov(p, g, buf, lr, mom) -> None:
        # torch.optim.SGD(nesterov=True, dampening=0): buf = m*buf + g; p -= lr * (g + m*buf)
        buf.mul_(mom).add_(g)
        p.sub_(lr * (g + mom * buf))

    @staticmethod
    def _adam(p, g, m, v, lr, beta1, beta2, eps, t: int) -> None:
        # torch.optim.Adam (L2 weight decay already in g)
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        p.sub_((lr / bc1) * m / ((v / bc2).sqrt() + eps))


def epoch_frac(plan: RunPlan, t: int) -> float:
    """Fraction of a run's epochs done after ``t`` steps."""
    return min(1.0, t / plan.total_steps)


# ---------------------------------------------------------------------- the reference loop


def train_run_reference(task: Task, plan: RunPlan, train_x: torch.Tensor, train_y: torch.Tensor) -> torch.Tensor:
    """One run the plain way (G.pt's): ``nn.Module`` + ``torch.optim`` + a per-epoch scheduler.

    Same init, data order, hyperparameters and saved steps as the batched trainer; returns the
    checkpoints ``[K, P]``. The test oracle for :class:`BatchedMLPTrainer` and the benchmark's
    baseline.
    """
    hp, layout = plan.hparams, task.layout()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        model = task.build_model()
    if hp["optimizer"] == SGD:
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], nesterov=True,
                              weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=(hp["momentum"], hp.get("adam_beta2", 0.999)),
                               eps=hp.get("adam_eps", 1e-8), weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: cosine_lr(1.0, e, hp["epochs"]))
    steps = plan.checkpoint_steps()
    wanted = {s: i for i, s in enumerate(steps.tolist())}
    out = torch.empty(len(steps), layout.num_params)
    out[0] = layout.flatten_module(model)
    order, batch, t = plan.data_order(), hp["batch_size"], 0
    for _ in range(hp["epochs"]):
        perm = torch.randperm(plan.num_examples, generator=order)
        for idx in perm.split(batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            t += 1
            if t in wanted:
                out[wanted[t]] = layout.flatten_module(model)
        sched.step()
    return out


# ---------------------------------------------------------------------- building a store


@dataclass
class CorpusConfig:
    """What ``learned-opt corpus`` builds (one field per command-line option)."""

    task: str | Task = "mnist-mlp"  # a registered name (or a Task)
    runs: int = 8  # run ids 0 .. runs-1
    out: str = "corpus"
    data_root: str | None = None  # else $LEARNED_OPT_DATA
    download: bool = False
    batch_runs: int = 16  # runs trained together
    seed: int = 0  # run r has seed seed + r
    epochs: int | None = None  # overrides every run's epochs (quick corpora)
    gpt_recipe: bool = False  # G.pt's fixed recipe instead of drawn hyperparameters
    device: str = "cpu"
    train_examples: int | None = None  # train on the first N training examples only
    checkpoints: int = 200  # K per run
    ranges: HParamRanges = field(default_factory=HParamRanges)
    progress: bool = True
    env_steps: int | None = None  # cartpole-mlp: overrides every run's environment steps
    ppo_ranges: Any = None  # cartpole-mlp: a pretrain.ppo.PPORanges (None: the defaults)
    ppo_shape: Any = None  # cartpole-mlp: a pretrain.ppo.PPOShape (None: the corpus default)


@dataclass
class CorpusSummary:
    """What one call (one rank) did."""

    written: int = 0
    dropped: int = 0
    skipped: int = 0  # finished or dropped before this call (resume)
    checkpoints: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dropped_ids: list[int] = field(default_factory=list)

    @property
    def checkpoints_per_s(self) -> float:
        return self.checkpoints / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_checkpoint(self) -> float:
        return self.bytes / self.checkpoints if self.checkpoints else 0.0

    @property
    def runs_per_minute(self) -> float:
        return 60.0 * (self.written + self.dropped) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.written} runs written, {self.dropped} dropped (non-finite or |w| > 10), "
            f"{self.skipped} already done; {self.checkpoints_per_s:.1f} checkpoints/s, "
            f"{self.bytes_per_checkpoint:,.0f} bytes/checkpoint, {self.seconds:.1f} s"
        )


def corpus_settings(config: CorpusConfig) -> dict:
    """What makes a store's runs what they are, recorded in ``store.json`` (``runs`` may grow)."""
    return family_for(tasks.get(config.task)).settings(config)


def _mlp_settings(config: CorpusConfig) -> dict:
    return {
        "seed": config.seed,
        "epochs": config.epochs,
        "gpt_recipe": config.gpt_recipe,
        "train_examples": config.train_examples,
        "checkpoints": config.checkpoints,
        "ranges": json.loads(json.dumps(asdict(config.ranges))),
    }


_SETTING_NAMES = {"seed": "--seed", "epochs": "--epochs", "gpt_recipe": "--gpt-recipe",
                  "train_examples": "--train-examples", "checkpoints": "--checkpoints", "env_steps": "--env-steps"}


def check_settings(store: Store, settings: dict) -> None:
    """:class:`StoreError` if ``store`` was built with other settings (a store without recorded
    settings, e.g. one made by hand, is accepted)."""
    recorded = store.settings
    if recorded is None:
        return
    for key in sorted(set(recorded) | set(settings)):
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        if key == "ranges" and isinstance(old, dict) and isinstance(new, dict):
            name = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            what = f"hyperparameter range {name} = {old.get(name)}, not {new.get(name)}"
        else:
            what = f"{_SETTING_NAMES.get(key, key)} {'unset' if old is None else old}, not {'unset' if new is None else new}"
        raise StoreError(
            f"{store.root} was built with {what}: use the store's settings to add runs to it, "
            "or choose a new --out folder"
        )


def _training_tensors(data: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not (hasattr(data, "train_x") and hasattr(data, "train_y")):
        raise LearnedOptError("the corpus builder needs a task whose data has train_x and train_y tensors")
    x, y = data.train_x, data.train_y
    if limit is not None:
        if limit < 1:
            raise LearnedOptError(f"--train-examples must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    return x, y


# ---------------------------------------------------------------------- task families


class TaskFamily:
    """What the corpus builder needs to know about one family of tasks (see the module docstring).

    ``train(group, on_finish, on_progress)`` (from :meth:`trainer`) trains one group of plans
    together and calls ``on_finish`` with lists of :class:`FinishedRun` (in any order, as runs end)
    and ``on_progress`` with fractions of a run completed.
    """

    name = "?"

    def accepts(self, task: Task) -> bool:
        raise NotImplementedError

    def check(self, config: CorpusConfig) -> None:
        """:class:`LearnedOptError` for options that do not apply or are out of range."""

    def settings(self, config: CorpusConfig) -> dict:
        raise NotImplementedError

    def plan(self, run_ids: Sequence[int], config: CorpusConfig, data: Any) -> list:
        raise NotImplementedError

    def groups(self, plans: list, batch_runs: int) -> list[list]:
        raise NotImplementedError

    def trainer(self, task: Task, config: CorpusConfig, data: Any, device: torch.device) -> Callable:
        raise NotImplementedError


class MLPClassifierFamily(TaskFamily):
    """ReLU MLP classifiers (``mnist-mlp``) trained by :class:`BatchedMLPTrainer`."""

    name = "ReLU MLP classifiers"

    def accepts(self, task: Task) -> bool:
        return _is_relu_mlp(task)

    def check(self, config: CorpusConfig) -> None:
        if config.epochs is not None and config.epochs < 1:
            raise LearnedOptError(f"--epochs must be >= 1, got {config.epochs}")
        if config.env_steps is not None:
            raise LearnedOptError("--env-steps applies to cartpole-mlp corpora; use --epochs for this task")
        if config.ppo_ranges is not None:
            raise LearnedOptError("--lr-range applies to cartpole-mlp corpora; this task's ranges are fixed")

    def settings(self, config: CorpusConfig) -> dict:
        return _mlp_settings(config)

    def plan(self, run_ids: Sequence[int], config: CorpusConfig, data: Any) -> list[RunPlan]:
        num_examples = len(_training_tensors(data, config.train_examples)[0])
        return plan_runs(run_ids, base_seed=config.seed, num_examples=num_examples, ranges=config.ranges,
                         gpt_recipe=config.gpt_recipe, epochs=config.epochs, num_checkpoints=config.checkpoints)

    def groups(self, plans: list[RunPlan], batch_runs: int) -> list[list[RunPlan]]:
        return _batches(plans, batch_runs)

    def trainer(self, task: Task, config: CorpusConfig, data: Any, device: torch.device) -> Callable:
        train_x, train_y = _training_tensors(data, config.train_examples)
        return BatchedMLPTrainer(task, train_x, train_y, device).train


def families() -> list[TaskFamily]:
    from .ppo import PPOFamily  # pretrain.ppo imports this module

    return [MLPClassifierFamily(), PPOFamily()]


def family_for(task: Task) -> TaskFamily:
    """The family that trains ``task``'s corpus; :class:`LearnedOptError` if none does."""
    for family in families():
        if family.accepts(task):
            return family
    choices = [n for n in tasks.names() if any(f.accepts(tasks.get(n)) for f in families())]
    raise LearnedOptError(
        f"the corpus builder trains {' and '.join(f.name for f in families())}; task {task.name!r} is none of "
        f"these (choose one of: {', '.join(choices)})"
    )


def build_corpus(
    config: CorpusConfig, *, store: Store | None = None, data: Any = None, rank: int = 0, world_size: int = 1,
) -> CorpusSummary:
    """Train the runs of ``config`` that this rank owns and are not yet in the store; write each.

    ``store`` and ``data`` may be given (already created / loaded); otherwise they are made here.
    Finished and dropped runs are skipped, so calling this again resumes an interrupted job.
    """
    if config.runs < 0 or config.batch_runs < 1 or config.checkpoints < 2:
        raise LearnedOptError("--runs must be >= 0, --batch-runs >= 1 and --checkpoints >= 2")
    task = tasks.get(config.task)
    family = family_for(task)
    family.check(config)
    if data is None:
        data = task.load_data(config.data_root, download=config.download)
    settings = family.settings(config)
    if store is None:
        store = Store.create(config.out, task, settings=settings)
    if store.task_name != task.name:
        raise StoreError(f"{store.root} is a store of task {store.task_name!r}, not {task.name!r}")
    check_settings(store, settings)
    device = torch.device(config.device)
    mine = [r for r in range(config.runs) if r % world_size == rank]
    todo = [r for r in mine if not store.is_done(r)]
    summary = CorpusSummary(skipped=len(mine) - len(todo))
    plans = family.plan(todo, config, data)
    train = family.trainer(task, config, data, device)
    eval_data = data.to(device) if hasattr(data, "to") and device.type != "cpu" else data
    info = {"rank": rank, "world_size": world_size, "device": str(device), "learned_opt": __version__}
    start = time.perf_counter()
    bar = tqdm(total=float(len(plans)), unit="run", desc=f"corpus {task.name}", dynamic_ncols=True,
               disable=not config.progress or rank != 0, bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} "
               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def finish(runs: list[FinishedRun]) -> None:
        kept = [r for r in runs if r.params is not None]
        if kept:
            flat = torch.cat([r.params for r in kept])  # [n*K, P]
            with torch.random.fork_rng(devices=[]):  # an evaluation that builds modules leaves the caller's RNG alone
                metrics = task.evaluate(flat.to(device), eval_data)
            offset = 0
            for r in kept:
                k = r.params.shape[0]
                m = {name: v[offset : offset + k].float().cpu() for name, v in metrics.items()}
                offset += k
                record = RunRecord(r.params, r.steps, m, r.plan.hparams, r.plan.seed, {**info, **r.info})
                if store.write_run(r.plan.run_id, record, exist_ok=True):
                    summary.written += 1
                    summary.checkpoints += k
                    summary.bytes += store.run_path(r.plan.run_id).stat().st_size
        for r in runs:
            if r.params is None:
                store.mark_dropped(r.plan.run_id, seed=r.plan.seed, hparams=r.plan.hparams, reason=r.dropped,
                                   step=r.dropped_at)
                summary.dropped += 1
                summary.dropped_ids.append(r.plan.run_id)
        bar.set_postfix(written=summary.written, dropped=summary.dropped, refresh=False)

    def advance(runs: float) -> None:  # float progress in runs; never past the total
        bar.update(max(0.0, min(runs, bar.total - bar.n)))

    try:
        for group in family.groups(plans, config.batch_runs):
            train(group, finish, advance)
        advance(bar.total)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary


def _batches(plans: list[RunPlan], size: int) -> list[list[RunPlan]]:
    """Runs grouped by batch size, each group cut into batches of runs with similar epochs."""
    by_batch: dict[int, list[RunPlan]] = {}
    for p in plans:
        by_batch.setdefault(p.hparams["batch_size"], []).append(p)
    out = []
    for _, group in sorted(by_batch.items()):
        group.sort(key=lambda p: (p.hparams["epochs"], p.run_id))
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out


# ---------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="mnist-mlp", help="task name (default: mnist-mlp)")
    parser.add_argument("--runs", type=int, required=True, help="number of runs: ids 0 .. RUNS-1")
    parser.add_argument("--out", required=True, help="store folder (created, or resumed if it exists)")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $LEARNED_OPT_DATA)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    parser.add_argument("--batch-runs", type=int, default=16, help="runs trained together (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; run r has seed SEED + r")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    parser.add_argument("--gpt-recipe", action="store_true",
                        help="G.pt's recipe for every run: SGD Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, 25 epochs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="train on the first N training examples only (quick corpora, tests)")
    parser.add_argument("--checkpoints", type=int, default=200, help="checkpoints per run (default: 200)")
    parser.add_argument("--env-steps", type=int, default=None,
                        help="cartpole-mlp: environment steps of every run (default: drawn from 25k/50k/100k)")
    parser.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="cartpole-mlp: draw each run's Adam lr log-uniformly from [LOW, HIGH] "
                             "(default: 1e-4 3e-3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    config = CorpusConfig(
        task=args.task, runs=args.runs, out=args.out, data_root=args.data_root, download=args.download,
        batch_runs=args.batch_runs, seed=args.seed, epochs=args.epochs, gpt_recipe=args.gpt_recipe,
        device=args.device, train_examples=args.train_examples, checkpoints=args.checkpoints,
        progress=not args.no_progress, env_steps=args.env_steps,
    )
    if args.lr_range is not None:
        from .ppo import PPORanges  # pretrain.ppo imports this module

        try:
            config.ppo_ranges = PPORanges(lr=tuple(args.lr_range))
        except ValueError as exc:
            raise LearnedOptError(f"--lr-range: {exc}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    if config.device == "cuda" and distributed:
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        task = tasks.get(config.task)
        family_for(task).check(config)
        data = task.load_data(config.data_root, download=config.download)
        store, error = None, None
        if rank == 0:  # only rank 0 creates the store; the others open it once it exists
            try:
                store = Store.create(config.out, task, settings=corpus_settings(config))
                check_settings(store, corpus_settings(config))  # before anything is written
                store.clean_stale_temp()
                store.verify()
            except LearnedOptError as exc:
                error = str(exc)
        if distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise StoreError(error)
        if store is None:
            store = Store.open(config.out)
        summary = build_corpus(config, store=store, data=data, rank=rank, world_size=world_size)
        prefix = f"[rank {rank}] " if distributed else ""
        print(f"{prefix}corpus {config.out}: {summary.line()}", flush=True)
        if distributed:
            dist.barrier()
        if rank == 0:
            stats = store.stats(refresh=True)
            print(f"store {config.out}: {stats['runs']} runs, {stats['dropped']} dropped, "
                  f"{stats['checkpoints']} checkpoints, {stats['bytes_per_checkpoint']:,.0f} bytes/checkpoint",
                  flush=True)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node 2 -m pretrain.corpus --runs ... --out ...
    from learned_opt.cli import main as cli_main

    sys.exit(cli_main(["corpus", *sys.argv[1:]]))
