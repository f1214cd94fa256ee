"""The batched trainer (many runs of a supervised task at once) and its plain reference loop."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from learned_opt.recipes import SGD, cosine_lr
from learned_opt.tasks import Task

from .family import FinishedRun, bad_rows
from .gradients import batched_gradient
from .plan import RunPlan
from .warm import WarmStart


class BatchedTrainer:
    """Trains R runs of one supervised task and one batch size together, one batched step at a time.

    Parameters of all runs live in one flat ``[R, P]`` tensor (the layout's order), starting from
    the runs' inits (or where ``start`` moves them: :class:`~pretrain.corpus.warm.WarmStart`); each step's
    gradients come from :func:`~pretrain.corpus.gradients.batched_gradient` (a hand-written path
    for ReLU MLPs, ``torch.func`` for any other model), and the optimizers (PyTorch's SGD-Nesterov
    and Adam, L2 weight decay) update rows with per-run hyperparameters held as ``[R, 1]`` tensors.
    """

    def __init__(self, task: Task, train_x: torch.Tensor, train_y: torch.Tensor, device: torch.device | str = "cpu",
                 gradient: str = "auto", start: WarmStart | None = None):
        self.task, self.layout = task, task.layout()
        self.start = start  # (inits [R, P], plans) -> the runs' first parameters, and what checkpoint 0 records
        self.device = torch.device(device)
        self.gradient = batched_gradient(task, train_x.to(self.device), train_y.to(self.device), gradient)

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
        first = params  # what checkpoint 0 records
        if self.start is not None:
            inits, params = params, self.start(params, plans)
            first = self.start.first_checkpoints(inits, params)
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

        def save(t: int, values: torch.Tensor | None = None) -> None:
            values = params if values is None else values
            for p, slot in save_at.get(t, ()):
                if p.run_id in row:
                    saved[p.run_id][slot] = values[row[p.run_id]].to("cpu")

        save(0, first)
        t = 0
        while active:
            epoch = t // spe
            perm = torch.stack([torch.randperm(n, generator=g) for g in orders]).to(dev)  # [R, N]
            lr = lr0 * 0.5 * (1.0 + torch.cos(math.pi * epoch / epochs))  # [R, 1] cosine per epoch
            for s in range(spe):
                idx = perm[:, s * batch : (s + 1) * batch]  # [R, b]
                self.gradient(params, idx, grad)
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
            bad = bad_rows(params).tolist()
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
                    reason = "non-finite or |w| > 10" if bool(bad_rows(ck).any()) else None
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
    checkpoints ``[K, P]``. The test oracle for :class:`BatchedTrainer` and the benchmark's
    baseline.
    """
    hp, layout = plan.hparams, task.layout()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        model = task.build_model()
    with torch.no_grad():
        for q in model.parameters():
            q.mul_(hp.get("init_scale", 1.0))
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
            task.loss(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
            t += 1
            if t in wanted:
                out[wanted[t]] = layout.flatten_module(model)
        sched.step()
    return out

