"""Minibatch gradients of many runs at once: ``[R, P]`` parameters -> ``[R, P]`` gradients.

The corpus trainer (:class:`~pretrain.corpus.trainer.BatchedTrainer`) keeps every run's parameters
in one flat ``[R, P]`` tensor and asks one of these for the gradient of each run's loss on its own
minibatch (``idx [R, b]``: rows of the training set):

* :class:`MLPGradient` — a hand-written batched forward/backward for ReLU MLPs built from
  :class:`learned_opt.tasks.MLP` (batched matmuls; measured faster than the generic one:
  ``benchmarks/test_corpus_speed.py``);
* :class:`FunctionalGradient` — any ``nn.Module`` through ``torch.func``: ``grad`` of the task's
  loss under ``functional_call``, either ``vmap``-ed over the runs or called once per run. Which
  of the two is faster depends on the model and the machine (``vmap`` turns a convolution into a
  grouped one, which on a CPU is slower than one ordinary convolution per run), so with
  ``strategy="auto"`` the first call times both and keeps the faster.

:func:`batched_gradient` picks one for a task, after checking what the generic path needs: every
parameter requires grad, the model holds no buffers, and its forward runs on the task's data.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from learned_opt.errors import LearnedOptError
from learned_opt.layout import Layout
from learned_opt.tasks import MLP, SupervisedTask, Task

STRATEGIES = ("auto", "mlp", "vmap", "loop")


def is_relu_mlp(model: nn.Module) -> bool:
    """Whether ``model`` is a ReLU :class:`learned_opt.tasks.MLP` (the hand-written path applies)."""
    return isinstance(model, MLP) and isinstance(model.act, nn.ReLU)


class MLPGradient:
    """Mean cross-entropy gradients of R ReLU MLPs, each on its own minibatch, by hand.

    Activations are kept feature-major (``[R, features, b]``): ``W @ x^T`` measured faster on CPU
    than ``x @ W^T`` for these narrow layers.
    """

    name = "mlp"

    def __init__(self, model: MLP, layout: Layout, train_x: torch.Tensor, train_y: torch.Tensor):
        self.sizes, self.layout = model.sizes, layout
        self.train_x = train_x.reshape(train_x.shape[0], -1).float().contiguous()  # [N, in]
        self.train_y = train_y.long()
        if self.train_x.shape[1] != self.sizes[0]:
            raise LearnedOptError(f"training inputs have {self.train_x.shape[1]} features, the MLP takes {self.sizes[0]}")

    def __call__(self, params: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
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


class FunctionalGradient:
    """Gradients of the task's loss for any ``nn.Module`` through ``torch.func``.

    ``strategy``: ``"vmap"`` (one vectorised call for all runs), ``"loop"`` (one ``grad`` call per
    run) or ``"auto"`` (time both on the first call, keep the faster; :attr:`name` then says which).
    """

    def __init__(self, task: Task, model: nn.Module, layout: Layout, train_x: torch.Tensor, train_y: torch.Tensor,
                 strategy: str = "auto"):
        self.layout, self.train_x, self.train_y = layout, train_x.float(), train_y.long()
        self.name = strategy

        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task.loss(torch.func.functional_call(model, params, (x,)), y)

        self._grad = torch.func.grad(loss)
        self._vmapped = torch.func.vmap(self._grad)

    def _vmap(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.layout.flatten(self._vmapped(self.layout.unflatten(params), x, y)))

    def _loop(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        for r in range(params.shape[0]):
            out[r] = self.layout.flatten(self._grad(self.layout.unflatten(params[r]), x[r], y[r]))

    def __call__(self, params: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
        x, y = self.train_x[idx], self.train_y[idx]  # [R, b, ...], [R, b]
        if self.name == "auto":
            self.name = self._fastest(params, x, y, out)
        (self._vmap if self.name == "vmap" else self._loop)(params, x, y, out)

    def _fastest(self, params, x, y, out) -> str:
        """Time one call of each strategy (after a warm-up call) and return the faster's name."""
        seconds = {}
        for name, fn in (("vmap", self._vmap), ("loop", self._loop)):
            fn(params, x, y, out)
            start = time.perf_counter()
            fn(params, x, y, out)
            seconds[name] = time.perf_counter() - start
        return min(seconds, key=seconds.get)


def batched_gradient(task: Task, train_x: torch.Tensor, train_y: torch.Tensor, strategy: str = "auto") -> Callable:
    """The gradient function for ``task``'s corpus runs: ``f(params [R, P], idx [R, b], out [R, P])``.

    ``strategy``: ``"auto"`` (the hand-written path for ReLU MLPs, else the faster ``torch.func``
    strategy), or one of ``"mlp"``, ``"vmap"``, ``"loop"``. Raises :class:`LearnedOptError` with
    what to do for a model the trainer cannot train: parameters that do not require grad, buffers
    (BatchNorm's running statistics are not part of a corpus run), or a forward that fails on the
    task's data.
    """
    if strategy not in STRATEGIES:
        raise LearnedOptError(f"unknown gradient strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    with torch.random.fork_rng(devices=[]):
        model = task.build_model()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise LearnedOptError(f"task {task.name!r}: parameters {frozen} do not require grad; a corpus run trains "
                              "every parameter, so build the model without frozen parameters")
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise LearnedOptError(
            f"task {task.name!r}: the model holds buffers {buffers[:4]}{' ...' if len(buffers) > 4 else ''} "
            "(e.g. BatchNorm's running statistics), which corpus runs cannot store or generate; "
            "use a model without them (e.g. GroupNorm or no normalisation)"
        )
    layout = task.layout()
    try:
        with torch.no_grad():
            task.loss(model(train_x[:2].float()), train_y[:2].long())
    except Exception as exc:  # noqa: BLE001 - the user's model: say what failed
        raise LearnedOptError(f"task {task.name!r}: the model's forward or loss fails on the task's data "
                              f"(inputs {list(train_x.shape[1:])}): {type(exc).__name__}: {exc}") from None
    hand_written = is_relu_mlp(model) and type(task).loss is SupervisedTask.loss  # it knows only cross-entropy
    if strategy == "mlp" or (strategy == "auto" and hand_written):
        if not hand_written:
            raise LearnedOptError(f"the 'mlp' gradient needs a ReLU learned_opt.tasks.MLP trained with cross-entropy; "
                                  f"task {task.name!r} has {type(model).__name__}")
        return MLPGradient(model, layout, train_x, train_y)
    with torch.device("meta"):
        meta = task.build_model()
    return FunctionalGradient(task, meta, layout, train_x, train_y, strategy)
