"""The one place that knows how parameters are laid out.

A network's parameters travel through this package in three forms:

* as the model's own tensors (``model.named_parameters()``, in registration order);
* as one flat ``float32`` vector of length ``P`` (the tensors' ``reshape(-1)`` concatenated in
  signature order): what the corpus stores and the optimizer samples;
* as tokens ``[T, M]`` for the generator, zero-padded to the widest token, in one of two schemes:

  - ``"chunk"`` (G.pt's "chunk within layer" policy): each layer's slice of the flat vector cut
    into chunks of at most ``M = chunk_size`` values. ``chunk_size=None`` gives one token per layer.
  - ``"neuron"``, for architectures with unit groups (:mod:`learned_opt.symmetry`; derived for a
    chain of linear or convolutional layers): one token per hidden unit (a convolution's output
    channel), holding its incoming weights (kernel) and bias and, for the last group, its outgoing
    weights too; what no unit holds (the output layer's bias) is one more token. The hidden units of one
    layer form a *token group*: permuting them permutes their tokens and nothing else (for
    the last hidden layer; an earlier layer's permutation also reorders entries inside the next
    layer's tokens), so a generator that shares weights within a group is equivariant to them.
    On ``mnist-mlp`` (784-10-10) that is 10 tokens of 784 + 1 + 10 values and one of 10.

An *architecture signature* is the ordered tuple of ``(name, shape)`` pairs; two models are
interchangeable for a generator exactly when their signatures are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping, Sequence, cast

import torch
from torch import nn

from .errors import ArchitectureMismatchError
from .symmetry import Slot, Symmetry, UnitGroup, chain_symmetry

Signature = tuple[tuple[str, tuple[int, ...]], ...]
SCHEMES = ("chunk", "neuron")


def signature_of(source: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, Iterable[int]]]) -> Signature:
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


def shape_differences(expected: Signature, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> list[str]:
    """How parameters ``names`` / ``shapes`` (in order) differ from ``expected``, one line each: the
    rule a generator applies, since it samples shapes in order (names are labels)."""
    diffs = []
    for i in range(max(len(shapes), len(expected))):
        if i >= len(expected):
            diffs.append(f"{names[i]} {list(shapes[i])} is beyond the generator's {len(expected)} parameters")
        elif i >= len(shapes):
            diffs.append(f"missing a parameter like the generator's {expected[i][0]} {list(expected[i][1])}")
        elif tuple(shapes[i]) != tuple(expected[i][1]):
            diffs.append(f"{names[i]} has shape {list(shapes[i])} where the generator's {expected[i][0]} has "
                         f"{list(expected[i][1])}")
    return diffs


def listed(diffs: Sequence[str], most: int = 8) -> str:
    """``diffs`` as indented lines, at most ``most`` of them and a count of the rest."""
    lines = list(diffs[:most]) + ([f"... and {len(diffs) - most} more"] if len(diffs) > most else [])
    return "".join(f"\n  - {line}" for line in lines)


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

    ``scheme`` is ``"chunk"`` or ``"neuron"`` (module docstring). ``chunk_size`` is G.pt's ``M``
    for the chunk scheme: the most parameters one token holds; ``None`` means one token per layer.
    The neuron scheme does not use it (it is set to ``None``).
    """

    signature: Signature
    chunk_size: int | None = 1000
    scheme: str = "chunk"
    symmetry: Symmetry | None = None  # neuron scheme: None derives it from the signature (a chain of layers)

    def __post_init__(self) -> None:
        if not self.signature:
            raise ArchitectureMismatchError("an architecture signature needs at least one parameter")
        if self.scheme not in SCHEMES:
            raise ValueError(f"Invalid token scheme: {self.scheme!r} (choose one of {', '.join(SCHEMES)})")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {self.chunk_size} (must be >= 1 or None)")
        if self.scheme == "neuron":
            symmetry = self.symmetry
            if symmetry is None:  # derived: raises for anything but a chain of layers
                symmetry = chain_symmetry(self.signature)
                object.__setattr__(self, "symmetry", symmetry)
            symmetry.check(self.signature)
            object.__setattr__(self, "chunk_size", None)  # not used: equal layouts for any chunk_size
        else:
            object.__setattr__(self, "symmetry", None)  # not used: equal layouts with or without it

    @classmethod
    def of(cls, source, chunk_size: int | None = 1000, scheme: str = "chunk",
           symmetry: Symmetry | None = None) -> "Layout":
        return cls(signature_of(source), chunk_size, scheme, symmetry)

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

    def _slot_indices(self, slot: Slot) -> torch.Tensor:
        """Flat-vector indices of a slot's values, ``[H, d]``: row ``j`` holds unit ``j``'s."""
        k = self.names.index(slot.name)
        shape = self.signature[k][1]
        index = torch.arange(self.offsets[k], self.offsets[k + 1]).view(1, *shape)
        return Symmetry((UnitGroup(shape[slot.axis] // slot.inner, (slot,), ()),)).unit_values(
            {slot.name: index}, 0)[0]

    @cached_property
    def _token_indices(self) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        """Flat-vector indices of each token's values, and each token's group."""
        tokens: list[tuple[int, ...]] = []
        groups: list[int] = []
        if self.scheme == "chunk":  # contiguous chunks within each layer; every token its own group
            for a, b in zip(self.offsets[:-1], self.offsets[1:]):
                step = (b - a) if self.chunk_size is None else self.chunk_size
                for s in range(a, b, step):
                    tokens.append(tuple(range(s, min(s + step, b))))
                    groups.append(len(groups))
            return tuple(tokens), tuple(groups)
        sym = cast(Symmetry, self.symmetry)  # the neuron scheme's, never None (set in __post_init__)
        covered = torch.zeros(self.num_params, dtype=torch.bool)
        for g, group in enumerate(sym.groups):  # one token per unit: incoming slots (+ outgoing, last group)
            slots = group.incoming + (group.outgoing if g == len(sym.groups) - 1 else ())
            units = torch.cat([self._slot_indices(s) for s in slots], 1)  # [H, D]
            covered[units.flatten()] = True
            tokens += [tuple(u) for u in units.tolist()]
            groups += [g] * group.size
        width = max(len(t) for t in tokens)
        for k in range(len(self.signature)):  # what no unit holds (the output bias): tokens of its own
            rest = [i for i in range(self.offsets[k], self.offsets[k + 1]) if not covered[i]]
            for s in range(0, len(rest), width):
                tokens.append(tuple(rest[s : s + width]))
                groups.append(max(groups) + 1)
        return tuple(tokens), tuple(groups)

    @property
    def token_spans(self) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` in the flat vector of each token (chunk scheme: tokens are contiguous
        and never cross layers)."""
        if self.scheme != "chunk":
            raise ValueError("neuron tokens are not contiguous spans; use token_indices")
        return tuple((idx[0], idx[-1] + 1) for idx in self._token_indices[0])

    @property
    def token_indices(self) -> tuple[tuple[int, ...], ...]:
        """The flat-vector indices each token holds, in token order (every parameter exactly once)."""
        return self._token_indices[0]

    @property
    def token_groups(self) -> tuple[int, ...]:
        """Group of each token: tokens of one group are interchangeable (neuron scheme: the hidden
        units of one layer); in the chunk scheme every token is its own group."""
        return self._token_indices[1]

    @property
    def num_groups(self) -> int:
        return max(self.token_groups) + 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_indices)

    @cached_property
    def token_dim(self) -> int:
        """Width ``M`` of a token: the widest token (the chunk size, the largest layer, or a unit's values)."""
        return max(len(idx) for idx in self.token_indices)

    @cached_property
    def _gather_index(self) -> torch.Tensor:
        # [T, M] index into the flat vector padded with one zero at position P.
        idx = torch.full((self.num_tokens, self.token_dim), self.num_params, dtype=torch.long)
        for i, values in enumerate(self.token_indices):
            idx[i, : len(values)] = torch.tensor(values, dtype=torch.long)
        return idx

    def group_rms(self, values: torch.Tensor) -> torch.Tensor:
        """``[P]`` non-negative values made equal across the tokens of each group, position by
        position, by their root mean square; a generator that shares weights within groups needs
        per-parameter scales that do not tell the group's tokens apart."""
        tokens = self.to_tokens(values.square())  # [T, M]
        groups = torch.tensor(self.token_groups, device=values.device)
        sums = torch.zeros(self.num_groups, self.token_dim, dtype=tokens.dtype, device=values.device)
        sums.index_add_(0, groups, tokens)
        counts = torch.bincount(groups, minlength=self.num_groups).to(tokens.dtype)
        return self.from_tokens((sums / counts[:, None])[groups].sqrt())

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
        return tokens[..., mask][..., self._flat_order.to(tokens.device)]

    @cached_property
    def _flat_order(self) -> torch.Tensor:
        """``[P]``: where each flat position sits among the tokens' real entries (in token order)."""
        return torch.argsort(self._gather_index[self.token_mask])
