"""Which parameter axes share one permutation of hidden units (or channels).

Reordering the hidden units of a layer — the rows of its weight, its bias, and the matching input
columns of the next layer's weight — leaves the network's function unchanged. A :class:`Symmetry`
lists these *unit groups*: per group, the slots (parameter, axis) its permutation reorders. One
description serves everything that depends on it:

* the permutation augmentation of generator training pairs (:meth:`Symmetry.permute`);
* neuron tokens (:class:`learned_opt.layout.Layout` with ``scheme="neuron"``): one token per unit,
  holding its incoming slots and, for the last group, its outgoing ones;
* the memorisation check's alignment of two networks (:meth:`Symmetry.unit_values`).

For a chain of ``Linear`` / ``Conv1d`` / ``Conv2d`` layers with elementwise activations, dropout,
``Flatten`` and pooling in between it is derived automatically (:func:`chain_symmetry` from an
architecture signature, :func:`module_symmetry` from a module, which also refuses modules it cannot
reason about). A convolution's output channel is a unit: its slot is its kernel ``[in, k, k]``;
when a convolution is flattened into a linear layer without pooling, each channel owns ``inner``
consecutive inputs of that layer (``Slot.inner``). For anything else, declare the groups by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import ArchitectureMismatchError

Signature = tuple[tuple[str, tuple[int, ...]], ...]

# Modules a chain may hold between its layers: they act on each unit (channel) alike.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Identity, nn.Dropout, nn.Flatten,
    nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class Slot:
    """One axis of one parameter that a group's permutation reorders."""

    name: str
    axis: int  # 0: the units' own values (a weight's rows, a bias); 1: a weight's input axis
    inner: int = 1  # the axis holds [units, inner] (a convolution flattened into a linear layer)


@dataclass(frozen=True)
class UnitGroup:
    """``size`` interchangeable units: ``incoming`` slots hold what each unit computes from,
    ``outgoing`` slots what the next layer reads from it."""

    size: int
    incoming: tuple[Slot, ...]
    outgoing: tuple[Slot, ...]

    @property
    def slots(self) -> tuple[Slot, ...]:
        return self.incoming + self.outgoing


@dataclass(frozen=True)
class Symmetry:
    """The unit groups of one architecture, in order from the input."""

    groups: tuple[UnitGroup, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Units per group."""
        return tuple(g.size for g in self.groups)

    def check(self, signature: Signature) -> None:
        """Raise :class:`ArchitectureMismatchError` unless every slot fits ``signature``."""
        shapes = dict(signature)
        for g in self.groups:
            for s in g.slots:
                shape = shapes.get(s.name)
                if shape is None or not 0 <= s.axis < len(shape) or s.inner < 1 or shape[s.axis] != g.size * s.inner:
                    raise ArchitectureMismatchError(
                        f"symmetry slot {s} does not fit the architecture ({s.name}: "
                        f"{list(shape) if shape else 'no such parameter'}; the group has {g.size} units)"
                    )

    def random(self, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """One random permutation ``[batch, size]`` per group."""
        return [torch.argsort(torch.rand(batch, h, generator=generator), dim=-1) for h in self.sizes]

    def permute(self, params: Mapping[str, torch.Tensor], perms: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters ``name -> [B, *shape]`` with each group's units reordered by ``perms[g]`` ``[B, H_g]``.

        Unit ``i`` of the result is unit ``perms[g][:, i]`` of the input, in every slot of the group.
        """
        if len(perms) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} permutations (one per unit group), got {len(perms)}")
        out = dict(params)
        for g, p in zip(self.groups, perms):
            for s in g.slots:
                out[s.name] = _take_units(out[s.name], p.to(out[s.name].device), s)
        return out

    def unit_values(self, params: Mapping[str, torch.Tensor], group: int, outgoing: bool = True) -> torch.Tensor:
        """Everything attached to each unit of ``group``: ``[B, H, D]`` from parameters
        ``name -> [B, *shape]`` (incoming slots, then outgoing ones when ``outgoing``)."""
        g = self.groups[group]
        parts = []
        for s in g.incoming + (g.outgoing if outgoing else ()):
            t = _units_first(params[s.name], s)  # [B, H, ...]
            parts.append(t.reshape(*t.shape[:2], -1))  # [B, H, d]
        return torch.cat(parts, -1)  # [B, H, D]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"size": g.size,
             "incoming": [[s.name, s.axis, s.inner] for s in g.incoming],
             "outgoing": [[s.name, s.axis, s.inner] for s in g.outgoing]}
            for g in self.groups
        ]

    @classmethod
    def from_json(cls, data: Any) -> "Symmetry":
        try:
            return cls(tuple(
                UnitGroup(int(g["size"]),
                          tuple(Slot(str(n), int(a), int(i)) for n, a, i in g["incoming"]),
                          tuple(Slot(str(n), int(a), int(i)) for n, a, i in g["outgoing"]))
                for g in data
            ))
        except (TypeError, KeyError, ValueError) as exc:
            raise ArchitectureMismatchError(f"invalid symmetry description ({exc}); expected "
                                            "[{'size': H, 'incoming': [[name, axis, inner], ...], "
                                            "'outgoing': [...]}, ...]") from None


def _units_first(t: torch.Tensor, s: Slot) -> torch.Tensor:
    """``t`` ``[B, *shape]`` with the slot's units as dimension 1: ``[B, H, ...]``."""
    d = 1 + s.axis
    if s.inner > 1:
        t = t.unflatten(d, (t.shape[d] // s.inner, s.inner))
    return t.movedim(d, 1)


def _take_units(t: torch.Tensor, p: torch.Tensor, s: Slot) -> torch.Tensor:
    """Reorder the units of slot ``s`` of ``t`` ``[B, *shape]`` by ``p`` ``[B, H]``."""
    d = 1 + s.axis
    shape = t.shape
    if s.inner > 1:
        t = t.unflatten(d, (shape[d] // s.inner, s.inner))
    index = p.view(p.shape[0], *([1] * (d - 1)), p.shape[1], *([1] * (t.dim() - d - 1)))
    return torch.take_along_dim(t, index.expand(*t.shape[:d], p.shape[1], *t.shape[d + 1 :]), d).reshape(shape)


# ---------------------------------------------------------------------- derived symmetries


def chain_symmetry(signature: Signature) -> Symmetry:
    """The unit groups of a chain of linear / convolutional layers, read from its signature.

    The signature must be ``weight [out, in, *kernel]`` (optionally followed by ``bias [out]``)
    per layer, each layer reading the previous one's outputs: ``in`` equals the previous ``out``,
    or is a multiple of it when a convolution is flattened into a linear layer.
    """
    layers: list[tuple[str, str | None, tuple[int, ...]]] = []
    sig = list(signature)
    k, ok = 0, True
    while k < len(sig) and ok:
        name, shape = sig[k]
        ok = len(shape) in (2, 3, 4)
        if not ok:
            break
        bias = None
        if ok and k + 1 < len(sig) and sig[k + 1][1] == (shape[0],):
            bias, k = sig[k + 1][0], k + 1
        layers.append((name, bias, shape))
        k += 1
    groups = []
    for (w, b, shape), (w_next, _, next_shape) in zip(layers, layers[1:]):
        out, nxt_in = shape[0], next_shape[1]
        inner = nxt_in // out if out and nxt_in % out == 0 else 0
        if inner != 1 and not (inner > 1 and len(shape) > 2 and len(next_shape) == 2):
            ok = False
            break
        incoming = (Slot(w, 0),) + ((Slot(b, 0),) if b else ())
        groups.append(UnitGroup(out, incoming, (Slot(w_next, 1, inner),)))
    if not ok or len(layers) < 2:
        raise ArchitectureMismatchError(
            "neuron tokens and unit permutations need a chain of at least two linear or convolutional "
            f"layers (weight [out, in, ...], bias [out], ...); this one is {[[n, list(s)] for n, s in signature]}. "
            "Declare its symmetry by hand (a Task's symmetry()), or use chunk tokens "
            "(scheme='chunk', or `learned-opt train --tokens chunk`)."
        )
    return Symmetry(tuple(groups))


def module_symmetry(model: nn.Module) -> Symmetry:
    """:func:`chain_symmetry` of a module made of layers and elementwise modules only.

    Raises :class:`ArchitectureMismatchError` naming the first module it cannot reason about (one
    with parameters or buffers that is not a ``Linear`` / ``Conv1d`` / ``Conv2d``, a grouped
    convolution, or anything it does not know to act on each unit alike). Layers must be
    registered in the order the forward applies them; the task contract suite checks that the
    permuted network computes the same outputs.
    """
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            continue  # a container: judged by its leaves
        what = f"{type(m).__name__} at {name!r}"
        if isinstance(m, LAYERS):
            if getattr(m, "groups", 1) != 1:
                raise ArchitectureMismatchError(f"unsupported module {what}: grouped convolutions have no "
                                                "derived unit symmetry; declare the task's symmetry() by hand, "
                                                "or train its generator with --tokens chunk --no-augment")
        elif not isinstance(m, ELEMENTWISE):
            raise ArchitectureMismatchError(
                f"unsupported module {what}: unit symmetries are derived for chains of Linear/Conv layers "
                "with elementwise activations, Flatten, Dropout and pooling; declare the task's symmetry() by hand "
                "(docs/your-own-model.md), or train its generator with --tokens chunk --no-augment"
            )
    signature = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    return chain_symmetry(signature)
