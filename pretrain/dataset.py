"""Training pairs for the generator: ``(θ_i, l_i) -> (θ_j, l_j)`` from one run of a corpus store.

What a pair is (G.pt's recipe):

* two checkpoints of the **same run**, ``i < j`` with gap ``j - i`` in ``1..max_gap`` checkpoint
  indices (G.pt: ``1..199``). Every such ordered pair of a run is one dataset item, so a run of
  ``K`` checkpoints holds ``sum_i min(max_gap, K-1-i)`` pairs (19,900 for ``K = 200``), and drawing
  items uniformly draws G.pt's "``s`` uniform in 1..199" weighted by how many starts allow it;
* conditioned on the metric of both checkpoints (``metric`` = ``l_i``, ``target`` = ``l_j``);
* in the generator's units (:class:`~learned_opt.normalization.Normalization`): parameters times
  ``0.538 / std(θ)``, metrics mapped so the corpus's range becomes ``[0, 1]``;
* augmented with **one** random permutation of hidden units applied to both ``θ_i`` and ``θ_j``
  (the task's ``random_permutations`` / ``permute``), drawn per pair from a seeded generator.

One departure is optional (``PairConfig.init_fraction``, default 0 = G.pt): a fixed share of
every batch drawn from the pairs that start at the initialisation (checkpoint 0). Uniform
drawing gives them about 1 % of the batches, while a random initialisation is where the one-step
use of the generator starts.

Runs are split into a training and a held-out part **by run id**, deterministically: a run is
held out when a hash of ``(split_seed, run_id)`` falls below ``heldout_fraction`` (at least one run
is held out when the store has two or more and the fraction is positive). A hash, rather than a
shuffle, keeps every run on its side when more runs are added to the store later.

The normalisation comes from the **training split only**: the metric range is the exact minimum
and maximum over all training checkpoints (metrics are small and read in full), the parameter std
is pooled over a seeded sample of training checkpoints (``std_sample_runs`` runs, up to
``std_sample_rows`` evenly spaced checkpoints each), so that computing it costs a few megabytes
whatever the corpus size.

Only the rows a batch needs are read (``Store.read_checkpoints``), so a corpus larger than memory
trains. Sampling is with replacement from a generator seeded by ``(seed, step)``: the position in
the data is the step number alone, which makes resuming exact and lets every rank of a
distributed job draw the same global batch and take its own stride of it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from learned_opt import tasks
from learned_opt.errors import ConfigError, LearnedOptError, StoreError
from learned_opt.layout import check_signature
from learned_opt.normalization import GPT_TARGET_STD, Normalization

from .store import Store

GPT_MAX_GAP = 199  # G.pt: θ_i -> θ_{i+s}, s uniform in 1..199


@dataclass
class PairConfig:
    """How training pairs are drawn from a store."""

    metric: str | None = None  # the conditioning metric; None: the task's default_metric
    max_gap: int = GPT_MAX_GAP  # largest j - i, in checkpoint indices
    heldout_fraction: float = 0.1  # share of runs kept out of training (by run id)
    split_seed: int = 0  # the hash salt of the train / held-out split
    augment: bool = True  # one random hidden-unit permutation per pair
    init_fraction: float = 0.0  # share of each batch drawn from pairs that start at the initialisation
    std_sample_runs: int = 64  # runs sampled to estimate the corpus-wide parameter std
    std_sample_rows: int = 16  # checkpoints read per sampled run

    def __post_init__(self) -> None:
        if self.max_gap < 1:
            raise ConfigError(f"Invalid max_gap: {self.max_gap} (must be >= 1)")
        if self.std_sample_runs < 1 or self.std_sample_rows < 1:
            raise ConfigError("std_sample_runs and std_sample_rows must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"Invalid heldout_fraction: {self.heldout_fraction} (must be in [0, 1))")
        if not 0.0 <= self.init_fraction <= 1.0:
            raise ConfigError(f"Invalid init_fraction: {self.init_fraction} (must be in [0, 1])")


# ---------------------------------------------------------------------------- seeds and split


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


# ---------------------------------------------------------------------------- store access


def _guarded(what: str, store: Store, run_id: int, fn, *args):
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
    steps, metrics = _guarded("the metrics", store, run_id, store.read_metrics, run_id)
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
        self.task = task or tasks.get(store.task_name)
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
            block = _guarded("checkpoints", self.store, run_id, self.store.read_checkpoints, run_id, torch.tensor(rows))
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


# ---------------------------------------------------------------------------- sampling


class PairSampler:
    """Global batches of pair indices (and permutations), a pure function of ``(seed, step)``.

    Every rank draws the same global batch for a step and keeps ``indices[rank::world]``, so
    ranks never overlap, resuming needs only the step number, and the data a run sees does not
    depend on how many processes share it.

    ``focus`` (pair indices, e.g. :meth:`PairDataset.start_pairs`) and ``focus_fraction`` put a
    fixed share of every batch on those pairs; the rest is drawn from all pairs.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, task: tasks.Task | None, augment: bool = True,
                 *, focus: torch.Tensor | None = None, focus_fraction: float = 0.0):
        if num_pairs < 1:
            raise StoreError("no training pairs: every training run has fewer than two checkpoints")
        if not 0.0 <= focus_fraction <= 1.0:
            raise ConfigError(f"focus_fraction must be in [0, 1], got {focus_fraction}")
        self.num_pairs, self.batch_size, self.seed = int(num_pairs), int(batch_size), int(seed)
        self.task, self.augment = task, augment and task is not None
        self.focus = focus if focus is not None and focus.numel() and focus_fraction > 0 else None
        self.num_focus = 0 if self.focus is None else round(focus_fraction * self.batch_size)

    def global_batch(self, step: int, stream: str = "train") -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Pair indices ``[B]`` and per-layer permutations ``[B, H_l]`` (or None) for ``step``."""
        gen = seeded_generator("pairs", stream, self.seed, step)
        indices = torch.randint(self.num_pairs, (self.batch_size,), generator=gen)
        if self.num_focus:
            pick = torch.randint(self.focus.numel(), (self.num_focus,), generator=gen)
            indices[: self.num_focus] = self.focus[pick]
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


# ---------------------------------------------------------------------------- the corpus as pairs


@dataclass
class PairCorpus:
    """A store opened for training: split, normalisation and the two pair datasets."""

    store: Store
    task: tasks.Task
    metric: str
    split: Split
    normalization: Normalization
    train: PairDataset
    heldout: PairDataset | None
    config: PairConfig
    param_std: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The corpus summary recorded in checkpoints and manifests."""
        return {
            "store": str(Path(self.store.root).resolve()),
            "task": self.task.name,
            "metric": self.metric,
            "runs_total": len(self.store),
            "runs_train": len(self.train.run_ids),
            "runs_heldout": 0 if self.heldout is None else len(self.heldout.run_ids),
            "checkpoints_train": self.train.num_checkpoints,
            "checkpoints_heldout": 0 if self.heldout is None else self.heldout.num_checkpoints,
            "pairs_train": len(self.train),
            "pairs_heldout": 0 if self.heldout is None else len(self.heldout),
            "runs_skipped": list(self.train.skipped_runs) + ([] if self.heldout is None else list(self.heldout.skipped_runs)),
            "dropped_runs": len(self.store.dropped_ids()),
            "param_std": self.param_std,
            "metric_range": [self.normalization.metric_lo, self.normalization.metric_hi],
            "max_gap": self.config.max_gap,
            "augment": self.config.augment,
            "init_fraction": self.config.init_fraction,
            "split": self.split.to_dict(),
        }


def open_store(root: str | Path, task: str | None = None) -> Store:
    """Open a store, checking that it holds runs and (when given) runs of ``task``."""
    store = Store.open(root)
    if task is not None and store.task_name != tasks.get(task).name:
        raise StoreError(
            f"the store at {root} holds runs of task {store.task_name!r}, not {task!r}: pass "
            f"--task {store.task_name} or point --store at a {task} corpus"
        )
    expected = tasks.get(store.task_name).signature
    check_signature(expected, store.signature, what=f"the store at {root}")
    if len(store) == 0:
        raise StoreError(
            f"the store at {root} holds no runs: build a corpus first with `learned-opt corpus --out {root}`"
        )
    return store


def param_std_estimate(store: Store, run_ids: Sequence[int], sample_runs: int, sample_rows: int,
                       num_checkpoints: dict[int, int], seed: int) -> float:
    """Pooled std of all parameter values over a seeded sample of checkpoints of ``run_ids``."""
    gen = seeded_generator("param-std", seed)
    order = torch.randperm(len(run_ids), generator=gen)[:sample_runs].tolist()
    total = total_sq = count = 0.0
    for k in order:
        run_id = run_ids[k]
        n = num_checkpoints[run_id]
        rows = sorted({round(x) for x in torch.linspace(0, n - 1, min(sample_rows, n)).tolist()})
        block = _guarded("checkpoints", store, run_id, store.read_checkpoints, run_id, torch.tensor(rows))
        block = torch.as_tensor(block).double()  # [rows, P]
        if not torch.isfinite(block).all():
            raise StoreError(
                f"run {run_id} in the store at {store.root} holds non-finite parameters; "
                "delete it and rerun `learned-opt corpus`"
            )
        total += block.sum().item()
        total_sq += block.square().sum().item()
        count += block.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if not std > 0:
        raise StoreError(f"the parameters in the store at {store.root} have zero spread; the corpus is degenerate")
    return std


def open_pairs(
    root: str | Path,
    config: PairConfig | None = None,
    *,
    task: str | None = None,
    split: Split | None = None,
    normalization: Normalization | None = None,
) -> PairCorpus:
    """Open a store as training pairs: split the runs, compute (or reuse) the normalisation.

    ``split`` and ``normalization`` restore a recorded split / normalisation (a resumed training
    job must see exactly the data it saw before); without them they are computed from the store.
    """
    config = config or PairConfig()
    store = open_store(root, task)
    task_obj = tasks.get(store.task_name)
    metric = task_obj.metric(config.metric).name
    if split is None:
        split = split_runs(store.run_ids(), config.heldout_fraction, config.split_seed)
    else:
        missing = [r for r in split.train + split.heldout if not store.has_run(r)]
        if missing:
            raise StoreError(
                f"the store at {root} lacks runs {missing[:10]} that this training job was started "
                "with; point --store at the original corpus or train into a new --out"
            )
    values = {r: read_run_metrics(store, r, metric) for r in split.train + split.heldout}
    train_values = [values[r] for r in split.train]
    if normalization is None:
        lo = min(float(v.min()) for v in train_values)
        hi = max(float(v.max()) for v in train_values)
        if not hi > lo:
            raise StoreError(
                f"the metric {metric!r} is constant ({lo}) over the training runs in the store at {root}; "
                "the generator cannot be conditioned on it: choose another --metric"
            )
        counts = {r: len(values[r]) for r in split.train}
        std = param_std_estimate(store, list(split.train), config.std_sample_runs, config.std_sample_rows,
                                 counts, config.split_seed)
        normalization = Normalization.from_stats(std, lo, hi)
    std = GPT_TARGET_STD / normalization.param_scale
    train = PairDataset(store, split.train, normalization, metric, max_gap=config.max_gap, task=task_obj,
                        metric_values=values)
    heldout = None
    if split.heldout:
        heldout = PairDataset(store, split.heldout, normalization, metric, max_gap=config.max_gap,
                              task=task_obj, metric_values=values)
    notes = []
    if heldout is None or len(heldout) == 0:
        notes.append("no held-out runs: held-out loss is not measured")
    if len(train) == 0:
        raise StoreError(
            f"the training runs in the store at {root} hold no pairs (every run has fewer than two "
            "checkpoints); rebuild the corpus with more checkpoints per run"
        )
    return PairCorpus(store, task_obj, metric, split, normalization, train, heldout, config, std, notes)


__all__ = [
    "GPT_MAX_GAP",
    "PairBatch",
    "PairConfig",
    "PairCorpus",
    "PairDataset",
    "PairSampler",
    "Split",
    "StepBatches",
    "derive_seed",
    "num_pairs_in_run",
    "open_pairs",
    "open_store",
    "param_std_estimate",
    "read_run_metrics",
    "seeded_generator",
    "split_runs",
]
