"""Pairs of checkpoints of one run as training examples: reading runs from the store, and the dataset."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch.utils.data import Dataset

from learned_opt import tasks
from learned_opt.errors import LearnedOptError, StoreError
from learned_opt.normalization import Normalization

from ..store import Store
from .config import GPT_MAX_GAP


def guarded(what: str, store: Store, run_id: int, fn, *args):
    """Call a store reader; turn anything but the package's own errors into a one-line StoreError."""
    try:
        return fn(*args)
    except LearnedOptError:
        raise
    except Exception as exc:  # a truncated or garbled run file surfaces as OSError/RuntimeError/...
        raise StoreError(
            f"could not read {what} of run {run_id} in the store at {store.root}: "
            f"{type(exc).__name__}: {exc}. Delete that run's file and rerun `learned-opt corpus`, "
            "which rebuilds missing runs"
        ) from None


def read_run_metrics(store: Store, run_id: int, metric: str) -> torch.Tensor:
    """One run's values of ``metric`` (``[K]`` float32), checked for shape and finiteness."""
    steps, metrics = guarded("the metrics", store, run_id, store.read_metrics, run_id)
    if metric not in metrics:
        raise StoreError(
            f"run {run_id} in the store at {store.root} has no metric {metric!r} "
            f"(it has {sorted(metrics)}); choose one of those with --metric"
        )
    values = torch.as_tensor(metrics[metric], dtype=torch.float32).reshape(-1)
    if values.numel() != len(steps):
        raise StoreError(
            f"run {run_id} in the store at {store.root} has {len(steps)} checkpoints but "
            f"{values.numel()} values of {metric!r}; the run file is corrupt: delete it and rerun "
            "`learned-opt corpus`"
        )
    if not torch.isfinite(values).all():
        raise StoreError(
            f"run {run_id} in the store at {store.root} has non-finite {metric!r} values; "
            "delete the run and rerun `learned-opt corpus`"
        )
    return values


def num_pairs_in_run(num_checkpoints: int, max_gap: int) -> int:
    """Ordered pairs ``i < j <= i + max_gap`` among ``num_checkpoints`` checkpoints."""
    return sum(min(max_gap, num_checkpoints - 1 - i) for i in range(max(num_checkpoints - 1, 0)))


# ---------------------------------------------------------------------------- the dataset


@dataclass
class PairBatch:
    """A batch of training pairs, in the generator's units unless named ``raw_*``."""

    theta: torch.Tensor  # [B, P] starting parameters θ_i (normalised)
    theta_next: torch.Tensor  # [B, P] later parameters θ_j (normalised): the diffusion target x0
    metric: torch.Tensor  # [B] metric of θ_i (normalised)
    target: torch.Tensor  # [B] metric of θ_j (normalised): the prompt
    raw_metric: torch.Tensor  # [B] metric of θ_i, raw
    raw_target: torch.Tensor  # [B] metric of θ_j, raw

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "PairBatch":
        """Page-locked copies (``DataLoader(pin_memory=True)`` calls this), for fast host-to-GPU copies."""
        return PairBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def cond(self) -> dict[str, torch.Tensor]:
        """The generator's conditioning: ``model(x_t, t, **batch.cond())``."""
        return {"theta": self.theta, "metric": self.metric, "target": self.target}

    def __len__(self) -> int:
        return self.theta.shape[0]


class PairDataset(Dataset):
    """Every pair ``(run, i, j)`` with ``i < j <= i + max_gap`` of the given runs, as one index.

    ``dataset[k]`` returns one pair (no augmentation) as a dict of tensors; :meth:`batch` reads a
    whole batch grouped by run (one ``read_checkpoints`` per run) and applies the permutations.
    """

    def __init__(
        self,
        store: Store,
        run_ids: Sequence[int],
        normalization: Normalization,
        metric: str,
        *,
        max_gap: int = GPT_MAX_GAP,
        task: tasks.Task | None = None,
        metric_values: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.store = store
        self.normalization = normalization
        self.metric_name = metric
        self.max_gap = int(max_gap)
        self.task = task or store.task()
        # Metrics are small ([K] per run): keep them all in memory.
        values = metric_values or {}
        self.metric_values = {int(r): values.get(int(r)) for r in run_ids}
        for r, v in self.metric_values.items():
            if v is None:
                self.metric_values[r] = read_run_metrics(store, r, metric)
        self.run_ids = tuple(r for r in self.metric_values if len(self.metric_values[r]) >= 2)
        self.skipped_runs = tuple(r for r in self.metric_values if len(self.metric_values[r]) < 2)
        counts = [num_pairs_in_run(len(self.metric_values[r]), self.max_gap) for r in self.run_ids]
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)
        self._starts_cache: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- indexing

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def num_checkpoints(self) -> int:
        return sum(len(self.metric_values[r]) for r in self.run_ids)

    def _pair_starts(self, k: int) -> list[int]:
        """Cumulative pair counts per start index ``i`` for a run of ``k`` checkpoints."""
        if k not in self._starts_cache:
            acc, out = 0, [0]
            for i in range(k - 1):
                acc += min(self.max_gap, k - 1 - i)
                out.append(acc)
            self._starts_cache[k] = out
        return self._starts_cache[k]

    def start_pairs(self, start: int = 0) -> torch.Tensor:
        """Indices ``[N]`` of every pair that starts at checkpoint ``start`` (0: the initialisation)."""
        out = []
        for r, run_id in enumerate(self.run_ids):
            k = len(self.metric_values[run_id])
            if start < k - 1:
                first = self._offsets[r] + self._pair_starts(k)[start]
                out.append(torch.arange(first, first + min(self.max_gap, k - 1 - start)))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def late_pairs(self, max_gap: int | None = None) -> torch.Tensor:
        """Indices ``[N]`` of every pair that starts in the second half of its run (at checkpoint
        ``k // 2`` or later of ``k``): updates of networks that are already well trained. With
        ``max_gap``, only those whose gap is at most that: the next few steps of a run, not where
        it ends."""
        out = []
        for r, run_id in enumerate(self.run_ids):
            k = len(self.metric_values[run_id])
            starts = self._pair_starts(k)
            if max_gap is None or max_gap >= self.max_gap:
                out.append(torch.arange(self._offsets[r] + starts[k // 2], self._offsets[r + 1]))
                continue
            for i in range(k // 2, k - 1):  # a start's pairs are stored by gap, 1 first
                first = self._offsets[r] + starts[i]
                out.append(torch.arange(first, first + min(max_gap, starts[i + 1] - starts[i])))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def pair(self, index: int) -> tuple[int, int, int]:
        """``(run_id, i, j)`` of pair number ``index``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        r = bisect.bisect_right(self._offsets, index) - 1
        run_id, local = self.run_ids[r], index - self._offsets[r]
        starts = self._pair_starts(len(self.metric_values[run_id]))
        i = bisect.bisect_right(starts, local) - 1
        return run_id, i, i + 1 + (local - starts[i])

    # ---------------------------------------------------------------- reading

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        b = self.batch([index])
        return {
            "theta": b.theta[0],
            "theta_next": b.theta_next[0],
            "metric": b.metric[0],
            "target": b.target[0],
            "raw_metric": b.raw_metric[0],
            "raw_target": b.raw_target[0],
        }

    def batch(self, indices: Sequence[int] | torch.Tensor, perms: Sequence[torch.Tensor] | None = None) -> PairBatch:
        """Pairs ``indices`` as one batch; ``perms[l]`` ``[B, H_l]`` permutes θ and θ′ of each pair alike."""
        triples = [self.pair(int(k)) for k in indices]
        n, p = len(triples), self.store.num_params
        needed: dict[int, set[int]] = {}
        for run_id, i, j in triples:
            needed.setdefault(run_id, set()).update((i, j))
        # One read per run of the distinct checkpoints the batch needs, stacked into one table.
        blocks, where = [], {}
        for run_id, rows in needed.items():
            rows = sorted(rows)
            block = guarded("checkpoints", self.store, run_id, self.store.read_checkpoints, run_id, torch.tensor(rows))
            block = torch.as_tensor(block, dtype=torch.float32)  # [len(rows), P]
            if block.shape != (len(rows), p):
                raise StoreError(
                    f"run {run_id} in the store at {self.store.root} returned checkpoints of shape "
                    f"{list(block.shape)}, expected {[len(rows), p]}: delete the run and rerun `learned-opt corpus`"
                )
            where.update({(run_id, row): len(where) + k for k, row in enumerate(rows)})
            blocks.append(block)
        table = torch.cat(blocks)  # [C, P], C distinct checkpoints
        if not torch.isfinite(table).all():
            bad = [r for r, blk in zip(needed, blocks) if not torch.isfinite(blk).all()]
            raise StoreError(
                f"run {bad[0]} in the store at {self.store.root} holds non-finite parameters: delete it "
                "and rerun `learned-opt corpus`"
            )
        rows = [where[(r, i)] for r, i, _ in triples] + [where[(r, j)] for r, _, j in triples]
        both = table[torch.tensor(rows)]  # [2B, P]: every θ_i, then every θ_j
        if perms is not None:
            both = self.task.permute(both, [q.repeat(2, 1) for q in perms])  # the same permutation for θ_i and θ_j
        both = self.normalization.params(both)
        raw_metric = torch.stack([self.metric_values[r][i] for r, i, _ in triples])  # [B]
        raw_target = torch.stack([self.metric_values[r][j] for r, _, j in triples])  # [B]
        norm = self.normalization
        return PairBatch(both[:n], both[n:], norm.metric(raw_metric), norm.metric(raw_target), raw_metric, raw_target)
