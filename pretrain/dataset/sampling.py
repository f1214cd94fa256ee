"""Drawing batches of pairs: one batch per step, a pure function of the step."""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from learned_opt import tasks
from learned_opt.errors import ConfigError, StoreError
from .pairs import PairBatch, PairDataset
from .split import seeded_generator


class PairSampler:
    """Global batches of pair indices (and permutations), a pure function of ``(seed, step)``.

    Every rank draws the same global batch for a step and keeps ``indices[rank::world]``, so
    ranks never overlap, resuming needs only the step number, and the data a run sees does not
    depend on how many processes share it.

    ``focus`` is a sequence of ``(pair indices, fraction)`` (e.g. :meth:`PairDataset.start_pairs`,
    :meth:`PairDataset.late_pairs`): each puts a fixed share of every batch on its pairs, in order
    at the front of the batch; the rest is drawn from all pairs.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, task: tasks.Task | None, augment: bool = True,
                 *, focus: Sequence[tuple[torch.Tensor, float]] = ()):
        if num_pairs < 1:
            raise StoreError("no training pairs: every training run has fewer than two checkpoints")
        fractions = [float(f) for _, f in focus]
        if not all(0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
            raise ConfigError(f"focus fractions must each be in [0, 1] and sum to at most 1, got {fractions}")
        self.num_pairs, self.batch_size, self.seed = int(num_pairs), int(batch_size), int(seed)
        self.task, self.augment = task, augment and task is not None
        # (pairs, how many of each batch): the running total is rounded, so that the counts add up to
        # the shares' sum; groups with no pairs or no share are dropped
        self.focus, total, taken = [], 0.0, 0
        for pairs, f in focus:
            total += float(f)
            count = min(round(total * self.batch_size), self.batch_size) - taken
            taken += count
            if pairs.numel() and f > 0 and count > 0:
                self.focus.append((pairs, count))

    def global_batch(self, step: int, stream: str = "train") -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Pair indices ``[B]`` and per-layer permutations ``[B, H_l]`` (or None) for ``step``."""
        gen = seeded_generator("pairs", stream, self.seed, step)
        indices = torch.randint(self.num_pairs, (self.batch_size,), generator=gen)
        at = 0
        for pairs, count in self.focus:
            pick = torch.randint(pairs.numel(), (count,), generator=gen)
            indices[at: at + count] = pairs[pick]
            at += count
        perms = self.task.random_permutations(self.batch_size, gen) if self.augment else None
        return indices, perms

    @staticmethod
    def shard(indices: torch.Tensor, perms: list[torch.Tensor] | None, rank: int, world: int):
        """This rank's stride of a global batch."""
        return indices[rank::world], None if perms is None else [q[rank::world] for q in perms]


class StepBatches(Dataset):
    """Item ``k`` is this rank's batch of step ``start + k``: wrap it in a ``DataLoader`` whose
    workers build batches ahead of the training loop. Each batch is a pure function of its step, so
    the number of workers never changes what the model sees."""

    def __init__(self, dataset: PairDataset, sampler: PairSampler, start: int, end: int, rank: int = 0, world: int = 1):
        self.dataset, self.sampler = dataset, sampler
        self.start, self.end, self.rank, self.world = int(start), int(end), int(rank), int(world)

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __getitem__(self, k: int) -> PairBatch:
        indices, perms = self.sampler.global_batch(self.start + k)
        indices, perms = PairSampler.shard(indices, perms, self.rank, self.world)
        return self.dataset.batch(indices, perms)

    def loader(self, workers: int, device: torch.device) -> DataLoader:
        """These batches, built ahead by ``workers`` processes (negative: none on the CPU, up to 4
        on CUDA), pinned for a CUDA ``device``."""
        if workers < 0:
            workers = 0 if device.type == "cpu" else max(0, min(4, (os.cpu_count() or 1) // self.world - 1))
        return DataLoader(self, batch_size=None, shuffle=False, num_workers=workers,
                          pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
