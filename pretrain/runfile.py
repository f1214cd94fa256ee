"""One run file of a checkpoint store: its safetensors header, read by hand, and its checksums.

A run file is written once (see :mod:`pretrain.store`) and never changed, so what it says about
itself can be checked cheaply:

* the header (dtypes, shapes, offsets, file size, task) when the run is first opened;
* the data, tensor by tensor, against the sha256 written into the header's metadata
  (``"checksums"``: ``{tensor name: hex digest}``) by :func:`checksums` — each tensor at most once
  per process (:data:`_VERIFIED` remembers the file by inode, size and mtime), the first time a
  reader asks for it. A flipped bit raises :class:`StoreError` naming the run and what to do.

Run files written before checksums existed have no ``"checksums"`` entry; they load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from learned_opt.errors import StoreError

CHECKSUMS_KEY = "checksums"
METRIC_PREFIX = "metric."
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not one of ours
_DTYPES = {"F32": (np.float32, torch.float32), "I64": (np.int64, torch.int64)}
_REMEDY = "delete it and run `learned-opt corpus` again to retrain that run"
_BLOCK = 8 * 2**20  # bytes hashed per read
# (device, inode, size, mtime_ns, tensor name) of every tensor whose checksum held in this process
_VERIFIED: set[tuple] = set()


def checksums(tensors: dict[str, torch.Tensor]) -> str:
    """The ``"checksums"`` metadata entry for ``tensors`` (contiguous CPU tensors, as written)."""
    return json.dumps({name: hashlib.sha256(t.numpy().data).hexdigest() for name, t in tensors.items()},
                      sort_keys=True)


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


def record_tensors(record: RunRecord, num_params: int, task: str) -> dict[str, torch.Tensor]:
    params, steps = record.params, record.steps
    if params.dim() != 2 or params.shape[1] != num_params:
        raise StoreError(
            f"params must have shape [K, {num_params}] for task {task!r}, got {list(params.shape)}"
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


@dataclass(frozen=True)
class RunHeader:
    """What the header of a run file says: where each tensor lies, and the metadata."""

    path: Path
    data_start: int  # byte offset of the data buffer
    tensors: dict  # name -> (dtype, shape, start, stop) relative to data_start
    metadata: dict  # parsed JSON values
    identity: tuple = ()  # (device, inode, size, mtime_ns): the file this header was read from
    sums: dict = field(default_factory=dict)  # name -> sha256 hex; empty for runs written without

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

    def verify(self, names=None) -> None:
        """Check the data of ``names`` (default: every tensor) against the recorded checksums,
        each at most once per process; :class:`StoreError` on a mismatch."""
        for name in self.tensors if names is None else names:
            expected = self.sums.get(name)
            key = (*self.identity, name)
            if expected is None or key in _VERIFIED:
                continue
            _, _, start, stop = self.tensors[name]
            if _sha256_range(self.path, self.data_start + start, stop - start) != expected:
                raise StoreError(
                    f"run file {self.path} is corrupt: the data of {name!r} does not match its checksum "
                    f"(a flipped bit or a damaged disk): {_REMEDY}"
                )
            _VERIFIED.add(key)


def _sha256_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while length > 0:
                block = f.read(min(_BLOCK, length))
                if not block:
                    break
                h.update(block)
                length -= len(block)
    except OSError as exc:
        raise StoreError(f"cannot read run file {path} ({exc.strerror or exc})") from None
    return h.hexdigest()


def read_header(path: Path, num_params: int, task: str) -> RunHeader:
    """Parse and validate a run file's safetensors header without reading its data."""

    def bad(why: str) -> StoreError:
        return StoreError(f"run file {path} is {why}: {_REMEDY}")

    try:
        st = path.stat()
        size = st.st_size
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
        sums = json.loads(md.get(CHECKSUMS_KEY, "{}"))
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError(f"{CHECKSUMS_KEY} is not a mapping of tensor names to digests")
        tensors = {
            name: (t["dtype"], [int(d) for d in t["shape"]], int(t["data_offsets"][0]), int(t["data_offsets"][1]))
            for name, t in header.items()
        }
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise bad(f"corrupt (unreadable header: {exc})") from None
    end = 0
    for name, (dtype, shape, start, stop) in tensors.items():
        if dtype not in _DTYPES or stop - start != math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize:
            raise bad(f"corrupt (tensor {name!r} has an inconsistent dtype or size)")
        end = max(end, stop)
    if "params" not in tensors or "steps" not in tensors:
        raise bad("corrupt (no 'params' or 'steps' tensor)")
    if set(sums) - set(tensors):
        raise bad(f"corrupt (checksums of tensors it does not hold: {sorted(set(sums) - set(tensors))})")
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
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return RunHeader(path, 8 + n, tensors, metadata, identity, sums)
