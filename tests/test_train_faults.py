"""Training never saves NaN: non-finite options refused, divergence stops before a save, a
non-finite checkpoint refused on resume, and a failed save keeps the previous checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import file_hash, make_store, tiny_config

from learned_opt import cli
from learned_opt.errors import ConfigError, TrainingError
from pretrain.train import CHECKPOINT_NAME, LOG_NAME, load_checkpoint, train
from pretrain.train import outputs, trainer
from pretrain.train.outputs import nonfinite_tensors


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "store"
    make_store(root, runs=4, checkpoints=5)
    return root


tiny = tiny_config


@pytest.mark.parametrize("change", [
    {"weight_decay": math.nan}, {"grad_clip": math.nan}, {"grad_clip": math.inf}, {"ema_decay": math.nan},
    {"min_lr_ratio": math.nan}, {"output_matching": math.inf}, {"layer_balance": math.nan},
    {"init_fraction": math.nan}, {"late_fraction": math.nan}, {"snr_window": (math.nan, 1.0)}, {"residual_std": math.inf, "precondition": True},
    {"lr": math.inf}, {"late_max_gap": 0, "late_fraction": 0.5}, {"late_max_gap": True, "late_fraction": 0.5},
])
def test_non_finite_options_are_refused_before_anything_is_written(store_dir, tmp_path, change):
    with pytest.raises(ConfigError, match="finite|positive"):
        train(tiny(store_dir, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_a_late_max_gap_without_a_late_share_is_refused(store_dir, tmp_path):
    with pytest.raises(ConfigError, match="give --late-fraction too"):
        train(tiny(store_dir, tmp_path / "out", late_max_gap=2))
    assert not (tmp_path / "out").exists()


def poison_after(monkeypatch, step: int, what: str) -> None:
    """Make training go non-finite at ``step``: NaN weights after the update, or a NaN loss."""
    real = trainer.Trainer.train_step

    def train_step(self, batch):
        if what == "loss" and self.step + 1 == step:
            real_loss = self.diffusion.training_loss
            monkeypatch.setattr(self.diffusion, "training_loss", lambda *a, **k: real_loss(*a, **k) * math.nan)
        out = real(self, batch)
        if what == "loss" and self.step == step:
            monkeypatch.undo()
        if what == "weights" and self.step == step:
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.nan)
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)


@pytest.mark.parametrize("what", ["weights", "loss"])
def test_divergence_stops_training_and_keeps_the_last_finite_checkpoint(store_dir, tmp_path, monkeypatch, what):
    out = tmp_path / "out"
    poison_after(monkeypatch, 4, what)
    with pytest.raises(TrainingError, match="diverged by step 4.*checkpoint of step 3.*is kept"):
        train(tiny(store_dir, out, checkpoint_every=3, log_every=1))
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 3 and nonfinite_tensors(state) == []
    records = outputs.read_jsonl(out / LOG_NAME)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)


def test_a_diverging_learning_rate_is_a_one_line_error_and_saves_nothing(store_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["train", "--store", str(store_dir), "--out", str(out), "--steps", "6", "--batch-size", "4",
                   "--diffusion-steps", "50", "--lr", "1e6", "--log-every", "1", "--no-export"])
    err = capsys.readouterr().err
    assert rc == 2 and "learned-opt train: error: training diverged" in err and "Traceback" not in err
    ckpt = out / CHECKPOINT_NAME
    assert not ckpt.exists() or nonfinite_tensors(load_checkpoint(ckpt)) == []


def test_resume_refuses_a_checkpoint_with_non_finite_tensors_and_keeps_it(store_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny(store_dir, out, stop_after=3))
    ckpt = out / CHECKPOINT_NAME
    state = torch.load(ckpt, weights_only=True)
    name = next(iter(state["ema"]))
    state["ema"][name].view(-1)[0] = math.inf
    torch.save(state, ckpt)
    before = file_hash(ckpt)
    with pytest.raises(TrainingError, match=f"cannot resume .*non-finite values \\(ema.{name}"):
        train(tiny(store_dir, out, resume=True))
    assert file_hash(ckpt) == before


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(store_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(tiny(store_dir, out, stop_after=3))
    before = file_hash(out / CHECKPOINT_NAME)

    def half_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.torch, "save", half_save)
    with pytest.raises(TrainingError, match="cannot write .*No space left on device.*free space .*--resume"):
        train(tiny(store_dir, out, resume=True))
    assert file_hash(out / CHECKPOINT_NAME) == before
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    # a temporary file that a kill mid-save left behind is removed when the job resumes; another
    # writer's (an export into this folder, which takes no lock) is left alone
    (out / ".checkpoint.pt.killed.tmp").write_bytes(b"half a checkpoint")
    (out / ".toy.safetensors.live.tmp").write_bytes(b"being written")
    train(tiny(store_dir, out, resume=True, stop_after=4))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")) == [
        ".toy.safetensors.live.tmp"]


def test_a_checkpoint_with_a_flipped_bit_is_refused_as_corrupt(store_dir, tmp_path):
    out = tmp_path / "out"
    train(tiny(store_dir, out, stop_after=2))
    path = out / CHECKPOINT_NAME
    blob = bytearray(path.read_bytes())
    import zipfile

    with zipfile.ZipFile(path) as archive:  # a byte inside the first tensor's record
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 16)
    start = info.header_offset  # the local header: 30 bytes, then the name and an extra field of its own lengths
    names, extra = int.from_bytes(blob[start + 26:start + 28], "little"), int.from_bytes(blob[start + 28:start + 30], "little")
    blob[start + 30 + names + extra + 8] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(TrainingError, match="fails its checksum.*corrupt"):
        train(tiny(store_dir, out, resume=True))


@pytest.mark.distributed
@pytest.mark.slow
def test_all_ranks_stop_together_when_one_rank_diverges(store_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    worker = Path(__file__).with_name("ddp_train_faults_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(store_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert "diverged by step 3" in (out / f"stopped-rank{rank}.txt").read_text()
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 2 and nonfinite_tensors(state) == []


@pytest.mark.distributed
@pytest.mark.slow
def test_all_ranks_stop_when_rank_0_cannot_write_its_checkpoint(store_dir, tmp_path):
    """Rank 0 alone writes files; if that fails, rank 1 must stop too, not wait in a collective."""
    from pathlib import Path

    from torchrun_helpers import run_two_processes

    out = tmp_path / "out"
    run_two_processes(Path(__file__).with_name("ddp_train_faults_worker.py"), store_dir, out, "disk-full", timeout=120)
    assert (out / "stopped-rank0.txt").read_text() == "OSError: [Errno 28] No space left on device"
    assert (out / "stopped-rank1.txt").read_text() == \
        "TrainingError: writing the checkpoint failed on rank 0; its error says why"
    assert not (out / CHECKPOINT_NAME).exists()


def test_a_cpu_job_inside_an_nccl_process_group_is_refused_before_anything_is_written(store_dir, tmp_path,
                                                                                      monkeypatch):
    """NCCL reduces CUDA tensors only: a CPU job in the caller's NCCL group would fail in its first collective."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="NCCL.*initialise it with backend 'gloo'"):
        train(tiny(store_dir, out, device="cpu"))
    assert not out.exists()
