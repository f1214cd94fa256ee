"""Atomic writes: the target is replaced whole or not at all, and no temporary file is left."""

from __future__ import annotations

import os
import stat

import pytest

from learned_opt.fileio import atomic_write, atomic_write_with_manifest


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


@pytest.mark.parametrize("fail_in", ["file", "manifest"])
def test_a_file_and_its_manifest_are_replaced_together_or_not_at_all(tmp_path, fail_in):
    data, manifest = tmp_path / "w.bin", tmp_path / "w.json"
    atomic_write_with_manifest(data, lambda p: p.write_bytes(b"old"), manifest, lambda p: f"size {p.stat().st_size}")
    assert data.read_bytes() == b"old" and manifest.read_text() == "size 3"

    def write(p):
        p.write_bytes(b"newer")
        if fail_in == "file":
            raise OSError(28, "No space left on device")

    def text(staged):
        if fail_in == "manifest":
            raise OSError(28, "No space left on device")
        return "unused"

    with pytest.raises(OSError, match="No space"):
        atomic_write_with_manifest(data, write, manifest, text)
    assert data.read_bytes() == b"old" and manifest.read_text() == "size 3"  # the previous pair, whole
    assert sorted(os.listdir(tmp_path)) == ["w.bin", "w.json"]
    atomic_write_with_manifest(data, lambda p: p.write_bytes(b"newer"), manifest, lambda p: f"size {p.stat().st_size}")
    assert data.read_bytes() == b"newer" and manifest.read_text() == "size 5"
