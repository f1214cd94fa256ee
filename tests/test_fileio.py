"""Atomic writes: the target is replaced whole or not at all, and no temporary file is left."""

from __future__ import annotations

import os
import stat

import pytest

from learned_opt.fileio import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp != path and path.read_text() == "old"
        tmp.write_text("new")

    atomic_write(path, write)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
    atomic_write(tmp_path / "fresh.bin", lambda tmp: tmp.write_bytes(b"\0\1"), fsync=False)
    assert (tmp_path / "fresh.bin").read_bytes() == b"\0\1"
    # an ordinary file's permissions, not mkstemp's owner-only ones
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def write(tmp):
        tmp.write_text("partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_a_writer_that_replaces_the_temp_file_still_gets_ordinary_permissions(tmp_path):
    # safetensors' save_file replaces the file it is given (with owner-only permissions)
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "w.safetensors"
    atomic_write(path, lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
