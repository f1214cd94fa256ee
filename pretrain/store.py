"""The on-disk checkpoint corpus: one safetensors file per finished run, written atomically.

Layout of a store folder::

    store.json                      format version, task name, architecture signature, num_params,
                                    and the corpus builder's settings (seed, epochs, ranges, ...)
    runs/run-00000042.safetensors   one finished run (see below)
    dropped/run-00000007.json       a run filtered out (non-finite or |w| > 10), so resume skips it
    index.json                      summary and statistics, rebuilt on demand (never authoritative)

A run file is a plain safetensors file (no pickle) holding

====================  ===========  ==============================================================
``params``            [K, P] f32   the K checkpoints' flat parameter vectors, in step order
``steps``             [K] i64      training iteration of each checkpoint (0 = the initialisation)
``metric.<name>``     [K] f32      one per task metric, e.g. ``metric.test_loss``
====================  ===========  ==============================================================

and JSON in the safetensors metadata: ``run_id``, ``seed``, ``hparams``, ``info``, ``task``.

The set of run files *is* the index of finished runs: a file appears only through an atomic
``link``/``rename`` of a fully written and fsynced temporary file in the same folder, so a killed
writer leaves at most a hidden ``.tmp`` file (ignored, cleaned up later) and never a partial run.
Linking (rather than ``os.replace``) refuses to overwrite, so two writers can never clobber or
interleave one run. Reads are lazy: the safetensors header is parsed by hand and ``params`` is
memory-mapped, so reading a few rows of a run touches only those rows and a corpus larger than RAM
can be used for training.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from learned_opt import tasks
from learned_opt.errors import StoreError
from learned_opt.fileio import atomic_write, fsync_dir, written_temp
from learned_opt.layout import Signature, signature_from_json, signature_to_json
from learned_opt.tasks import Task

STORE_FORMAT_VERSION = 1
STORE_FILE = "store.json"
INDEX_FILE = "index.json"
RUNS_DIR = "runs"
DROPPED_DIR = "dropped"
METRIC_PREFIX = "metric."
_RUN_RE = re.compile(r"^run-(\d{8})\.safetensors$")
_DROP_RE = re.compile(r"^run-(\d{8})\.json$")
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not one of ours
_DTYPES = {"F32": (np.float32, torch.float32), "I64": (np.int64, torch.int64)}


@dataclass
class RunRecord:
    """One training run: its checkpoints, their metrics, and how the run was made."""

    params: torch.Tensor  # [K, P] float32, K checkpoints in step order; memory-mapped when read
    steps: torch.Tensor  # [K] int64, training iteration of each checkpoint (0 = the init)
    metrics: dict[str, torch.Tensor]  # name -> [K] float32 ('train_loss', 'test_loss', ...)
    hparams: dict  # JSON-able: optimizer, lr, momentum, weight_decay, batch_size, epochs, ...
    seed: int
    info: dict = field(default_factory=dict)  # JSON-able extras: writer rank, seconds, ...

    @property
    def num_checkpoints(self) -> int:
        return int(self.steps.shape[0])


@dataclass(frozen=True)
class _RunHeader:
    """What the header of a run file says: where each tensor lies, and the metadata."""

    path: Path
    data_start: int  # byte offset of the data buffer
    tensors: dict  # name -> (dtype, shape, start, stop) relative to data_start
    metadata: dict  # parsed JSON values

    def tensor(self, name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (or only ``rows`` of it) through a copy-on-write memory map."""
        dtype, shape, start, stop = self.tensors[name]
        np_dtype, _ = _DTYPES[dtype]
        if math.prod(shape) == 0:
            return torch.zeros(shape, dtype=_DTYPES[dtype][1])
        # mode "c": writable private pages, so callers may modify the tensor without touching the file
        arr = np.memmap(self.path, dtype=np_dtype, mode="c", offset=self.data_start + start, shape=tuple(shape))
        if rows is not None:
            return torch.from_numpy(np.ascontiguousarray(arr[rows.numpy()]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy memmaps are fine for torch.from_numpy
            return torch.from_numpy(arr)


class Store:
    """A checkpoint corpus on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.task_name: str = meta["task"]
        # how the corpus builder made the runs (seed, epochs, ranges, ...); None in a store made
        # without them (tests, or a store from before they were recorded)
        self.settings: dict | None = meta.get("settings")
        self.signature: Signature = signature_from_json(meta["signature"])
        self.num_params: int = int(meta["num_params"])
        self.metric_names: tuple[str, ...] = tuple(meta.get("metrics", ()))
        self._headers: dict[int, _RunHeader] = {}  # small: offsets and metadata only

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, root: str | os.PathLike, task: str | Task, *, settings: dict | None = None) -> "Store":
        """Create a store for ``task`` at ``root``, or reopen the store already there (to resume).

        ``settings`` (JSON-able: how the runs are made) are recorded in a new store's
        ``store.json``; an existing store keeps its own (compare them with :attr:`settings`).

        Raises :class:`StoreError` when ``root`` cannot be written, holds unrelated files, or holds
        a store of another task or architecture.
        """
        task = tasks.get(task)
        root = Path(root).expanduser()
        meta = {
            "format_version": STORE_FORMAT_VERSION,
            "task": task.name,
            "signature": signature_to_json(task.signature),
            "num_params": task.num_params,
            "metrics": list(task.metrics),
        }
        if settings is not None:
            meta["settings"] = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        if (root / STORE_FILE).exists():
            store = cls._reopen_for(root, meta)
            try:  # a resumed writer needs its folders even if someone removed an empty one
                for sub in (root / RUNS_DIR, root / DROPPED_DIR):
                    sub.mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot write to the store at {root} ({exc.strerror or exc}): check permissions") from None
            return store
        if root.exists() and not root.is_dir():
            raise StoreError(f"cannot create a store at {root}: it is a file; choose another --out folder")
        if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise StoreError(
                f"{root} is not empty and holds no {STORE_FILE}: choose a new or empty --out folder"
            )
        try:
            for sub in (root / RUNS_DIR, root / DROPPED_DIR):
                sub.mkdir(parents=True, exist_ok=True)
            created = _write_exclusive(root / STORE_FILE, _json_bytes(meta))
        except OSError as exc:
            raise StoreError(
                f"cannot write a store at {root} ({exc.strerror or exc}): choose a writable --out folder"
            ) from None
        if not created:  # another process created it first: same rules as reopening
            return cls._reopen_for(root, meta)
        return cls(root, meta)

    @classmethod
    def _reopen_for(cls, root: Path, meta: dict) -> "Store":
        store = cls.open(root)
        if store.task_name != meta["task"]:
            raise StoreError(
                f"{root} is a store of task {store.task_name!r}, not {meta['task']!r}: "
                "choose another --out folder or the store's own task"
            )
        if store.signature != signature_from_json(meta["signature"]):
            raise StoreError(
                f"{root} was written for another architecture of task {meta['task']!r}: "
                "choose a new --out folder"
            )
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Store":
        """Open an existing store; :class:`StoreError` if it is missing, not a store, or of another version."""
        root = Path(root).expanduser()
        path = root / STORE_FILE
        if not path.is_file():
            what = "does not exist" if not root.exists() else f"has no {STORE_FILE}"
            raise StoreError(f"no checkpoint store at {root} ({what}): build one with `learned-opt corpus --out {root}`")
        try:
            meta = json.loads(path.read_text())
            version = meta["format_version"]
            meta["task"], meta["signature"], meta["num_params"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} is not a valid store description ({exc}): rebuild the store") from None
        if version != STORE_FORMAT_VERSION:
            raise StoreError(
                f"{root} has store format version {version}, this learned-opt reads version "
                f"{STORE_FORMAT_VERSION}: rebuild the corpus with this version"
            )
        return cls(root, meta)

    # ------------------------------------------------------------------ listing

    def run_path(self, run_id: int) -> Path:
        return self.root / RUNS_DIR / f"run-{int(run_id):08d}.safetensors"

    def dropped_path(self, run_id: int) -> Path:
        return self.root / DROPPED_DIR / f"run-{int(run_id):08d}.json"

    def run_ids(self) -> list[int]:
        """Ids of the finished runs, sorted (temporary files of unfinished writes are ignored)."""
        return _ids_in(self.root / RUNS_DIR, _RUN_RE)

    def dropped_ids(self) -> list[int]:
        """Ids of the runs that were filtered out (non-finite or exploding weights), sorted."""
        return _ids_in(self.root / DROPPED_DIR, _DROP_RE)

    def __len__(self) -> int:
        return len(self.run_ids())

    def has_run(self, run_id: int) -> bool:
        return self.run_path(run_id).is_file()

    def is_dropped(self, run_id: int) -> bool:
        return self.dropped_path(run_id).is_file()

    def is_done(self, run_id: int) -> bool:
        """Finished or dropped: a resumed job skips it."""
        return self.has_run(run_id) or self.is_dropped(run_id)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, task={self.task_name!r}, runs={len(self)})"

    # ------------------------------------------------------------------ writing

    def write_run(self, run_id: int, record: RunRecord, *, exist_ok: bool = False) -> bool:
        """Write one finished run atomically (temp file in the same folder, fsync, link into place).

        Never overwrites: if the run exists already, raises :class:`StoreError`, or returns ``False``
        when ``exist_ok`` (another writer finished it first). Returns ``True`` when written.
        """
        tensors = self._record_tensors(record)
        metadata = {
            "format_version": str(STORE_FORMAT_VERSION),
            "task": self.task_name,
            "run_id": str(int(run_id)),
            "seed": str(int(record.seed)),
            "hparams": json.dumps(record.hparams, sort_keys=True),
            "info": json.dumps(record.info, sort_keys=True),
        }
        path = self.run_path(run_id)
        if path.exists():
            if exist_ok:
                return False
            raise StoreError(f"run {run_id} already exists in {self.root}; runs are never overwritten")
        try:
            written = _write_exclusive(path, safetensors_save(tensors, metadata=metadata))
        except OSError as exc:
            raise StoreError(f"cannot write {path} ({exc.strerror or exc}): check free space and permissions") from None
        if not written and not exist_ok:
            raise StoreError(f"run {run_id} already exists in {self.root}; runs are never overwritten")
        return written

    def mark_dropped(self, run_id: int, *, seed: int, hparams: dict, reason: str, step: int | None = None) -> bool:
        """Record that run ``run_id`` was filtered out, so a resumed job does not redo it."""
        payload = {"run_id": int(run_id), "seed": int(seed), "hparams": hparams, "reason": reason, "step": step}
        try:
            return _write_exclusive(self.dropped_path(run_id), _json_bytes(payload))
        except OSError as exc:
            raise StoreError(f"cannot write {self.dropped_path(run_id)} ({exc.strerror or exc})") from None

    def read_dropped(self, run_id: int) -> dict:
        return json.loads(self.dropped_path(run_id).read_text())

    def _record_tensors(self, record: RunRecord) -> dict[str, torch.Tensor]:
        params, steps = record.params, record.steps
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise StoreError(
                f"params must have shape [K, {self.num_params}] for task {self.task_name!r}, got {list(params.shape)}"
            )
        k = params.shape[0]
        if steps.shape != (k,):
            raise StoreError(f"steps must have shape [{k}], got {list(steps.shape)}")
        if k > 1 and not bool((steps[1:] > steps[:-1]).all()):
            raise StoreError("checkpoint steps must be strictly increasing")
        out = {
            "params": params.detach().to("cpu", torch.float32).contiguous(),
            "steps": steps.detach().to("cpu", torch.int64).contiguous(),
        }
        for name, values in record.metrics.items():
            if values.shape != (k,):
                raise StoreError(f"metric {name!r} must have shape [{k}], got {list(values.shape)}")
            out[METRIC_PREFIX + name] = values.detach().to("cpu", torch.float32).contiguous()
        return out

    # ------------------------------------------------------------------ reading

    def _header(self, run_id: int) -> _RunHeader:
        header = self._headers.get(run_id)
        if header is None:
            path = self.run_path(run_id)
            if not path.is_file():
                raise StoreError(f"run {run_id} is not in {self.root} (finished runs: {len(self)})")
            header = _read_header(path, self.num_params, self.task_name)
            self._headers[run_id] = header
        return header

    def read_run(self, run_id: int) -> RunRecord:
        """The whole run; ``params`` is memory-mapped (copy-on-write), the rest is small."""
        h = self._header(run_id)
        steps, metrics = self.read_metrics(run_id)
        md = h.metadata
        return RunRecord(h.tensor("params"), steps, metrics, md["hparams"], md["seed"], md.get("info", {}))

    def read_metrics(self, run_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(steps [K], {metric: [K]})`` of a run, without reading its parameters."""
        h = self._header(run_id)
        metrics = {
            name[len(METRIC_PREFIX) :]: h.tensor(name).clone()
            for name in h.tensors
            if name.startswith(METRIC_PREFIX)
        }
        return h.tensor("steps").clone(), metrics

    def read_checkpoints(self, run_id: int, index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a run's parameters: ``[len(index), P]`` float32, reading only those rows."""
        h = self._header(run_id)
        k = h.tensors["params"][1][0]
        rows = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < -k or int(rows.max()) >= k):
            raise IndexError(f"checkpoint index out of range for run {run_id} with {k} checkpoints")
        return h.tensor("params", rows=rows)

    def read_info(self, run_id: int) -> tuple[int, dict, dict]:
        """``(seed, hparams, info)`` of a run, from its header only."""
        md = self._header(run_id).metadata
        return md["seed"], md["hparams"], md.get("info", {})

    def verify(self) -> None:
        """Check every run file's header and size; :class:`StoreError` naming the first bad file."""
        for run_id in self.run_ids():
            self._headers.pop(run_id, None)
            self._header(run_id)

    def clean_stale_temp(self, older_than_s: float = 600.0) -> int:
        """Remove temporary files left by killed writers (older than ``older_than_s``); returns the count."""
        removed, now = 0, time.time()
        for sub in (self.root, self.root / RUNS_DIR, self.root / DROPPED_DIR):
            for p in sub.glob(".*.tmp"):
                try:
                    if now - p.stat().st_mtime > older_than_s:
                        p.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # ------------------------------------------------------------------ statistics and index

    def stats(self, *, refresh: bool = False) -> dict:
        """A summary of the corpus (what ``learned-opt corpus`` reports), cached in ``index.json``.

        The generator's normalisation does not use it: :mod:`pretrain.dataset` estimates the
        parameter std from the training split only (``param_std_estimate``).

        Keys: ``runs``, ``dropped``, ``checkpoints``, ``bytes``, ``bytes_per_checkpoint``,
        ``num_params``, ``param_mean``, ``param_std``, ``param_absmax`` (over every stored
        checkpoint), ``metrics`` (name -> ``{min, max, mean}``), ``task``. The cache is used only
        while the set of runs is unchanged.
        """
        ids, dropped = self.run_ids(), self.dropped_ids()
        if not refresh:
            cached = self._read_index()
            if cached and cached.get("run_ids") == ids and cached.get("dropped_ids") == dropped:
                return cached["stats"]
        stats = self._compute_stats(ids, dropped)
        self.write_index(ids, dropped, stats)
        return stats

    def _compute_stats(self, ids: list[int], dropped: list[int]) -> dict:
        total = total_sq = 0.0
        count = checkpoints = nbytes = 0
        absmax = 0.0
        mins: dict[str, float] = {}
        maxs: dict[str, float] = {}
        sums: dict[str, float] = {}
        for run_id in ids:
            params = self.read_run(run_id).params
            for part in params.split(64):  # stream: one run's rows at a time, in float64
                p = part.double()
                total += float(p.sum())
                total_sq += float((p * p).sum())
                absmax = max(absmax, float(p.abs().max()))
            count += params.numel()
            checkpoints += params.shape[0]
            nbytes += self.run_path(run_id).stat().st_size
            for name, v in self.read_metrics(run_id)[1].items():
                mins[name] = min(mins.get(name, math.inf), float(v.min()))
                maxs[name] = max(maxs.get(name, -math.inf), float(v.max()))
                sums[name] = sums.get(name, 0.0) + float(v.double().sum())
        mean = total / count if count else float("nan")
        var = max(total_sq / count - mean * mean, 0.0) if count else float("nan")
        return {
            "task": self.task_name,
            "runs": len(ids),
            "dropped": len(dropped),
            "checkpoints": checkpoints,
            "bytes": nbytes,
            "bytes_per_checkpoint": nbytes / checkpoints if checkpoints else float("nan"),
            "num_params": self.num_params,
            "param_mean": mean,
            "param_std": math.sqrt(var) if count else float("nan"),
            "param_absmax": absmax,
            "metrics": {
                n: {"min": mins[n], "max": maxs[n], "mean": sums[n] / checkpoints} for n in sorted(mins)
            },
        }

    def write_index(self, ids: list[int] | None = None, dropped: list[int] | None = None, stats: dict | None = None) -> None:
        """Rewrite ``index.json`` (atomically; last writer wins, every version is valid)."""
        ids = self.run_ids() if ids is None else ids
        dropped = self.dropped_ids() if dropped is None else dropped
        stats = self._compute_stats(ids, dropped) if stats is None else stats
        payload = {"format_version": STORE_FORMAT_VERSION, "run_ids": ids, "dropped_ids": dropped, "stats": stats}
        try:
            data = _json_bytes(payload)
            atomic_write(self.root / INDEX_FILE, lambda tmp: tmp.write_bytes(data))
        except OSError:
            pass  # the index is a cache: a read-only store still works

    def _read_index(self) -> dict | None:
        try:
            return json.loads((self.root / INDEX_FILE).read_text())
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------------- file helpers


def _ids_in(folder: Path, pattern: re.Pattern) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _write_exclusive(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` with ``data``; ``False`` (and nothing changed) if it exists."""
    with written_temp(path, lambda tmp: tmp.write_bytes(data)) as tmp:
        try:
            os.link(tmp, path)  # atomic and fails if path exists: never overwrites
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: check, then rename (tiny race window)
            if path.exists():
                return False
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True


def _read_header(path: Path, num_params: int, task: str) -> _RunHeader:
    """Parse and validate a run file's safetensors header without reading its data."""

    def bad(why: str) -> StoreError:
        return StoreError(
            f"run file {path} is {why}: delete it and run `learned-opt corpus` again to retrain that run"
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("truncated (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_HEADER_LIMIT, size - 8):
                raise bad("truncated or not a safetensors file (header length out of range)")
            raw = f.read(n)
    except OSError as exc:
        raise StoreError(f"cannot read run file {path} ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
        md = header.pop("__metadata__", {})
        metadata = {
            "run_id": int(md["run_id"]),
            "seed": int(md["seed"]),
            "hparams": json.loads(md["hparams"]),
            "info": json.loads(md.get("info", "{}")),
            "task": md.get("task"),
        }
        tensors = {
            name: (t["dtype"], [int(d) for d in t["shape"]], int(t["data_offsets"][0]), int(t["data_offsets"][1]))
            for name, t in header.items()
        }
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise bad(f"corrupt (unreadable header: {exc})") from None
    end = 0
    for name, (dtype, shape, start, stop) in tensors.items():
        if dtype not in _DTYPES or stop - start != math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize:
            raise bad(f"corrupt (tensor {name!r} has an inconsistent dtype or size)")
        end = max(end, stop)
    if "params" not in tensors or "steps" not in tensors:
        raise bad("corrupt (no 'params' or 'steps' tensor)")
    shape = tensors["params"][1]
    if len(shape) != 2 or shape[1] != num_params or tensors["steps"][1] != [shape[0]]:
        raise bad(f"of another architecture or corrupt (params shape {shape}, expected [K, {num_params}])")
    if size != 8 + n + end:
        raise bad(f"truncated ({size} bytes, expected {8 + n + end})")
    if metadata["task"] is not None and metadata["task"] != task:
        raise StoreError(
            f"run file {path} is a run of task {metadata['task']!r}, not of this store's task {task!r}: "
            "move it to a store of its own task"
        )
    return _RunHeader(path, 8 + n, tensors, metadata)
