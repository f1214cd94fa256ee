"""Faults thrown at the checkpoint store on purpose: flipped bits, a creation cut short, a second
writer process, a store that cannot be written, a damaged store.json."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save
from test_store import make_record

import pretrain.store as store_module
from learned_opt import StoreError
from pretrain import runfile, store_lock
from pretrain.store import STORE_FILE, Store

REPO = Path(__file__).resolve().parents[1]


def _flip_bit(path: Path, tensor: str, element: int, bit: int) -> None:
    """Flip one bit of one element of a tensor in a run file, in place."""
    header = runfile.read_header(path, 7960, "mnist-mlp")
    _, _, start, _ = header.tensors[tensor]
    offset = header.data_start + start + 4 * element + bit // 8
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def _fresh_checksum_cache(monkeypatch):
    monkeypatch.setattr(runfile, "_VERIFIED", set())


# ---------------------------------------------------------------------- checksums


def test_a_flipped_bit_in_params_is_caught_before_the_run_is_used(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    for r in range(3):
        store.write_run(r, make_record(seed=r))
    _flip_bit(store.run_path(1), "params", element=5, bit=30)  # an exponent bit: a huge value
    store = Store.open(tmp_path)
    with pytest.raises(StoreError, match=r"run-00000001.*'params' does not match its checksum.*delete it"):
        store.read_checkpoints(1, [0, 1])
    with pytest.raises(StoreError, match="checksum"):
        store.read_run(1)
    store.read_metrics(1)  # the metrics are intact
    assert store.read_checkpoints(0, [0]).shape == (1, 7960)  # other runs read as usual
    corrupt = store.verify_all()
    assert list(corrupt) == [1] and "params" in corrupt[1]


def test_a_run_file_deleted_and_retrained_under_a_reader_is_read_afresh(tmp_path):
    """What a checksum error tells the user to do (delete the run, run the corpus again) must not
    leave a long-lived reader (a training job) reading the new file at the old file's offsets."""
    store = Store.create(tmp_path, "mnist-mlp")
    store.write_run(0, make_record(k=6, seed=0))
    reader = Store.open(tmp_path)
    assert reader.read_checkpoints(0, [5]).shape == (1, 7960)  # the header is now cached
    store.run_path(0).unlink()
    with pytest.raises(StoreError, match="run 0 is not in"):
        reader.read_checkpoints(0, [0])
    retrained = make_record(k=9, seed=7)
    retrained.hparams["note"] = "a longer header shifts every offset"
    store.write_run(0, retrained)
    torch.testing.assert_close(reader.read_checkpoints(0, [8]), retrained.params[8:9])
    steps, metrics = reader.read_metrics(0)
    torch.testing.assert_close(steps, retrained.steps)
    torch.testing.assert_close(metrics["test_loss"], retrained.metrics["test_loss"])
    assert reader.read_info(0)[0] == 7


def test_a_flipped_bit_in_test_loss_is_caught(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    store.write_run(0, make_record())
    store.write_run(1, make_record(seed=1))
    _flip_bit(store.run_path(0), "metric.test_loss", element=2, bit=29)
    store = Store.open(tmp_path)
    with pytest.raises(StoreError, match="'metric.test_loss' does not match its checksum"):
        store.read_metrics(0)
    assert list(store.verify_all()) == [0]


def test_each_tensor_is_hashed_once_per_process(tmp_path, monkeypatch):
    store = Store.create(tmp_path, "mnist-mlp")
    store.write_run(0, make_record())
    calls = []
    real = runfile._sha256_range
    monkeypatch.setattr(runfile, "_sha256_range", lambda *a: calls.append(a) or real(*a))
    for _ in range(3):
        Store.open(tmp_path).read_checkpoints(0, [1])
        Store.open(tmp_path).read_metrics(0)
    assert len(calls) == 5  # params, steps and three metrics: each once


def test_run_files_without_checksums_still_load(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    record = make_record()
    tensors = runfile.record_tensors(record, 7960, "mnist-mlp")
    metadata = {"format_version": "1", "task": "mnist-mlp", "run_id": "4", "seed": "0",
                "hparams": json.dumps(record.hparams), "info": "{}"}  # as written before checksums
    store.run_path(4).write_bytes(safetensors_save(tensors, metadata=metadata))
    back = store.read_run(4)
    assert torch.equal(back.params, record.params) and store.verify_all() == {}


# ---------------------------------------------------------------------- creation


def test_a_store_whose_creation_failed_is_resumed(tmp_path, monkeypatch):
    root = tmp_path / "store"
    real = store_module.write_exclusive

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_exclusive", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        Store.create(root, "mnist-mlp")
    monkeypatch.setattr(store_module, "write_exclusive", real)
    store = Store.create(root, "mnist-mlp")  # the rerun resumes instead of refusing the folder
    store.write_run(0, make_record())
    assert Store.open(root).run_ids() == [0]


def test_empty_folders_of_a_creation_killed_before_store_json_are_resumed(tmp_path):
    for sub in ("runs", "dropped"):
        (tmp_path / sub).mkdir()  # what an older release killed mid-creation leaves behind
    assert Store.create(tmp_path, "mnist-mlp").run_ids() == []
    assert (tmp_path / STORE_FILE).is_file()


# ---------------------------------------------------------------------- writers


def _create_in_another_process(root: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys\nfrom learned_opt import StoreError\nfrom pretrain.store import Store\n"
        "try:\n    Store.create(sys.argv[1], 'mnist-mlp')\nexcept StoreError as e:\n    print(e); sys.exit(2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_second_writer_process_is_refused_and_the_lock_is_released_after(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    assert Store.create(tmp_path, "mnist-mlp").root == store.root  # this process may reopen its store
    proc = _create_in_another_process(tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"another process (pid {os.getpid()}) is writing the store" in proc.stdout
    assert Store.open(tmp_path).run_ids() == []  # readers never block
    store.close()
    proc = _create_in_another_process(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_the_writer_lock_survives_pickling_without_being_copied(tmp_path):
    import pickle

    store = Store.create(tmp_path, "mnist-mlp")
    copy = pickle.loads(pickle.dumps(store))
    copy.close()  # a copy holds no lock: closing it does not release the original's
    assert _create_in_another_process(tmp_path).returncode == 2
    store.close()


def test_an_unwritable_store_is_refused_before_any_run_is_trained(tmp_path, monkeypatch):
    Store.create(tmp_path, "mnist-mlp").close()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store_lock.tempfile, "mkstemp", read_only)
    with pytest.raises(StoreError, match="not writable.*Read-only file system"):
        Store.create(tmp_path, "mnist-mlp")
    with pytest.raises(StoreError, match="not writable"):
        Store.open(tmp_path).check_writable()


# ---------------------------------------------------------------------- store.json


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_params", "abc", "num_params must be an integer"),
        ("num_params", 7961, "the signature has 7960"),
        ("signature", "x", "signature must be a non-empty list"),
        ("signature", [["fc1.weight", [10.5, 3]]], "dimensions must be positive integers"),
        ("metrics", 5, "metrics must be a list"),
        ("task", 3, "task must be a non-empty string"),
        ("settings", [1], "settings must be an object"),
        ("format_version", True, "format version True"),
    ],
)
def test_a_damaged_store_json_is_one_store_error(tmp_path, field, value, message):
    Store.create(tmp_path, "mnist-mlp").close()
    meta = json.loads((tmp_path / STORE_FILE).read_text())
    meta[field] = value
    (tmp_path / STORE_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=message):
        Store.open(tmp_path)
