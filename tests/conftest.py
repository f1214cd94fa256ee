"""Shared fixtures: the offline data root and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$LEARNED_OPT_DATA`` or ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found under {root}: set LEARNED_OPT_DATA to a folder holding MNIST/raw")
    return root


@pytest.fixture(scope="session")
def mnist_data(mnist_root):
    from learned_opt import tasks

    return tasks.get("mnist-mlp").load_data(mnist_root)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Most tests run thousands of tiny ops, where one intra-op thread is fastest and, unlike two,
    # does not slow down by orders of magnitude when the machine is busy.
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LEARNED_OPT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)
