"""What a task is, and the registry of tasks.

A task names an architecture and a metric: how to build a fresh model, where its data comes from,
how to evaluate many parameter vectors at once, which way its metrics go, and a permutation of
hidden units that leaves the network's function unchanged.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, cast

import torch
from torch import nn

from ..errors import ConfigError, UnknownTaskError
from ..layout import Layout, Signature, signature_of
from ..symmetry import Symmetry, module_symmetry


@dataclass(frozen=True)
class Metric:
    """One metric a task reports for a parameter vector."""

    name: str
    direction: Literal["min", "max"]
    best_prompt: float  # the value to prompt for "as good as it gets" (G.pt's best prompt)
    description: str = ""

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "min" else a > b


class Task(ABC):
    """An architecture plus its data and metrics. Subclasses fill in the abstract parts.

    Concrete tasks derive from a *kind* (:class:`~learned_opt.tasks.SupervisedTask`,
    :class:`~learned_opt.tasks.ControlTask`), which supplies everything but the model and the data.
    """

    name: str
    kind: str  # "supervised" or "control": what the corpus builder, eval and bench do with it
    description: str
    metrics: Mapping[str, Metric]
    default_metric: str  # the metric generators for this task are conditioned on by default

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model, initialised from torch's global RNG (``torch.manual_seed`` controls it)."""

    @abstractmethod
    def load_data(self, root: str | os.PathLike | None = None, *, download: bool = False) -> Any:
        """The task's data (tensors in memory), read from ``root`` or ``$LEARNED_OPT_DATA``."""

    @abstractmethod
    def evaluate(
        self, flat: torch.Tensor, data: Any, metrics: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Metrics of many parameter vectors at once: ``flat`` is ``[B, P]``; returns name -> ``[B]``."""

    def symmetry(self) -> Symmetry:
        """The model's unit groups (hidden units, channels) whose order does not change its function.

        Derived from the model for chains of linear/convolutional layers
        (:func:`learned_opt.symmetry.module_symmetry`); override it to declare another architecture's.
        """
        with torch.device("meta"):
            return module_symmetry(self.build_model())

    def hidden_sizes(self) -> tuple[int, ...]:
        """Size of each permutable unit group, in order."""
        return self.unit_symmetry.sizes

    def permute(self, flat: torch.Tensor, perms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Permute hidden units: ``flat`` ``[B, P]``, ``perms[g]`` ``[B, H_g]`` -> ``[B, P]``."""
        if flat.dim() != 2:
            raise ValueError(f"expected flat vectors [B, P], got shape {list(flat.shape)}")
        layout = self.layout()
        return layout.flatten(self.unit_symmetry.permute(layout.unflatten(flat), perms))

    def validation_data(self, data: Any, holdout: int = 5000) -> Any:
        """``data`` rearranged so that :meth:`evaluate` measures held-out *training* data instead
        of the test set: for choosing anything (a sampler, one of several candidates) without
        looking at the test set. ``holdout`` is the number of held-out examples, where that applies."""
        raise NotImplementedError(f"task {self.name!r} defines no validation data")

    def labelling_data(self, data: Any, holdout: int = 5000, examples: int = 10_000) -> Any:
        """``data`` rearranged so that :meth:`evaluate` measures data that neither the test set nor
        :meth:`validation_data` ``(data, holdout)`` holds: for labelling what is then chosen or
        checked on validation data (``learned-opt tune-head``). ``examples`` is its size, where that applies."""
        raise NotImplementedError(f"task {self.name!r} defines no labelling data apart from its validation data")

    def logits(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Output logits of ``B`` networks on one batch: ``[B, P]``, ``[N, ...]`` -> ``[B, N, C]``,
        differentiable in ``flat`` (:func:`batched_forward`, or the model's own ``batched_forward``
        where it has a faster one, as :class:`MLP` does)."""
        with torch.device("meta"):  # only the structure: the parameters come from ``flat``
            model = self.build_model()
        layout = self.layout()
        if hasattr(model, "batched_forward"):  # a method: cast, as nn.Module types unknown attributes Tensor | Module
            return cast(Any, model).batched_forward(layout.unflatten(flat), inputs)
        key = ("forward", inputs.device.type)
        if key not in self._cache:  # vmap turns a CPU convolution into a slower grouped one: measure
            self._cache[key] = fastest_forward(model, layout, flat[:2].detach(), inputs[:256])
        if self._cache[key] == "loop":
            return torch.stack([torch.func.functional_call(model, layout.unflatten(f), (inputs,)) for f in flat])
        return batched_forward(model, layout, flat, inputs)

    def matching_inputs(self, data: Any) -> torch.Tensor:
        """Inputs on which :meth:`output_divergence` may compare networks while a generator trains:
        training data only (never what :meth:`validation_data` holds out, nor the test set)."""
        raise ConfigError(f"task {self.name!r} has no inputs to match outputs on; train its generators "
                          f"without --output-matching")

    def matching_labels(self, data: Any) -> torch.Tensor:
        """The labels of :meth:`matching_inputs`, row for row, for :meth:`excess_loss`."""
        raise _no_labels(self.name)

    def excess_loss(
        self, flat: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """How much worse ``flat`` ``[B, P]`` does than ``target`` ``[B, P]`` on labelled training
        ``inputs``: max(0, loss(flat) − loss(target)) per network, ``[B]``, differentiable in ``flat``."""
        raise _no_labels(self.name)

    def output_divergence(self, flat: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """How differently ``flat`` ``[B, P]`` behaves from ``target`` ``[B, P]`` on ``inputs``: the mean
        KL(target's output distribution || flat's) per network, ``[B]``, differentiable in ``flat``."""
        log_p = torch.log_softmax(self.logits(flat.float(), inputs), -1)
        with torch.no_grad():
            log_q = torch.log_softmax(self.logits(target.float(), inputs), -1)
        return (log_q.exp() * (log_q - log_p)).sum(-1).mean(-1)

    # ------------------------------------------------------------------ shared helpers

    @property
    def signature(self) -> Signature:
        """Names and shapes of the model's parameters, in ``named_parameters()`` order."""
        if "signature" not in self._cache:
            with torch.device("meta"):
                self._cache["signature"] = signature_of(self.build_model())
        return self._cache["signature"]

    def layout(self, chunk_size: int | None = 1000, scheme: str = "chunk") -> Layout:
        key = ("layout", chunk_size, scheme)
        if key not in self._cache:  # a Layout caches its token indices: keep one per scheme
            sym = self.unit_symmetry if scheme == "neuron" else None
            self._cache[key] = Layout(self.signature, chunk_size, scheme, sym)
        return self._cache[key]

    @property
    def unit_symmetry(self) -> Symmetry:
        """:meth:`symmetry`, computed once per task object."""
        if "symmetry" not in self._cache:
            sym = self.symmetry()
            sym.check(self.signature)
            self._cache["symmetry"] = sym
        return self._cache["symmetry"]

    @property
    def _cache(self) -> dict:
        return self.__dict__.setdefault("_task_cache", {})

    @property
    def num_params(self) -> int:
        return self.layout().num_params

    def random_permutations(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One random permutation per unit group for each of ``batch`` networks."""
        return self.unit_symmetry.random(batch, generator)

    def metric(self, name: str | None = None) -> Metric:
        name = name or self.default_metric
        if name not in self.metrics:
            raise UnknownTaskError(
                f"task {self.name!r} has no metric {name!r}; choose one of {sorted(self.metrics)}"
            )
        return self.metrics[name]

    def __repr__(self) -> str:
        return f"<Task {self.name}: {self.description}>"


# ---------------------------------------------------------------------- MLP building blocks


class MLP(nn.Module):
    """A plain multilayer perceptron with layers ``fc1 .. fcN`` (PyTorch's default init)."""

    def __init__(self, sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.ReLU, flatten: bool = True):
        super().__init__()
        self.sizes = tuple(sizes)
        self.flatten_input = flatten
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(a, b))
        self.act = activation()

    def batched_forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs of ``B`` networks with parameters ``name -> [B, *shape]`` on one batch ``x``:
        ``[B, N, out]``. The first layer of all ``B`` networks is one wide matrix multiply
        (``[N, in] x [in, B*H]``), which runs near the machine's peak, unlike ``B`` skinny ones."""
        n = len(self.sizes) - 1
        w = params["fc1.weight"]
        b, hidden = w.shape[0], w.shape[1]
        x = x.flatten(1) if self.flatten_input else x
        h = (x @ w.reshape(b * hidden, -1).T).view(-1, b, hidden) + params["fc1.bias"]  # [N, B, H]
        h = h.transpose(0, 1)  # [B, N, H]
        for i in range(2, n + 1):
            h = torch.baddbmm(params[f"fc{i}.bias"][:, None, :], self.act(h), params[f"fc{i}.weight"].transpose(1, 2))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        n = len(self.sizes) - 1
        for i in range(1, n + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < n:
                x = self.act(x)
        return x


def fastest_forward(model: nn.Module, layout: Layout, flat: torch.Tensor, x: torch.Tensor) -> str:
    """``"vmap"`` or ``"loop"``: which way of running several networks on ``x`` is faster here,
    timed once each after a warm-up call (both give the same outputs)."""
    import time

    seconds = {}
    with torch.no_grad():
        for name in ("vmap", "loop"):
            for _ in range(2):  # the first call warms up; the second is timed
                start = time.perf_counter()
                if name == "vmap":
                    batched_forward(model, layout, flat, x)
                else:
                    for f in flat:
                        torch.func.functional_call(model, layout.unflatten(f), (x,))
                seconds[name] = time.perf_counter() - start
    return min(seconds, key=seconds.__getitem__)


def batched_forward(model: nn.Module, layout: Layout, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``B`` parameter vectors on one input batch: ``[B, P]``, ``[N, ...]`` -> ``[B, N, ...]``.

    Uses ``torch.func.functional_call`` under ``vmap``, so the B networks run as batched matmuls.
    """

    def one(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, (inputs,))

    return torch.func.vmap(one, in_dims=(0, None))(layout.unflatten(flat), x)


def _no_labels(name: str) -> ConfigError:
    """The error of a task without labels asked for :meth:`Task.matching_labels` or :meth:`Task.excess_loss`."""
    return ConfigError(f"task {name!r} has no labels to compare networks' losses on; train its generators "
                       f"without --label-hinge")
