"""Strict checks of values read from JSON files the package reads (generator manifests, store.json).

``json.loads`` gives any JSON value anywhere; these helpers say whether a value has the type and
range a field needs, and raise ``ValueError`` with a short description otherwise, which each
reader turns into its own error type (:class:`WeightsError`, :class:`StoreError`) naming the file.
"""

from __future__ import annotations

import math
from typing import Any

from .layout import Signature

MAX_TENSORS = 100_000  # tensors in one architecture signature
MAX_NDIM = 8  # dimensions of one tensor
MAX_PARAMS = 2**31 - 1  # parameters of one network (a flat float32 vector must stay indexable)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (``true``/``false`` are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_field(value: Any, name: str, *, lo: int = 0, hi: int | None = None) -> int:
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return value


def number_field(value: Any, name: str) -> float:
    if not is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def str_field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{name} must be a non-empty string without NUL characters, got {value!r}")
    return value


def signature(data: Any, name: str = "signature") -> Signature:
    """An architecture signature from its JSON form ``[[name, [d0, ...]], ...]``, every dimension
    a positive integer, within :data:`MAX_TENSORS`, :data:`MAX_NDIM` and :data:`MAX_PARAMS`."""
    if not isinstance(data, list) or not data or len(data) > MAX_TENSORS:
        raise ValueError(f"{name} must be a non-empty list of [name, shape] pairs (at most {MAX_TENSORS})")
    out, total, seen = [], 0, set()
    for entry in data:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise ValueError(f"{name} entry {str(entry)[:80]} is not a [name, [d0, d1, ...]] pair")
        tensor, shape = entry
        if tensor in seen:
            raise ValueError(f"{name} names tensor {tensor!r} twice")
        seen.add(tensor)
        if len(shape) > MAX_NDIM or not all(is_int(d) and 1 <= d <= MAX_PARAMS for d in shape):
            raise ValueError(f"{name}: tensor {tensor!r} has shape {str(shape)[:80]}; dimensions must be positive integers")
        total += math.prod(shape)
        if total > MAX_PARAMS:
            raise ValueError(f"{name} has more than {MAX_PARAMS} parameters")
        out.append((tensor, tuple(shape)))
    return tuple(out)
