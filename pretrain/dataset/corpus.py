"""A store opened as pairs: the split, the normalisation and the datasets (:func:`open_pairs`)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from learned_opt import tasks
from learned_opt.errors import StoreError
from learned_opt.layout import check_signature
from learned_opt.normalization import GPT_TARGET_STD, Normalization

from ..store import Store
from .config import PairConfig
from .pairs import PairDataset, guarded, read_run_metrics
from .split import Split, seeded_generator, split_runs


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

    def metric_trained(self) -> list[float]:
        """``[lo, hi]`` of the metric over every checkpoint of the training runs: the normalisation's
        range for a fresh training; wider for a fine-tune on runs that reach past its source's."""
        values = [self.train.metric_values[r] for r in self.train.run_ids]
        return [min(float(v.min()) for v in values), max(float(v.max()) for v in values)]

    def summary(self) -> dict:
        """The corpus summary recorded in checkpoints and manifests."""
        return {
            "store": Path(self.store.root).resolve().name,  # named, not located: manifests travel
            "task": self.task.name,
            "task_source": tasks.source_of(self.task),
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
            "metric_trained": self.metric_trained(),
            "max_gap": self.config.max_gap,
            "augment": self.config.augment,
            "init_fraction": self.config.init_fraction,
            "late_fraction": self.config.late_fraction,
            **({"late_max_gap": self.config.late_max_gap} if self.config.late_max_gap is not None else {}),
            "split": self.split.to_dict(),
            "store_settings_sha256": settings_fingerprint(self.store),
        }


def settings_fingerprint(store: Store) -> str | None:
    """The sha256 of the settings ``learned-opt corpus`` recorded in ``store`` (seed, epochs,
    examples, checkpoints, ranges, warm start): two stores with the same one hold the same runs
    under the same run ids. None for a store without recorded settings."""
    if store.settings is None:
        return None
    return hashlib.sha256(json.dumps(store.settings, sort_keys=True).encode()).hexdigest()


def open_store(root: str | Path, task: str | None = None) -> Store:
    """Open a store, checking that it holds runs and (when given) runs of ``task``."""
    store = Store.open(root)
    expected = store.task(task).signature
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
        block = guarded("checkpoints", store, run_id, store.read_checkpoints, run_id, torch.tensor(rows))
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
    recorded_settings: str | None = None,
) -> PairCorpus:
    """Open a store as training pairs: split the runs, compute (or reuse) the normalisation.

    ``split`` and ``normalization`` restore a recorded split / normalisation (a resumed training
    job must see exactly the data it saw before); without them they are computed from the store.
    ``recorded_settings`` (a resumed job's :func:`settings_fingerprint`) refuses a store built
    with other settings (:class:`StoreError`).
    """
    config = config or PairConfig()
    store = open_store(root, task)
    task_obj = store.task(task)
    metric = task_obj.metric(config.metric).name
    if split is None:
        split = split_runs(store.run_ids(), config.heldout_fraction, config.split_seed)
    else:
        if recorded_settings is not None and settings_fingerprint(store) not in (None, recorded_settings):
            raise StoreError(
                f"the store at {root} was built with other settings (seed, epochs, examples, warm start, ...) than "
                "the corpus this training job was started with; point --store at that corpus or train into a new --out"
            )
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
