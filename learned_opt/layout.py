"""The one place that knows how parameters are laid out.

A network's parameters travel through this package in three forms:

* as the model's own tensors (``model.named_parameters()``, in registration order);
* as one flat ``float32`` vector of length ``P`` (the tensors' ``reshape(-1)`` concatenated in
  signature order): what the corpus stores and the optimizer samples;
* as tokens ``[T, M]`` for the generator: each layer's slice of the flat vector cut into chunks of
  at most ``M`` values (G.pt's "chunk within layer" policy), the last chunk of a layer zero-padded.
  ``chunk_size=None`` gives one token per layer (padded to the largest layer).

An *architecture signature* is the ordered tuple of ``(name, shape)`` pairs; two models are
interchangeable for a generator exactly when their signatures are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ArchitectureMismatchError

Signature = tuple[tuple[str, tuple[int, ...]], ...]


def signature_of(source: nn.Module | Mapping[str, torch.Tensor] | Iterable) -> Signature:
    """The architecture signature of a module, a name->tensor mapping, or ``(name, shape)`` pairs."""
    if isinstance(source, nn.Module):
        items = [(n, tuple(p.shape)) for n, p in source.named_parameters()]
    elif isinstance(source, Mapping):
        items = [(n, tuple(t.shape)) for n, t in source.items()]
    else:
        items = [(str(n), tuple(int(d) for d in s)) for n, s in source]
    return tuple((str(n), tuple(int(d) for d in s)) for n, s in items)


def signature_to_json(signature: Signature) -> list[list]:
    """A JSON-friendly form of a signature: ``[[name, [d0, d1, ...]], ...]``."""
    return [[name, list(shape)] for name, shape in signature]


def signature_from_json(data: Sequence) -> Signature:
    """The inverse of :func:`signature_to_json`."""
    return signature_of((name, shape) for name, shape in data)


def compare_signatures(expected: Signature, actual: Signature) -> list[str]:
    """Every difference between two signatures, as human-readable lines (empty when equal)."""
    diffs: list[str] = []
    exp, act = dict(expected), dict(actual)
    for name, shape in expected:
        if name not in act:
            diffs.append(f"missing parameter {name!r} with shape {list(shape)}")
        elif act[name] != shape:
            diffs.append(f"parameter {name!r} has shape {list(act[name])}, expected {list(shape)}")
    for name, shape in actual:
        if name not in exp:
            diffs.append(f"unexpected parameter {name!r} with shape {list(shape)}")
    common_exp = [n for n, _ in expected if n in act]
    common_act = [n for n, _ in actual if n in exp]
    if not diffs and common_exp != common_act:
        diffs.append(f"parameters are in order {common_act}, expected {common_exp}")
    return diffs


def check_signature(expected: Signature, actual: Signature, what: str = "the model") -> None:
    """Raise :class:`ArchitectureMismatchError` listing every difference, if there are any."""
    diffs = compare_signatures(expected, actual)
    if diffs:
        lines = "\n  - ".join(diffs)
        raise ArchitectureMismatchError(
            f"{what} does not match the expected architecture ({len(diffs)} difference(s)):\n"
            f"  - {lines}\nUse a model built for this architecture, or a generator trained for yours."
        )


@dataclass(frozen=True)
class Layout:
    """Flat-vector and token views of one architecture signature.

    ``chunk_size`` is G.pt's ``M``: the most parameters one token holds. ``None`` means one token
    per layer.
    """

    signature: Signature
    chunk_size: int | None = 1000

    def __post_init__(self) -> None:
        if not self.signature:
            raise ArchitectureMismatchError("an architecture signature needs at least one parameter")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {self.chunk_size} (must be >= 1 or None)")

    @classmethod
    def of(cls, source, chunk_size: int | None = 1000) -> "Layout":
        return cls(signature_of(source), chunk_size)

    # ------------------------------------------------------------------ flat vector

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of values in each parameter, in signature order."""
        return tuple(int(torch.Size(shape).numel()) for _, shape in self.signature)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat vector (and the total length last)."""
        out, acc = [0], 0
        for s in self.sizes:
            acc += s
            out.append(acc)
        return tuple(out)

    @property
    def num_params(self) -> int:
        return self.offsets[-1]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.signature)

    def flatten(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (in signature order, or by name) into ``[..., P]``.

        Leading batch dimensions are kept: a tensor of shape ``[B, *shape]`` flattens to ``[B, P]``.
        """
        if isinstance(tensors, Mapping):
            tensors = [tensors[name] for name in self.names]
        if len(tensors) != len(self.signature):
            raise ArchitectureMismatchError(
                f"expected {len(self.signature)} tensors, got {len(tensors)}"
            )
        flat = []
        for t, (name, shape) in zip(tensors, self.signature):
            nd = len(shape)
            if tuple(t.shape[t.dim() - nd :]) != shape:
                raise ArchitectureMismatchError(
                    f"tensor for {name!r} has shape {list(t.shape)}, expected [..., {', '.join(map(str, shape))}]"
                )
            flat.append(t.reshape(*t.shape[: t.dim() - nd], -1))
        return torch.cat(flat, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``[..., P]`` into a name -> ``[..., *shape]`` dict of views."""
        if flat.shape[-1] != self.num_params:
            raise ArchitectureMismatchError(
                f"flat vector has {flat.shape[-1]} values, the architecture has {self.num_params}"
            )
        lead = flat.shape[:-1]
        return {
            name: flat[..., a:b].reshape(*lead, *shape)
            for (name, shape), a, b in zip(self.signature, self.offsets[:-1], self.offsets[1:])
        }

    def flatten_module(self, module: nn.Module) -> torch.Tensor:
        """The module's parameters as one detached flat vector (a copy)."""
        params = dict(module.named_parameters())
        check_signature(self.signature, signature_of(module))
        return self.flatten([params[n].detach() for n in self.names]).clone()

    @torch.no_grad()
    def load_into(self, flat: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Copy ``flat`` into existing parameter tensors in place (``copy_``, never rebinding)."""
        views = self.unflatten(flat)
        if len(params) != len(self.signature):
            raise ArchitectureMismatchError(
                f"expected {len(self.signature)} parameters, got {len(params)}"
            )
        for p, name in zip(params, self.names):
            p.copy_(views[name])

    # ------------------------------------------------------------------ tokens

    @cached_property
    def token_spans(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` in the flat vector of each token; tokens never cross layers."""
        spans = []
        for a, b in zip(self.offsets[:-1], self.offsets[1:]):
            step = (b - a) if self.chunk_size is None else self.chunk_size
            spans.extend((s, min(s + step, b)) for s in range(a, b, step))
        return tuple(spans)

    @property
    def num_tokens(self) -> int:
        return len(self.token_spans)

    @cached_property
    def token_dim(self) -> int:
        """Width ``M`` of a token: the largest span (the chunk size, or the largest layer)."""
        return max(b - a for a, b in self.token_spans)

    @cached_property
    def _gather_index(self) -> torch.Tensor:
        # [T, M] index into the flat vector padded with one zero at position P.
        idx = torch.full((self.num_tokens, self.token_dim), self.num_params, dtype=torch.long)
        for i, (a, b) in enumerate(self.token_spans):
            idx[i, : b - a] = torch.arange(a, b)
        return idx

    @cached_property
    def token_mask(self) -> torch.Tensor:
        """``[T, M]`` bool: which token entries hold real parameters (the rest is padding)."""
        return self._gather_index < self.num_params

    def to_tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """``[..., P]`` -> ``[..., T, M]`` with zero padding."""
        padded = torch.cat([flat, flat.new_zeros(*flat.shape[:-1], 1)], dim=-1)
        idx = self._gather_index.to(flat.device)
        return padded[..., idx]

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., T, M]`` -> ``[..., P]``; padding entries are dropped. Exact inverse of to_tokens."""
        mask = self.token_mask.to(tokens.device)
        return tokens[..., mask]
