"""LearnedOptimizer under DistributedDataParallel: two CPU processes (gloo) keep identical parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun_helpers import run_two_processes

WORKER = Path(__file__).resolve().parent / "ddp_lopt_worker.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_with_different_data_end_with_identical_parameters_and_state(tmp_path):
    run_two_processes(WORKER, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["first_loss"] != r1["first_loss"]  # the ranks really saw different data
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    for key, s0 in r0["state"]["state"].items():
        for name, t in s0.items():
            other = r1["state"]["state"][key][name]
            assert torch.equal(t, other) if isinstance(t, torch.Tensor) else t == other == 5, name
    torch.manual_seed(0)
    start = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], start.parameters()))  # it trained
