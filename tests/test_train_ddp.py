"""Generator training under torchrun: two CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_store

from pretrain.train import CHECKPOINT_NAME, LOG_NAME, load_checkpoint, read_jsonl

HELPER = Path(__file__).with_name("train_helpers.py")


def run_two_ranks(tmp_path: Path, *args: str, timeout: int = 120) -> Path:
    """Train on a fresh tiny store under torchrun with two gloo ranks (train_helpers' entry, given
    ``args``); returns the output folder."""
    make_store(tmp_path / "store", runs=4, checkpoints=5)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HELPER), str(tmp_path / "store"), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    out = run_two_ranks(tmp_path)
    hashes = [(out / f"hash-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert hashes[0] == hashes[1]  # model and EMA, bit for bit
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 4 and state["hardware"]["world_size"] == 2
    assert len(state["rng"]["ranks"]) == 2
    steps = [r["step"] for r in read_jsonl(out / LOG_NAME)]
    assert steps == [2, 4]  # one writer: no record twice
    manifest = json.loads((out / "mnist-mlp.json").read_text())
    assert manifest["training"]["hardware"]["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_with_output_matching_end_with_identical_weights(tmp_path, mnist_root):
    out = run_two_ranks(tmp_path, str(mnist_root), timeout=240)
    hashes = [(out / f"hash-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    records = read_jsonl(out / LOG_NAME)
    assert [r["step"] for r in records] == [2, 4] and all(r["output_divergence"] > 0 for r in records)
    manifest = json.loads((out / "mnist-mlp.json").read_text())
    assert manifest["training"]["output_matching"] == 1.0


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_with_prompt_dropout_and_a_property_head_end_with_identical_weights(tmp_path):
    out = run_two_ranks(tmp_path, "", "auxiliary")
    hashes = [(out / f"hash-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert hashes[0] == hashes[1]  # the head's and the null prompt's gradients are averaged over ranks too
    records = read_jsonl(out / LOG_NAME)
    assert [r["step"] for r in records] == [2, 4] and all(r["property_loss"] > 0 for r in records)
    manifest = json.loads((out / "mnist-mlp.json").read_text())
    assert manifest["model_config"]["null_prompt"] and manifest["model_config"]["property_head"]
    assert (manifest["training"]["prompt_dropout"], manifest["training"]["property_head"]) == (0.5, 1.0)
