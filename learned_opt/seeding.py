"""Independent random streams of one training run, derived from its seed alone."""

from __future__ import annotations

import torch


def stream_seed(seed: int, stream: int) -> int:
    """The seed of an independent RNG stream of a run (1: checkpoint steps, 2: data order, ...)."""
    return (seed * 1_000_003 + stream * 7_919 + 17) % (2**63)


def stream(seed: int, stream: int) -> torch.Generator:
    """An independent torch RNG stream of a run (1: checkpoint steps, 2: data order)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


def checkpoint_steps(total_steps: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted steps to save: 0, ``k - 2`` distinct random steps in ``[1, total)``, and ``total``.

    With ``total_steps + 1 <= k`` every step ``0..total`` is saved.
    """
    if total_steps + 1 <= k:
        return torch.arange(total_steps + 1)
    middle = torch.randperm(total_steps - 1, generator=generator)[: k - 2] + 1
    return torch.cat([torch.tensor([0]), middle.sort().values, torch.tensor([total_steps])])
