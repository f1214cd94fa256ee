"""The collectives of a generative update under ``torch.distributed``: every rank must agree on
θ′ and on the accept decision. Without an initialised process group each helper is the identity.
"""

from __future__ import annotations

from typing import cast

import torch


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def agree(new: torch.Tensor | None, error: str | None, theta: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    """Under torch.distributed: fail everywhere if any rank failed, else take rank 0's θ′."""
    if not distributed():
        return new, error
    if not all_ranks(error is None, theta.device):
        return None, error or "the generator failed on another rank"
    torch.distributed.broadcast(cast(torch.Tensor, new), src=0)  # no rank failed: every rank drew its sample
    return new, None


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, as a copy (``t`` itself when not distributed)."""
    if not distributed():
        return t
    t = t.clone()
    torch.distributed.broadcast(t, src=0)
    return t


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (the flag itself when not distributed)."""
    return all_ranks_each([flag], device)[0]


def all_ranks_each(flags: list[bool], device: torch.device) -> list[bool]:
    """Per entry, whether it holds on every rank (the flags themselves when not distributed)."""
    if not distributed():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's integer on every rank (the value itself when not distributed)."""
    if not distributed():
        return value
    t = torch.tensor([int(value)], device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank (the flag itself when not distributed)."""
    return bool(broadcast_int(int(flag), device))
