"""The supervised-classification kind: a model, normalised tensors, cross-entropy.

A concrete task says only what is particular to it — its model and its data (and optionally the
hyperparameter ranges its corpus draws from, ``corpus_ranges``)::

    class Mnist32(SupervisedTask):
        name = "mnist-mlp-32"
        def build_model(self):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
        def load_data(self, root=None, *, download=False):
            return load_mnist(root, download=download)

Everything else follows from the kind. Metrics:

* ``test_loss`` — cross-entropy over the whole test set (generators condition on it by default);
* ``test_error`` — test-set error in percent;
* ``train_loss`` — cross-entropy over the first ``train_loss_examples`` training examples (a
  fixed slice, so that evaluating a run's 200 checkpoints stays cheap).

:meth:`SupervisedTask.validation_data` holds out the last ``holdout`` training examples in place of
the test set, for choices that must not see it; :meth:`SupervisedTask.matching_inputs` (what output
matching compares networks on) is the training data outside that holdout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..recipes import SupervisedRanges
from .base import Metric, Task


@dataclass
class ClassificationData:
    """A classification dataset as normalised float tensors in memory."""

    train_x: torch.Tensor  # [N_train, ...] float32, normalised
    train_y: torch.Tensor  # [N_train] int64
    test_x: torch.Tensor  # [N_test, ...]
    test_y: torch.Tensor  # [N_test]

    def to(self, device: torch.device | str) -> "ClassificationData":
        return type(self)(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


class SupervisedTask(Task):
    """A classifier trained with cross-entropy on in-memory tensors (:class:`ClassificationData`)."""

    kind = "supervised"
    description = "a classifier trained with cross-entropy"
    metrics = {
        "test_loss": Metric("test_loss", "min", 0.0, "cross-entropy on the full test set"),
        "test_error": Metric("test_error", "min", 0.0, "error on the test set, in percent"),
        "train_loss": Metric("train_loss", "min", 0.0, "cross-entropy on the first training examples"),
    }
    default_metric = "test_loss"
    train_loss_examples = 10_000  # the fixed slice of training data ``train_loss`` measures
    # per-channel {"mean": [...], "std": [...]} that load_data applies to pixel values in [0, 1]: a
    # generator's manifest records it, since its networks only work on inputs prepared the same way
    input_normalization: Mapping[str, Sequence[float]] | None = None
    corpus_ranges: SupervisedRanges | None = None  # None for the kind's defaults

    def validation_data(self, data: ClassificationData, holdout: int = 5000) -> ClassificationData:
        """The last ``holdout`` training examples in place of the test set (the ``test_*`` metrics
        then measure them); the rest stay the training set."""
        n = int(data.train_x.shape[0])
        if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < n:
            raise ConfigError(f"holdout must be an integer between 1 and {n - 1} (training examples held out), "
                              f"got {holdout!r}")
        m = n - holdout
        return type(data)(data.train_x[:m], data.train_y[:m], data.train_x[m:], data.train_y[m:])

    def labelling_data(self, data: ClassificationData, holdout: int = 5000, examples: int = 10_000) -> ClassificationData:
        """The ``examples`` training examples just before the ``holdout`` validation examples in
        place of the test set."""
        rest = self.validation_data(data, holdout)
        n = int(rest.train_x.shape[0])
        if isinstance(examples, bool) or not isinstance(examples, int) or not 1 <= examples < n:
            raise ConfigError(f"labelling examples must be an integer between 1 and {n - 1} (training examples "
                              f"outside the {holdout} held out for validation), got {examples!r}")
        return self.validation_data(rest, examples)

    def matching_inputs(self, data: ClassificationData) -> torch.Tensor:
        """The training inputs outside the default validation holdout."""
        return self.validation_data(data).train_x

    def matching_labels(self, data: ClassificationData) -> torch.Tensor:
        """The labels of :meth:`matching_inputs`."""
        return self.validation_data(data).train_y

    def excess_loss(
        self, flat: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """max(0, cross-entropy of ``flat`` − cross-entropy of ``target``) on ``inputs``, per network ``[B]``."""
        mine = cross_entropy(self.logits(flat.float(), inputs), labels)
        with torch.no_grad():
            theirs = cross_entropy(self.logits(target.float(), inputs), labels)
        return torch.relu(mine - theirs)

    @torch.no_grad()
    def evaluate(
        self, flat: torch.Tensor, data: ClassificationData, metrics: Sequence[str] | None = None, chunk: int = 50
    ) -> dict[str, torch.Tensor]:
        """``test_loss``, ``test_error`` and ``train_loss`` of many parameter vectors ``[B, P]`` at once."""
        metrics = list(metrics or self.metrics)
        for m in metrics:
            self.metric(m)  # raises on an unknown name
        out: dict[str, list[torch.Tensor]] = {m: [] for m in metrics}
        for part in flat.float().split(chunk):
            if "test_loss" in metrics or "test_error" in metrics:
                logits = self.logits(part, data.test_x)  # [b, N, C]
                if "test_loss" in metrics:
                    out["test_loss"].append(cross_entropy(logits, data.test_y))
                if "test_error" in metrics:
                    wrong = logits.argmax(-1) != data.test_y
                    out["test_error"].append(wrong.float().mean(-1) * 100.0)
            if "train_loss" in metrics:
                k = self.train_loss_examples
                out["train_loss"].append(cross_entropy(self.logits(part, data.train_x[:k]), data.train_y[:k]))
        return {m: torch.cat(v) for m, v in out.items()}

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one network's logits ``[N, C]`` against labels ``[N]``."""
        return F.cross_entropy(logits, y)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per network: logits ``[B, N, C]``, labels ``[N]`` -> ``[B]``."""
    b, n, c = logits.shape
    return F.cross_entropy(logits.reshape(b * n, c), y.repeat(b), reduction="none").view(b, n).mean(-1)
