"""LearnedOptimizer under DistributedDataParallel: two CPU processes (gloo) keep identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "ddp_lopt_worker.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_with_different_data_end_with_identical_parameters_and_state(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["first_loss"] != r1["first_loss"]  # the ranks really saw different data
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    for key, s0 in r0["state"]["state"].items():
        for name, t in s0.items():
            assert torch.equal(t, r1["state"]["state"][key][name]), name
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], start.parameters()))  # it trained
