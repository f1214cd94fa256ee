"""What a task is, and the registry of tasks.

A task names an architecture and a metric: how to build a fresh model, where its data comes from,
how to evaluate many parameter vectors at once, which way its metrics go, and a permutation of
hidden units that leaves the network's function unchanged.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnknownTaskError
from ..layout import Layout, Signature, signature_of


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
    """An architecture plus its data and metrics. Subclasses fill in the abstract parts."""

    name: str
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

    @abstractmethod
    def hidden_sizes(self) -> tuple[int, ...]:
        """Size of each permutable hidden layer, in order."""

    @abstractmethod
    def permute(self, flat: torch.Tensor, perms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Permute hidden units: ``flat`` ``[B, P]``, ``perms[l]`` ``[B, H_l]`` -> ``[B, P]``."""

    def validation_data(self, data: Any, holdout: int = 5000) -> Any:
        """``data`` rearranged so that :meth:`evaluate` measures held-out *training* data instead
        of the test set: for choosing anything (a sampler, one of several candidates) without
        looking at the test set. ``holdout`` is the number of held-out examples, where that applies."""
        raise NotImplementedError(f"task {self.name!r} defines no validation data")

    def logits(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Output logits of ``B`` networks on one batch: ``[B, P]``, ``[N, ...]`` -> ``[B, N, C]``,
        differentiable in ``flat``. Tasks whose networks output a class (or action) distribution
        define it; :meth:`output_divergence` needs it."""
        raise ConfigError(f"task {self.name!r} has no differentiable outputs to match; train its generators "
                          f"without --output-matching")

    def matching_inputs(self, data: Any) -> torch.Tensor:
        """Inputs on which :meth:`output_divergence` may compare networks while a generator trains:
        training data only (never what :meth:`validation_data` holds out, nor the test set)."""
        raise ConfigError(f"task {self.name!r} has no inputs to match outputs on; train its generators "
                          f"without --output-matching")

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
        with torch.device("meta"):
            return signature_of(self.build_model())

    def layout(self, chunk_size: int | None = 1000, scheme: str = "chunk") -> Layout:
        return Layout(self.signature, chunk_size, scheme)

    @property
    def num_params(self) -> int:
        return self.layout().num_params

    def random_permutations(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One random permutation per hidden layer for each of ``batch`` networks."""
        return [
            torch.argsort(torch.rand(batch, h, generator=generator), dim=-1) for h in self.hidden_sizes()
        ]

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        n = len(self.sizes) - 1
        for i in range(1, n + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < n:
                x = self.act(x)
        return x


def permute_mlp(layout: Layout, flat: torch.Tensor, perms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Permute the hidden units of an :class:`MLP` given as flat vectors.

    For hidden layer ``l`` with permutation ``p``: rows of ``fc{l}.weight`` and ``fc{l}.bias`` and
    columns of ``fc{l+1}.weight`` are reordered by ``p``, which leaves the function unchanged.
    """
    if flat.dim() != 2:
        raise ValueError(f"expected flat vectors [B, P], got shape {list(flat.shape)}")
    params = {k: v.clone() for k, v in layout.unflatten(flat).items()}
    for l, p in enumerate(perms, start=1):
        p = p.to(flat.device)
        w, b, w_next = f"fc{l}.weight", f"fc{l}.bias", f"fc{l + 1}.weight"
        rows = p[:, :, None].expand(-1, -1, params[w].shape[-1])
        params[w] = torch.gather(params[w], 1, rows)
        params[b] = torch.gather(params[b], 1, p)
        cols = p[:, None, :].expand(-1, params[w_next].shape[1], -1)
        params[w_next] = torch.gather(params[w_next], 2, cols)
    return layout.flatten(params)


def batched_forward(model: nn.Module, layout: Layout, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``B`` parameter vectors on one input batch: ``[B, P]``, ``[N, ...]`` -> ``[B, N, ...]``.

    Uses ``torch.func.functional_call`` under ``vmap``, so the B networks run as batched matmuls.
    """

    def one(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, params, (inputs,))

    return torch.func.vmap(one, in_dims=(0, None))(layout.unflatten(flat), x)


# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], Task]] = {}


def register(name: str, factory: Callable[[], Task]) -> None:
    """Add a task factory under ``name``."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    """Names of all registered tasks."""
    return sorted(_REGISTRY)


def get(name: str | Task) -> Task:
    """The task called ``name`` (a :class:`Task` is returned as is)."""
    if isinstance(name, Task):
        return name
    if name not in _REGISTRY:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(names()) or 'none'}")
    return _REGISTRY[name]()
