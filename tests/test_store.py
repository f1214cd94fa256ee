"""The on-disk checkpoint store: format, atomic writes, lazy reads, bad stores."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from learned_opt import StoreError, tasks
from pretrain.store import STORE_FILE, STORE_FORMAT_VERSION, RunRecord, Store

P = 7960  # mnist-mlp


def make_record(k: int = 6, seed: int = 0, scale: float = 0.1) -> RunRecord:
    g = torch.Generator().manual_seed(seed)
    return RunRecord(
        params=torch.randn(k, P, generator=g) * scale,
        steps=torch.arange(k) * 3,
        metrics={m: torch.rand(k, generator=g) for m in ("train_loss", "test_loss", "test_error")},
        hparams={"optimizer": "sgd-nesterov", "lr": 0.1, "batch_size": 128},
        seed=seed,
        info={"rank": 0},
    )


class OtherTask(tasks.Task):
    """A second architecture, to check that stores of different tasks are kept apart."""

    name = "other-test-task"
    description = "test only"
    metrics = {"test_loss": tasks.Metric("test_loss", "min", 0.0)}
    default_metric = "test_loss"

    def build_model(self):
        return nn.Linear(3, 2)

    def load_data(self, root=None, *, download=False):
        return None

    def evaluate(self, flat, data, metrics=None):
        return {"test_loss": flat.pow(2).mean(-1)}

    def hidden_sizes(self):
        return ()

    def permute(self, flat, perms):
        return flat


def test_create_write_read_round_trip(tmp_path):
    store = Store.create(tmp_path / "s", "mnist-mlp")
    assert (store.task_name, store.num_params, store.signature) == ("mnist-mlp", P, tasks.get("mnist-mlp").signature)
    rec = make_record(seed=5)
    assert store.write_run(3, rec) is True
    assert store.run_ids() == [3] and len(store) == 1 and store.has_run(3) and not store.has_run(4)

    back = Store.open(tmp_path / "s").read_run(3)
    assert torch.equal(back.params, rec.params) and back.params.dtype == torch.float32
    assert torch.equal(back.steps, rec.steps) and back.steps.dtype == torch.int64
    assert back.metrics.keys() == rec.metrics.keys()
    assert all(torch.equal(back.metrics[m], rec.metrics[m]) for m in rec.metrics)
    assert (back.hparams, back.seed, back.info) == (rec.hparams, 5, {"rank": 0})

    # a plain safetensors file that any safetensors reader opens
    plain = load_file(store.run_path(3))
    assert set(plain) == {"params", "steps", "metric.train_loss", "metric.test_loss", "metric.test_error"}


def test_partial_reads_return_only_the_requested_rows(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    rec = make_record(k=8)
    store.write_run(0, rec)
    rows = store.read_checkpoints(0, [7, 0, 3])
    assert rows.shape == (3, P) and torch.equal(rows, rec.params[[7, 0, 3]])
    assert torch.equal(store.read_checkpoints(0, torch.tensor([-1])), rec.params[-1:])
    with pytest.raises(IndexError):
        store.read_checkpoints(0, [8])
    steps, metrics = store.read_metrics(0)
    assert torch.equal(steps, rec.steps) and torch.equal(metrics["test_loss"], rec.metrics["test_loss"])


def test_read_params_are_memory_mapped_and_copy_on_write(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    rec = make_record()
    store.write_run(0, rec)
    before = store.run_path(0).read_bytes()
    params = store.read_run(0).params
    assert not params.untyped_storage().resizable()  # borrowed from a numpy memmap, not a torch allocation
    params.mul_(0)  # allowed: private pages, the file stays as it was
    assert store.run_path(0).read_bytes() == before
    assert torch.equal(store.read_run(0).params, rec.params)


def test_runs_are_never_overwritten(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    store.write_run(1, make_record(seed=1))
    before = store.run_path(1).read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        store.write_run(1, make_record(seed=2))
    assert store.write_run(1, make_record(seed=2), exist_ok=True) is False
    assert store.run_path(1).read_bytes() == before
    assert not list(store.run_path(1).parent.glob(".*.tmp"))


def test_concurrent_writers_of_one_run_leave_one_intact_file(tmp_path):
    Store.create(tmp_path, "mnist-mlp")
    results = []

    def write(seed):
        results.append(Store.open(tmp_path).write_run(9, make_record(seed=seed, k=40), exist_ok=True))

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    store = Store.open(tmp_path)
    store.verify()
    back = store.read_run(9)
    assert torch.equal(back.params, make_record(seed=back.seed, k=40).params)


def test_temporary_files_are_ignored_and_stale_ones_cleaned(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    tmp = store.run_path(4).with_name(".run-00000004.safetensors.host.1.abc.tmp")
    tmp.write_bytes(b"partial")
    assert store.run_ids() == [] and not store.has_run(4)
    assert store.clean_stale_temp(older_than_s=3600) == 0 and tmp.exists()
    assert store.clean_stale_temp(older_than_s=-1) == 1 and not tmp.exists()


def test_write_rejects_records_of_the_wrong_shape(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    rec = make_record()
    bad_params = RunRecord(rec.params[:, :-1], rec.steps, rec.metrics, rec.hparams, 0)
    bad_steps = RunRecord(rec.params, rec.steps.flip(0), rec.metrics, rec.hparams, 0)
    bad_metric = RunRecord(rec.params, rec.steps, {"test_loss": torch.zeros(2)}, rec.hparams, 0)
    for bad, match in ((bad_params, r"\[K, 7960\]"), (bad_steps, "increasing"), (bad_metric, "test_loss")):
        with pytest.raises(StoreError, match=match):
            store.write_run(0, bad)
    assert store.run_ids() == []


def test_reopening_a_store_for_the_same_task_resumes_it(tmp_path):
    Store.create(tmp_path, "mnist-mlp").write_run(0, make_record())
    again = Store.create(tmp_path, tasks.get("mnist-mlp"))
    assert again.run_ids() == [0]


def test_a_store_of_another_task_is_refused_and_left_alone(tmp_path):
    Store.create(tmp_path, OtherTask())
    before = (tmp_path / STORE_FILE).read_bytes()
    with pytest.raises(StoreError, match="store of task 'other-test-task', not 'mnist-mlp'"):
        Store.create(tmp_path, "mnist-mlp")
    assert (tmp_path / STORE_FILE).read_bytes() == before


def test_a_store_of_another_architecture_is_taken_over_only_while_it_holds_no_run(tmp_path):
    class Wider(OtherTask):
        def build_model(self):
            return nn.Linear(3, 4)

    Store.create(tmp_path, OtherTask()).close()  # a first call refused before any run, say
    store = Store.create(tmp_path, Wider())  # the task mended, under the same name
    assert store.num_params == Wider().num_params and store.signature == Wider().signature
    store.write_run(0, RunRecord(torch.zeros(2, store.num_params), torch.tensor([0, 1]),
                                 {"test_loss": torch.zeros(2)}, {}, 0, {}))
    store.close()
    before = (tmp_path / STORE_FILE).read_bytes()
    with pytest.raises(StoreError, match="another architecture of task 'other-test-task'"):
        Store.create(tmp_path, OtherTask())
    assert (tmp_path / STORE_FILE).read_bytes() == before and Store.open(tmp_path).run_ids() == [0]
    with pytest.raises(StoreError, match="store of task 'other-test-task', not 'mnist-mlp'"):
        Store.create(tmp_path, "mnist-mlp")
    # the refusals let go of the writer lock: another process may write the store
    code = "import sys; from pathlib import Path; from pretrain.store_lock import acquire_writer; acquire_writer(Path(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


def test_open_errors_say_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="does not exist.*learned-opt corpus"):
        Store.open(tmp_path / "missing")
    with pytest.raises(StoreError, match="has no store.json"):
        Store.open(tmp_path)
    Store.create(tmp_path / "s", "mnist-mlp")
    meta = json.loads((tmp_path / "s" / STORE_FILE).read_text())
    meta["format_version"] = STORE_FORMAT_VERSION + 1
    (tmp_path / "s" / STORE_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format version 2.*rebuild"):
        Store.open(tmp_path / "s")
    (tmp_path / "s" / STORE_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="not a valid store"):
        Store.open(tmp_path / "s")


def test_create_refuses_unwritable_or_unrelated_folders(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    with pytest.raises(StoreError, match="choose a writable --out"):
        Store.create(blocker / "store", "mnist-mlp")
    with pytest.raises(StoreError, match="is a file"):
        Store.create(blocker, "mnist-mlp")
    assert blocker.read_text() == "keep me"
    with pytest.raises(StoreError, match="not empty"):
        Store.create(tmp_path, "mnist-mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("cut", [4, 100, -5])
def test_truncated_run_file_gives_an_error_naming_the_file(tmp_path, cut):
    store = Store.create(tmp_path, "mnist-mlp")
    store.write_run(0, make_record())
    store.write_run(1, make_record())
    path = store.run_path(1)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    store = Store.open(tmp_path)
    with pytest.raises(StoreError, match=r"run-00000001\.safetensors is .*truncated.*delete it"):
        store.read_run(1)
    with pytest.raises(StoreError, match="run-00000001"):
        store.verify()
    assert torch.equal(store.read_run(0).params, make_record().params)  # the other run still reads


class SameSizeTask(OtherTask):
    """Another task whose networks have exactly as many parameters as mnist-mlp's."""

    name = "same-size-test-task"

    def build_model(self):
        return nn.Linear(P - 1, 1)


def test_a_run_file_of_another_task_is_refused_naming_the_file(tmp_path):
    mnist = Store.create(tmp_path / "mnist", "mnist-mlp")
    mnist.write_run(0, make_record())
    other = Store.create(tmp_path / "other", SameSizeTask())
    assert other.num_params == P
    other.write_run(1, make_record(seed=1))
    other.run_path(0).write_bytes(mnist.run_path(0).read_bytes())  # a stray file from another store
    with pytest.raises(StoreError, match=r"run-00000000\.safetensors is a run of task 'mnist-mlp'.*'same-size-test-task'"):
        other.read_run(0)
    with pytest.raises(StoreError, match="run-00000000"):
        Store.open(tmp_path / "other").verify()
    assert torch.equal(other.read_run(1).params, make_record(seed=1).params)  # its own runs still read


def test_settings_are_recorded_at_creation_and_kept_on_reopen(tmp_path):
    settings = {"seed": 3, "ranges": {"sgd_lr": (0.01, 0.3)}}
    assert Store.create(tmp_path, "mnist-mlp", settings=settings).settings == {"seed": 3, "ranges": {"sgd_lr": [0.01, 0.3]}}
    before = (tmp_path / STORE_FILE).read_bytes()
    assert Store.create(tmp_path, "mnist-mlp", settings={"seed": 4}).settings["seed"] == 3  # the store's own
    assert (tmp_path / STORE_FILE).read_bytes() == before
    assert Store.open(tmp_path).settings["seed"] == 3
    assert Store.create(tmp_path / "plain", "mnist-mlp").settings is None  # stores without settings still open


def test_garbage_header_is_reported_as_corrupt(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    store.run_path(2).write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 16)
    with pytest.raises(StoreError, match=r"run-00000002\.safetensors is corrupt"):
        store.read_metrics(2)


def test_dropped_runs_are_recorded_and_counted(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    assert store.mark_dropped(5, seed=5, hparams={"lr": 3.0}, reason="|w| > 10", step=40)
    assert not store.mark_dropped(5, seed=5, hparams={"lr": 3.0}, reason="again")
    assert store.dropped_ids() == [5] and store.is_dropped(5) and store.is_done(5) and not store.has_run(5)
    assert store.read_dropped(5)["reason"] == "|w| > 10"
    assert len(store) == 0 and store.stats()["dropped"] == 1


def test_stats_cover_every_checkpoint_and_are_cached(tmp_path):
    store = Store.create(tmp_path, "mnist-mlp")
    recs = [make_record(k=4, seed=0, scale=0.1), make_record(k=6, seed=1, scale=0.3)]
    for i, rec in enumerate(recs):
        store.write_run(i, rec)
    store.mark_dropped(7, seed=7, hparams={}, reason="non-finite")
    stats = store.stats()
    everything = torch.cat([r.params for r in recs]).double()
    assert stats["runs"] == 2 and stats["dropped"] == 1 and stats["checkpoints"] == 10
    assert stats["param_std"] == pytest.approx(everything.std(unbiased=False).item(), rel=1e-6)
    assert stats["param_mean"] == pytest.approx(everything.mean().item(), abs=1e-7)
    assert stats["param_absmax"] == pytest.approx(everything.abs().max().item())
    loss = torch.cat([r.metrics["test_loss"] for r in recs])
    assert stats["metrics"]["test_loss"]["min"] == pytest.approx(loss.min().item())
    assert stats["metrics"]["test_loss"]["max"] == pytest.approx(loss.max().item())
    assert stats["bytes_per_checkpoint"] > P * 4
    assert json.loads((tmp_path / "index.json").read_text())["stats"] == stats
    store.write_run(2, make_record(k=2, seed=2))
    assert store.stats()["runs"] == 3  # the cache follows the set of runs


def test_files_that_cannot_be_read_are_not_called_corrupt(tmp_path, monkeypatch):
    store = Store.create(tmp_path, OtherTask())
    store.write_run(0, RunRecord(torch.zeros(2, store.num_params), torch.tensor([0, 1]), {"test_loss": torch.zeros(2)},
                                 {}, 0, {}))
    store.close()
    real_open, real_read = open, Path.read_bytes

    def no_access(path, *args, **kwargs):
        if str(path).endswith((STORE_FILE, ".safetensors")):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_access)
    with pytest.raises(StoreError, match="cannot read .*run-00000000.safetensors .*Permission denied.*fix its permissions"):
        Store.open(tmp_path).verify_all()
    monkeypatch.setattr(Path, "read_bytes", lambda p: no_access(p) if p.name == STORE_FILE else real_read(p))
    with pytest.raises(StoreError, match=f"cannot read .*{STORE_FILE} .*Permission denied.*fix its permissions"):
        Store.open(tmp_path)
