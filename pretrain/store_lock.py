"""Who may write a checkpoint store (or a training folder): one writer process at a time, on a
store that can be written.

:func:`acquire_writer` takes an exclusive ``flock`` on ``.writer.lock`` in the store folder, held
by the process until every :class:`~pretrain.store.Store` it created there is closed or gone (the
kernel drops it when the process dies, so a killed job never leaves a stale lock). Stores of one
process share the lock, so a process may reopen its own store. A second process is refused with a
:class:`StoreError` naming the holder's pid. Under ``torchrun`` only rank 0 creates the store (the
other ranks open it, which takes no lock), so the ranks of one job share it as before. ``train``
and ``meta-train`` take the same lock on their ``--out`` folder (rank 0), so that two jobs never
write one checkpoint and log.

On a filesystem without ``flock`` (some network mounts) the lock is skipped with a warning; runs
are still never overwritten (see :mod:`pretrain.store`), but two jobs may train the same runs.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from learned_opt.errors import StoreError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

LOCK_FILE = ".writer.lock"  # hidden: not counted as content of the folder
_HELD: dict[tuple[int, int], list[int]] = {}  # (device, inode) of a lock file -> [fd, holders]
_GUARD = threading.Lock()


def check_writable(root: Path, folders: tuple[str, ...]) -> None:
    """:class:`StoreError` unless a file can be created in ``root`` and each of its ``folders``."""
    for folder in (root, *(root / f for f in folders)):
        try:
            fd, name = tempfile.mkstemp(prefix=".writable.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StoreError(
                f"the store at {root} is not writable ({folder}: {exc.strerror or exc}): fix its permissions "
                "or free space, or choose another --out folder, before adding runs"
            ) from None


def acquire_writer(root: Path, what: str = "the store", error: type[Exception] = StoreError) -> Callable[[], None]:
    """Take this process's writer lock on ``what`` at ``root`` (a store, or a training folder);
    returns the function that releases it. ``error`` (:class:`StoreError`) if another process holds it."""
    if fcntl is None:
        return _nothing
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise error(f"cannot write to {what} at {root} ({exc.strerror or exc}): check permissions") from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _GUARD:
        if key in _HELD:  # this process holds it already
            os.close(fd)
            _HELD[key][1] += 1
            return functools.partial(_release, key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise error(
                f"another process{f' (pid {holder})' if holder else ''} is writing {what} at {root}: "
                "wait for it to finish or stop it; to use several processes on one job, start them "
                "with torchrun"
            ) from None
        except OSError as exc:
            os.close(fd)
            warnings.warn(f"cannot lock {what} at {root} ({exc.strerror or exc}); make sure no other "
                          "job writes it", RuntimeWarning, stacklevel=3)
            return _nothing
        if _read_pid(fd) != str(os.getpid()):  # a store reopened by its writer stays untouched
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid is only for the message
        _HELD[key] = [fd, 1]
    return functools.partial(_release, key)


def _release(key: tuple[int, int]) -> None:
    with _GUARD:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.close(entry[0])  # drops the flock


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _nothing() -> None:
    return None


def remove_stale_temp(folders, older_than_s: float, pattern: str = ".*.tmp") -> int:
    """Remove the hidden temporary files (``pattern``) that killed writers left in ``folders``
    (older than ``older_than_s``), as far as they can be: best effort; returns the count."""
    removed, now = 0, time.time()
    for folder in folders:
        for p in Path(folder).glob(pattern):
            try:
                if p.is_file() and not p.is_symlink() and now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
            except OSError:  # gone already, or not ours to remove: left alone
                pass
    return removed
