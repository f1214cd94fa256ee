"""What inputs prepared unlike the generator's corpus cost one update, side by side.

Run::

    .venv/bin/python -m pytest benchmarks/test_input_preparation.py -s

The README's example, on ``LEARNED_OPT_BENCH_INITS`` fresh ``nn.Sequential`` MLPs (default 20;
``torch.manual_seed(1_000_000 + i)``): one ``GptOptimizer.generate`` with the shipped ``mnist-mlp``
generator, its closure the cross-entropy on the last 5,000 training images, once on MNIST
normalised as the corpus saw it (``(x / 255 - 0.1307) / 0.3081``) and once on plain ``ToTensor()``
pixels (``x / 255``). Prints the median test error after the update and how many updates were
accepted for each. Skipped while ``mnist-mlp`` does not ship or MNIST is not found.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_opt import GptOptimizer, load_generator
from learned_opt.pretrained import list_pretrained

REPO = Path(__file__).resolve().parents[1]
INITS = int(os.environ.get("LEARNED_OPT_BENCH_INITS", "20"))


def _pixels(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as plain ``ToTensor()`` pixels in [0, 1], flattened: ``[N, 784]``, labels ``[N]``."""
    torchvision = pytest.importorskip("torchvision")
    root = os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data"
    try:
        ds = torchvision.datasets.MNIST(str(root), train=train)
    except RuntimeError as exc:
        pytest.skip(f"MNIST not found: {exc}")
    return (ds.data.float() / 255).flatten(1), ds.targets


def test_unnormalised_inputs_against_normalised():
    if "mnist-mlp" not in {g["name"] for g in list_pretrained()}:
        pytest.skip("no mnist-mlp generator is shipped")
    norm = load_generator("mnist-mlp").input_normalization
    (x_train, y_train), (x_test, y_test) = _pixels(True), _pixels(False)
    x_val, y_val = x_train[-5000:], y_train[-5000:]
    rows = {}
    for label, prepare in (("normalised as the corpus", lambda x: (x - norm["mean"][0]) / norm["std"][0]),
                           ("plain ToTensor()", lambda x: x)):
        val_in, test_in = prepare(x_val), prepare(x_test)
        errors, accepted = [], 0
        for i in range(INITS):
            torch.manual_seed(1_000_000 + i)
            model = nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10))
            opt = GptOptimizer(model.parameters(), generator="mnist-mlp", lr=1e-3, seed=i)
            accepted += opt.generate(lambda: F.cross_entropy(model(val_in), y_val)).accepted
            with torch.no_grad():
                errors.append((model(test_in).argmax(1) != y_test).float().mean().item() * 100)
        rows[label] = statistics.median(errors)
        print(f"\n{label}: median test error after one update {rows[label]:.2f}%, accepted {accepted}/{INITS}")
    assert rows["normalised as the corpus"] < rows["plain ToTensor()"]
