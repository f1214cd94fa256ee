"""``store.json``, the description of a checkpoint store: its format version, task, architecture
signature, parameter count, metric names and the corpus builder's settings.

:func:`parse_meta` checks every field's type before a :class:`~pretrain.store.Store` uses it, so a
damaged or hand-edited file gives one :class:`StoreError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from learned_opt import jsoncheck
from learned_opt.errors import StoreError
from learned_opt.fileio import atomic_write

STORE_FORMAT_VERSION = 1
STORE_FILE = "store.json"
RUNS_DIR = "runs"
DROPPED_DIR = "dropped"
_META_LIMIT = 16 * 2**20  # bytes: a store.json is a few kilobytes


def json_bytes(obj) -> bytes:
    """How a store writes its JSON files (``store.json``, dropped runs, ``index.json``)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_settings(root: Path, settings: dict) -> dict:
    """Replace the corpus builder's settings in ``root``'s ``store.json`` (atomically); the new meta."""
    meta = read_meta(root)
    meta["settings"] = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    atomic_write(root / STORE_FILE, lambda tmp: tmp.write_bytes(json_bytes(meta)))
    return meta


def ids_in(folder: Path, suffix: str) -> list[int]:
    """The run ids of ``folder``'s ``run-XXXXXXXX{suffix}`` files, sorted (none when it is not there)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"^run-(\d{{8}}){re.escape(suffix)}$")
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def holds_no_runs(root: Path, besides: tuple[str, ...] = ()) -> bool:
    """Whether ``root`` holds nothing but hidden files and empty ``runs``/``dropped`` folders (what
    a store creation killed before ``store.json`` was written leaves behind), and ``besides``."""
    for p in root.iterdir():
        if p.name.startswith(".") or p.name in besides:
            continue
        if p.name not in (RUNS_DIR, DROPPED_DIR) or not p.is_dir() or any(p.iterdir()):
            return False
    return True


def replace_meta(root: Path, meta: dict) -> None:
    """Replace ``root``'s ``store.json`` with ``meta`` (atomically): a store that holds no run yet
    taking another task or architecture."""
    atomic_write(root / STORE_FILE, lambda tmp: tmp.write_bytes(json_bytes(meta)))


def read_meta(root: Path) -> dict:
    """The checked ``store.json`` of the store at ``root``; :class:`StoreError` if it is not one."""
    path = root / STORE_FILE
    try:
        if path.stat().st_size > _META_LIMIT:
            raise ValueError(f"it is larger than {_META_LIMIT} bytes")
        meta = json.loads(path.read_bytes())
        return parse_meta(meta, path)
    except StoreError:
        raise
    except OSError as exc:  # there, but not readable: not a damaged description, so nothing to rebuild
        raise StoreError(f"cannot read {path} ({exc.strerror or exc}): fix its permissions") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise StoreError(f"{path} is not a valid store description ({exc}): rebuild the store") from None


def parse_meta(meta, path: Path) -> dict:
    """``meta`` with every field checked (``ValueError`` describing the first bad one), except the
    format version, which raises :class:`StoreError` saying which version reads it."""
    if not isinstance(meta, dict):
        raise ValueError(f"it holds a JSON {type(meta).__name__}, not an object")
    missing = [k for k in ("format_version", "task", "signature", "num_params") if k not in meta]
    if missing:
        raise ValueError(f"it lacks {missing}")
    version = meta["format_version"]
    if not jsoncheck.is_int(version) or version != STORE_FORMAT_VERSION:
        raise StoreError(
            f"{path.parent} has store format version {version!r}, this learned-opt reads version "
            f"{STORE_FORMAT_VERSION}: rebuild the corpus with this version"
        )
    jsoncheck.str_field(meta["task"], "task")
    signature = jsoncheck.signature(meta["signature"])
    num_params = jsoncheck.int_field(meta["num_params"], "num_params", lo=1)
    total = sum(math.prod(shape) for _, shape in signature)
    if num_params != total:
        raise ValueError(f"num_params is {num_params}, but the signature has {total} parameters")
    metrics = meta.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"metrics must be a list of metric names, got {str(metrics)[:80]}")
    if meta.get("task_source") is not None:
        jsoncheck.str_field(meta["task_source"], "task_source")
    settings = meta.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"settings must be an object, got {str(settings)[:80]}")
    return meta
