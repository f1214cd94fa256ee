"""Atomic file writes: a temporary file beside the target, fsync, then a rename into place.

Readers never see a partial file, and a writer that fails (or is interrupted) leaves the target as
it was and removes its temporary file. A writer killed outright may leave a hidden
``.{name}.*.tmp`` file beside the target, never a partial target.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "atomic_write_with_manifest", "write_exclusive", "written_temp", "fsync_dir", "is_plain_name"]


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is a file name that stays in its folder (what an export may be called)."""
    return isinstance(name, str) and bool(name) and not any(c in name for c in "/\\\0") and not name.startswith(".")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()  # what open(path, "w") would create; mkstemp makes 0o600


@contextmanager
def written_temp(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> Iterator[Path]:
    """A temporary file beside ``path`` (``tempfile.mkstemp``), filled by ``write(tmp_path)`` and
    fsynced when ``fsync``; yielded for the caller to publish (rename or link), and removed on exit
    if it is still there, whether or not an exception was raised.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        write(tmp)
        # the permissions of an ordinary new file, not mkstemp's private ones; set after writing,
        # because some writers (safetensors) replace the file rather than fill it
        os.chmod(tmp, _FILE_MODE)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)  # fsync needs no write access (the mode may forbid it)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> None:
    """Write ``path`` atomically: ``write(tmp_path)`` writes a temporary file in the same folder,
    which is then fsynced (when ``fsync``) and renamed over ``path`` with ``os.replace``.

    On any exception the temporary file is removed, ``path`` is left as it was, and the exception
    is re-raised.
    """
    path = Path(path)
    with written_temp(path, write, fsync=fsync) as tmp:
        os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def atomic_write_with_manifest(path: str | os.PathLike, write: Callable[[Path], object],
                               manifest: str | os.PathLike, manifest_text: Callable[[Path], str]) -> None:
    """Replace a file and the manifest that describes it (e.g. by its sha256) as one: ``write(tmp)``
    stages the file, ``manifest_text(staged file)`` makes the manifest's text, which is staged too,
    and only then are both renamed into place, the file first. A failure while staging either (an
    exception, a full disk, an interrupt) leaves the previous pair as it was.
    """
    path, manifest = Path(path), Path(manifest)
    with written_temp(path, write) as staged:
        text = manifest_text(staged)
        with written_temp(manifest, lambda p: p.write_text(text, encoding="utf-8")) as staged_manifest:
            os.replace(staged, path)
            os.replace(staged_manifest, manifest)
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Best-effort fsync of a folder, so a rename or link into it survives a crash."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_exclusive(path: Path, data: bytes) -> bool:
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
