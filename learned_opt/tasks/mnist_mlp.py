"""``mnist-mlp``: G.pt's MNIST MLP, 784-10-10 with ReLU (7,960 parameters).

Parameters, in ``state_dict`` / signature order (this order is part of the format of every corpus
and generator for this task):

====================  =========
``fc1.weight``        [10, 784]
``fc1.bias``          [10]
``fc2.weight``        [10, 10]
``fc2.bias``          [10]
====================  =========

The forward takes normalised images ``[N, 1, 28, 28]`` (mean 0.1307, std 0.3081) and returns
logits ``[N, 10]``. Metrics:

* ``test_loss`` — cross-entropy over the full 10,000-image test set (generators condition on it);
* ``test_error`` — test-set error in percent;
* ``train_loss`` — cross-entropy over the first 10,000 training images (a fixed slice, so that
  evaluating 200 checkpoints stays cheap).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import resolve_data_root
from ..errors import ConfigError, DataNotFoundError
from .base import MLP, Metric, Task, permute_mlp

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TRAIN_LOSS_EXAMPLES = 10_000


@dataclass
class MnistData:
    """MNIST as normalised float tensors in memory."""

    train_x: torch.Tensor  # [60000, 1, 28, 28] float32, normalised
    train_y: torch.Tensor  # [60000] int64
    test_x: torch.Tensor  # [10000, 1, 28, 28]
    test_y: torch.Tensor  # [10000]

    def to(self, device: torch.device | str) -> "MnistData":
        return MnistData(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


def load_mnist(root: str | os.PathLike | None = None, *, download: bool = False) -> MnistData:
    """Read MNIST with torchvision's loader from ``root`` (or ``$LEARNED_OPT_DATA``)."""
    from torchvision.datasets import MNIST  # imported lazily: only tasks with data need it

    root = resolve_data_root(root)
    splits = {}
    for train in (True, False):
        try:
            ds = MNIST(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
            raise DataNotFoundError(
                f"MNIST not found under {root} (expected {root / 'MNIST' / 'raw'}): point --data-root "
                f"or LEARNED_OPT_DATA at a folder holding MNIST in torchvision's layout, or pass "
                f"--download to fetch it ({exc})"
            ) from None
        x = ds.data.float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
        splits[train] = (x.contiguous(), ds.targets.long())
    return MnistData(*splits[True], *splits[False])


class MnistMLP(Task):
    name = "mnist-mlp"
    description = "MNIST, MLP 784-10-10 ReLU (7,960 parameters), G.pt's MNIST task"
    metrics = {
        "test_loss": Metric("test_loss", "min", 0.0, "cross-entropy on the full MNIST test set"),
        "test_error": Metric("test_error", "min", 5.0, "error on the MNIST test set, in percent"),
        "train_loss": Metric("train_loss", "min", 0.0, "cross-entropy on the first 10,000 training images"),
    }
    default_metric = "test_loss"
    sizes = (784, 10, 10)

    def build_model(self) -> MLP:
        return MLP(self.sizes)

    def load_data(self, root=None, *, download: bool = False) -> MnistData:
        return load_mnist(root, download=download)

    def hidden_sizes(self) -> tuple[int, ...]:
        return self.sizes[1:-1]

    def validation_data(self, data: MnistData, holdout: int = 5000) -> MnistData:
        """The last ``holdout`` training examples in place of the test set (the ``test_*`` metrics
        then measure them); the rest stay the training set."""
        n = int(data.train_x.shape[0])
        if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < n:
            raise ConfigError(f"holdout must be an integer between 1 and {n - 1} (training examples held out), "
                              f"got {holdout!r}")
        m = n - holdout
        return MnistData(data.train_x[:m], data.train_y[:m], data.train_x[m:], data.train_y[m:])

    def permute(self, flat: torch.Tensor, perms: Sequence[torch.Tensor]) -> torch.Tensor:
        return permute_mlp(self.layout(), flat, perms)

    def matching_inputs(self, data: MnistData) -> torch.Tensor:
        """The training images outside the default validation holdout (the first 55,000)."""
        return self.validation_data(data).train_x

    @torch.no_grad()
    def evaluate(
        self, flat: torch.Tensor, data: MnistData, metrics: Sequence[str] | None = None, chunk: int = 50
    ) -> dict[str, torch.Tensor]:
        metrics = list(metrics or self.metrics)
        for m in metrics:
            self.metric(m)  # raises on an unknown name
        out: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
        for part in flat.float().split(chunk):
            if "test_loss" in metrics or "test_error" in metrics:
                logits = self.logits(part, data.test_x)  # [b, N, 10]
                if "test_loss" in metrics:
                    out["test_loss"].append(_cross_entropy(logits, data.test_y))
                if "test_error" in metrics:
                    wrong = logits.argmax(-1) != data.test_y
                    out["test_error"].append(wrong.float().mean(-1) * 100.0)
            if "train_loss" in metrics:
                x, y = data.train_x[:TRAIN_LOSS_EXAMPLES], data.train_y[:TRAIN_LOSS_EXAMPLES]
                out["train_loss"].append(_cross_entropy(self.logits(part, x), y))
        return {m: torch.cat(v) for m, v in out.items()}

    def logits(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``b`` networks on one batch: ``[b, P]``, ``[N, 1, 28, 28]`` -> ``[b, N, 10]``.

        The first layer of all ``b`` networks is one wide matrix multiply (``[N, 784] x [784, 10b]``),
        which runs near the machine's peak, unlike ``b`` skinny ones.
        """
        p = self.layout().unflatten(flat)
        b, hidden = flat.shape[0], self.sizes[1]
        h = x.flatten(1) @ p["fc1.weight"].reshape(b * hidden, -1).T  # [N, b*H]
        h = torch.relu(h.view(-1, b, hidden) + p["fc1.bias"])  # [N, b, H]
        return torch.einsum("nbi,boi->bno", h, p["fc2.weight"]) + p["fc2.bias"][:, None, :]  # [b, N, 10]


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per network: logits ``[B, N, C]``, labels ``[N]`` -> ``[B]``."""
    b, n, c = logits.shape
    return F.cross_entropy(logits.reshape(b * n, c), y.repeat(b), reduction="none").view(b, n).mean(-1)
