"""The population across ``torchrun`` ranks: which antithetic pairs a rank runs, and the sums.

Under ``torchrun --nproc_per_node W learned-opt meta-train ...`` every rank draws the same task,
init, minibatches and perturbations from the same generator (so they agree without talking), runs
``pairs / W`` antithetic pairs of the population (rank ``r`` runs pairs ``[r*n, (r+1)*n)``), and
the ranks sum their partial gradient estimates and outer losses with one ``all_reduce`` per
outer step: every rank then takes the same outer step. The checkpoint holds the whole population
(gathered to every rank, written by rank 0), so a run can resume with any number of ranks that
divides ``pairs``. One process is the special case ``W = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from learned_opt.errors import ConfigError

from .pes import Unroll


@dataclass(frozen=True)
class Shard:
    """Pairs ``[lo, hi)`` of ``pairs``, run by ``rank`` of ``world``."""

    rank: int
    world: int
    lo: int
    hi: int
    pairs: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def shard_of(pairs: int, rank: int = 0, world: int = 1) -> Shard:
    if pairs % world:
        raise ConfigError(f"--pairs ({pairs}) must be a multiple of the number of processes ({world}) so that "
                          "every rank runs as many antithetic pairs")
    n = pairs // world
    return Shard(rank, world, rank * n, (rank + 1) * n, pairs)


def sum_over_ranks(tensors: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """Every tensor summed over the ranks (one ``all_reduce`` of their concatenation)."""
    if shard.world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    dist.all_reduce(flat)
    out, pos = {}, 0
    for k, t in tensors.items():
        out[k] = flat[pos:pos + t.numel()].view_as(t)
        pos += t.numel()
    return out


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[0] // 2
    return t[:n], t[n:]


def _gather(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def whole_population(unroll: Unroll, shard: Shard) -> Unroll:
    """This rank's part of the population gathered into the whole (members ``+`` pairs then ``-``)."""
    if shard.world == 1:
        return unroll

    def members(t):  # [2n, ...] -> [2P, ...], keeping the antithetic layout
        plus, minus = _halves(t)
        return torch.cat([_gather(plus, shard), _gather(minus, shard)])

    return Unroll(unroll.spec, tuple(members(p) for p in unroll.params),
                  {k: tuple(members(t) for t in v) for k, v in unroll.state.items()},
                  {k: _gather(x, shard) for k, x in unroll.xi.items()}, unroll.step)


def part_of(unroll: Unroll, shard: Shard) -> Unroll:
    """This rank's members of a whole population (the inverse of :func:`whole_population`)."""
    if shard.world == 1:
        return unroll
    lo, hi, p = shard.lo, shard.hi, shard.pairs

    def members(t):
        return torch.cat([t[lo:hi], t[p + lo:p + hi]]).clone()

    return Unroll(unroll.spec, tuple(members(t) for t in unroll.params),
                  {k: tuple(members(t) for t in v) for k, v in unroll.state.items()},
                  {k: x[lo:hi].clone() for k, x in unroll.xi.items()}, unroll.step)
