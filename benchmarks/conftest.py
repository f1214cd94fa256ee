"""Shared benchmark fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request):
    """Run each benchmark with its module's ``THREADS`` torch intra-op threads (modules without one
    keep the current count), and restore the count after."""
    threads = getattr(request.module, "THREADS", None)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)
