"""Seeds derived from one another, and the train / held-out split of a corpus's runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``parts`` (see :func:`derive_seed`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


@dataclass(frozen=True)
class Split:
    """Which runs train and which are held out."""

    train: tuple[int, ...]
    heldout: tuple[int, ...]
    heldout_fraction: float
    seed: int

    def to_dict(self) -> dict:
        return {
            "train": list(self.train),
            "heldout": list(self.heldout),
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Split":
        return cls(
            tuple(int(r) for r in data["train"]),
            tuple(int(r) for r in data["heldout"]),
            float(data["heldout_fraction"]),
            int(data["seed"]),
        )


def split_runs(run_ids: Sequence[int], heldout_fraction: float = 0.1, seed: int = 0) -> Split:
    """Deterministic train / held-out split by run id (a hash of ``(seed, run_id)``)."""
    ids = sorted(int(r) for r in run_ids)
    u = {r: derive_seed("split", seed, r) / float(1 << 63) for r in ids}  # uniform in [0, 1)
    heldout = [r for r in ids if u[r] < heldout_fraction]
    if not heldout and heldout_fraction > 0 and len(ids) >= 2:
        heldout = [min(ids, key=lambda r: u[r])]
    if len(heldout) == len(ids):  # always keep something to train on
        heldout.remove(max(heldout, key=lambda r: u[r]))
    held = set(heldout)
    return Split(tuple(r for r in ids if r not in held), tuple(heldout), heldout_fraction, seed)
