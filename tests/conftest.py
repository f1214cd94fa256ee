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
    # Two cores on CI: keep intra-op threads predictable across tests.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
