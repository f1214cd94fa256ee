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

and JSON in the safetensors metadata: ``run_id``, ``seed``, ``hparams``, ``info``, ``task``, and
``checksums`` (the sha256 of each tensor's data, written with it; see :mod:`pretrain.runfile`).

**Checksums.** A run's data is checked against its checksums the first time a process reads it,
and :meth:`Store.verify_all` checks a whole store. A corrupt run is *refused*, not skipped (that
would change the train/validation split of every generator trained on the store): a
:class:`StoreError` names the file and says to delete it and rerun ``learned-opt corpus``, which
retrains exactly the missing runs. Run files written before checksums existed load unchecked.

**Writers.** :meth:`Store.create` is the way to open a store for adding runs: it creates
``store.json`` first (so a job killed while creating the store leaves a store a rerun resumes),
checks that the store can be written, and takes the store's writer lock (see
:mod:`pretrain.store_lock`): a second ``corpus`` process on the same store is refused, while the
ranks of one ``torchrun`` job share it (only rank 0 creates the store). :meth:`Store.open` takes
no lock: readers (training, evaluation) never block.

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
import os
import weakref
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save as safetensors_save

from learned_opt import tasks
from learned_opt.errors import StoreError, UnknownTaskError
from learned_opt.fileio import write_exclusive
from learned_opt.layout import Signature, signature_from_json, signature_to_json
from learned_opt.tasks import Task

from .runfile import CHECKSUMS_KEY, METRIC_PREFIX, RunHeader, RunRecord, checksums, read_header, record_tensors
from .store_lock import acquire_writer, check_writable, remove_stale_temp
from .store_meta import (DROPPED_DIR, RUNS_DIR, STORE_FILE, STORE_FORMAT_VERSION, holds_no_runs, ids_in, json_bytes,
                         read_meta, replace_meta, write_settings)
from .store_stats import INDEX_FILE, cached_stats, write_index

__all__ = ["METRIC_PREFIX", "STORE_FILE", "STORE_FORMAT_VERSION", "RunRecord", "Store"]


class Store:
    """A checkpoint corpus on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.task_name: str = meta["task"]
        # where a task loaded by reference came from ("file.py:Class"); None for registered tasks
        self.task_source: str | None = meta.get("task_source")
        # how the corpus builder made the runs (seed, epochs, ranges, ...); None in a store made
        # without them (tests, or a store from before they were recorded)
        self.settings: dict | None = meta.get("settings")
        self.signature: Signature = signature_from_json(meta["signature"])
        self.num_params: int = int(meta["num_params"])
        self.metric_names: tuple[str, ...] = tuple(meta.get("metrics", ()))
        self._headers: dict[int, RunHeader] = {}  # small: offsets and metadata only
        self._release = _no_lock  # a writer lock's release, set by create()

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, root: str | os.PathLike, task: str | Task, *, settings: dict | None = None) -> "Store":
        """Create a store for ``task`` at ``root``, or reopen the store already there (to resume).

        ``settings`` (JSON-able: how the runs are made) are recorded in a new store's
        ``store.json``; an existing store keeps its own (compare them with :attr:`settings`).

        Raises :class:`StoreError` when ``root`` cannot be written, holds unrelated files, or holds
        a store of another task, or runs of another architecture (a store of this task that holds no
        run yet takes the new architecture).
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
        if tasks.source_of(task) != task.name:  # a user task: how train, eval and export find it again
            meta["task_source"] = tasks.source_of(task)
        if settings is not None:
            meta["settings"] = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        if not (root / STORE_FILE).exists():
            if root.exists() and not root.is_dir():
                raise StoreError(f"cannot create a store at {root}: it is a file; choose another --out folder")
            if root.is_dir() and not holds_no_runs(root):
                raise StoreError(
                    f"{root} is not empty and holds no {STORE_FILE}: choose a new or empty --out folder"
                )
            try:  # store.json first: whatever happens after it, a rerun finds a store to resume
                root.mkdir(parents=True, exist_ok=True)
                write_exclusive(root / STORE_FILE, json_bytes(meta))
            except OSError as exc:
                raise StoreError(
                    f"cannot write a store at {root} ({exc.strerror or exc}): choose a writable --out folder"
                ) from None
        # whoever wrote store.json (this call, a killed earlier one, another process): same rules
        try:  # a resumed writer needs its folders even if someone removed an empty one
            for sub in (root / RUNS_DIR, root / DROPPED_DIR):
                sub.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write to the store at {root} ({exc.strerror or exc}): check permissions") from None
        check_writable(root, (RUNS_DIR, DROPPED_DIR))
        release = acquire_writer(root)
        try:
            store = cls._reopen_for(root, meta)
        except StoreError:
            try:  # a store of this task holding no run yet (a first call refused before it wrote any)
                store = cls._take_over(root, meta)
            except BaseException:
                release()
                raise
        store._release = weakref.finalize(store, release)
        return store

    @classmethod
    def _take_over(cls, root: Path, meta: dict) -> "Store":
        """Under the writer lock: ``root``'s store of ``meta``'s task, given ``meta`` if it holds no run."""
        if cls.open(root).task_name == meta["task"] and holds_no_runs(root, (STORE_FILE, INDEX_FILE)):
            try:
                replace_meta(root, meta)
            except OSError as exc:
                raise StoreError(f"cannot write {root / STORE_FILE} ({exc.strerror or exc}): check permissions") from None
        return cls._reopen_for(root, meta)

    def task(self, override: str | Task | None = None) -> Task:
        """The store's task: ``override`` (a ``--task``) if given, else the registered task of its
        name, else the file or module it was loaded from when the store was made."""
        if override is not None and not (isinstance(override, str) and override == self.task_name):
            task = tasks.get(override)
            if task.name != self.task_name:
                raise StoreError(f"the store at {self.root} holds runs of task {self.task_name!r}, not "
                                 f"{task.name!r}: pass the store's own task or point --store at a {task.name} corpus")
            return task
        try:
            return tasks.get(self.task_name)
        except UnknownTaskError:
            if not self.task_source:
                raise
        try:
            return tasks.get(self.task_source)
        except UnknownTaskError as exc:
            raise StoreError(f"the store at {self.root} was built for task {self.task_source}, which cannot be "
                             f"loaded now ({exc}); pass --task path/to/file.py:ClassName") from None

    def check_writable(self) -> None:
        """:class:`StoreError` unless new runs can be written (call before training any);
        :meth:`create` calls it."""
        check_writable(self.root, (RUNS_DIR, DROPPED_DIR))

    def record_settings(self, settings: dict) -> None:
        """Record new corpus settings in ``store.json`` (the builder's, when a store grows a warm start)."""
        self.settings = write_settings(self.root, settings)["settings"]

    def close(self) -> None:
        """Release the writer lock taken by :meth:`create` (also released when the store is gone)."""
        self._release()

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
        meta = read_meta(root)  # every field checked: StoreError naming the file and field
        return cls(root, meta)

    # ------------------------------------------------------------------ listing

    def run_path(self, run_id: int) -> Path:
        return self.root / RUNS_DIR / f"run-{int(run_id):08d}.safetensors"

    def dropped_path(self, run_id: int) -> Path:
        return self.root / DROPPED_DIR / f"run-{int(run_id):08d}.json"

    def run_ids(self) -> list[int]:
        """Ids of the finished runs, sorted (temporary files of unfinished writes are ignored)."""
        return ids_in(self.root / RUNS_DIR, ".safetensors")

    def dropped_ids(self) -> list[int]:
        """Ids of the runs that were filtered out (non-finite or exploding weights), sorted."""
        return ids_in(self.root / DROPPED_DIR, ".json")

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
        tensors = record_tensors(record, self.num_params, self.task_name)
        metadata = {
            "format_version": str(STORE_FORMAT_VERSION),
            "task": self.task_name,
            "run_id": str(int(run_id)),
            "seed": str(int(record.seed)),
            "hparams": json.dumps(record.hparams, sort_keys=True),
            "info": json.dumps(record.info, sort_keys=True),
            CHECKSUMS_KEY: checksums(tensors),
        }
        path = self.run_path(run_id)
        if path.exists():
            if exist_ok:
                return False
            raise StoreError(f"run {run_id} already exists in {self.root}; runs are never overwritten")
        try:
            written = write_exclusive(path, safetensors_save(tensors, metadata=metadata))
        except OSError as exc:
            raise StoreError(f"cannot write {path} ({exc.strerror or exc}): check free space and permissions") from None
        if not written and not exist_ok:
            raise StoreError(f"run {run_id} already exists in {self.root}; runs are never overwritten")
        return written

    def mark_dropped(self, run_id: int, *, seed: int, hparams: dict, reason: str, step: int | None = None) -> bool:
        """Record that run ``run_id`` was filtered out, so a resumed job does not redo it."""
        payload = {"run_id": int(run_id), "seed": int(seed), "hparams": hparams, "reason": reason, "step": step}
        try:
            return write_exclusive(self.dropped_path(run_id), json_bytes(payload))
        except OSError as exc:
            raise StoreError(f"cannot write {self.dropped_path(run_id)} ({exc.strerror or exc})") from None

    def read_dropped(self, run_id: int) -> dict:
        return json.loads(self.dropped_path(run_id).read_text())

    # ------------------------------------------------------------------ reading

    def _header(self, run_id: int) -> RunHeader:
        """The run's header, cached while its file is the one it was read from (a run deleted and
        retrained under a long-lived reader is read afresh, not at the old file's offsets)."""
        path = self.run_path(run_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"run {run_id} is not in {self.root} (finished runs: {len(self)})") from None
        except OSError as exc:
            raise StoreError(f"cannot read run file {path} ({exc.strerror or exc})") from None
        header = self._headers.get(run_id)
        if header is None or header.identity != (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            header = read_header(path, self.num_params, self.task_name)
            self._headers[run_id] = header
        return header

    def read_run(self, run_id: int) -> RunRecord:
        """The whole run; ``params`` is memory-mapped (copy-on-write), the rest is small."""
        h = self._header(run_id)
        steps, metrics = self.read_metrics(run_id)
        h.verify(["params"])
        md = h.metadata
        return RunRecord(h.tensor("params"), steps, metrics, md["hparams"], md["seed"], md.get("info", {}))

    def read_metrics(self, run_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(steps [K], {metric: [K]})`` of a run, without reading its parameters."""
        h = self._header(run_id)
        h.verify([name for name in h.tensors if name != "params"])
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
        h.verify(["params"])
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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_release"] = _no_lock  # a copy (a DataLoader worker, say) holds no writer lock
        return state

    def verify_all(self) -> dict[int, str]:
        """Check every run file whole (header, size and the checksum of every tensor); returns
        ``{run_id: what is wrong}`` for the corrupt ones (empty when all are sound). What
        ``learned-opt corpus --verify`` reports; delete the runs named and rerun ``corpus``."""
        corrupt = {}
        for run_id in self.run_ids():
            self._headers.pop(run_id, None)
            try:  # a file that cannot be opened is not corrupt
                open(self.run_path(run_id), "rb").close()
            except OSError as exc:
                raise StoreError(f"cannot read {self.run_path(run_id)} ({exc.strerror or exc}): "
                                 f"fix its permissions") from None
            try:
                self._header(run_id).verify()
            except StoreError as exc:
                corrupt[run_id] = str(exc)
        return corrupt

    def clean_stale_temp(self, older_than_s: float = 600.0) -> int:
        """Remove temporary files left by killed writers (older than ``older_than_s``); returns the count."""
        return remove_stale_temp((self.root, self.root / RUNS_DIR, self.root / DROPPED_DIR), older_than_s)

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
        return cached_stats(self, refresh)

    def write_index(self, ids: list[int] | None = None, dropped: list[int] | None = None, stats: dict | None = None) -> None:
        """Rewrite ``index.json`` (atomically; last writer wins, every version is valid)."""
        write_index(self, ids, dropped, stats)


# ---------------------------------------------------------------------- file helpers


def _no_lock() -> None:
    return None
