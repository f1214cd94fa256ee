"""Two CPU processes (gloo) under torchrun hold identical parameters after generative updates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "ddp_optimizer_worker.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_end_with_identical_parameters(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["attempted"] == 4 and r0["counters"]["failed"] == 1 and r0["counters"]["steps"] == 6
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    # the generative updates really moved the parameters away from plain DDP training
    assert r0["counters"]["accepted"] >= 1
