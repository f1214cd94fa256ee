"""Two CPU processes (gloo) under torchrun hold identical parameters after generative updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrun_helpers import run_two_processes

WORKER = Path(__file__).resolve().parent / "ddp_optimizer_worker.py"


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_end_with_identical_parameters(tmp_path):
    run_two_processes(WORKER, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["counters"] == r1["counters"]
    assert r0["counters"]["attempted"] == 7 and r0["counters"]["failed"] == 1 and r0["counters"]["steps"] == 6
    assert r0["counters"]["kept"] == 1
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    # the generative updates really moved the parameters away from plain DDP training
    assert r0["counters"]["accepted"] >= 1
