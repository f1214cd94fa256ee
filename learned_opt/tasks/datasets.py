"""Datasets the tasks read, as normalised tensors, from a local folder in torchvision's layout.

Nothing is downloaded unless the caller passes ``download=True``. :func:`tensors_from` turns any
torchvision-style dataset (PIL images or arrays, integer targets) into normalised tensors; it is how
the loaders below work, and how a test feeds ``torchvision.datasets.FakeData`` to a task.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ..data import resolve_data_root
from ..errors import DataError, DataNotFoundError
from .supervised import ClassificationData

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# what the loaders apply, as tasks expose it (``SupervisedTask.input_normalization``) and manifests record it
MNIST_NORMALIZATION = {"mean": list(MNIST_MEAN), "std": list(MNIST_STD)}
CIFAR10_NORMALIZATION = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def tensors_from(dataset, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [N, C, H, W] float32 normalised per channel, y [N] int64)`` from a torchvision dataset."""
    data = getattr(dataset, "data", None)
    if data is not None and hasattr(dataset, "targets"):  # MNIST / CIFAR: the whole array at once
        x = torch.as_tensor(np.asarray(data)).float().div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # [N, C, H, W]
        y = torch.as_tensor(np.asarray(dataset.targets)).long()
    else:  # anything indexable yielding (PIL image, target)
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        x = torch.stack([torch.as_tensor(np.asarray(im, dtype=np.float32)) for im in images]).div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        y = torch.as_tensor(labels).long()
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(), y


def load_mnist(root: str | os.PathLike | None = None, *, download: bool = False) -> ClassificationData:
    """MNIST from ``root`` (or ``$LEARNED_OPT_DATA``), normalised with mean 0.1307, std 0.3081:
    ``train_x [60000, 1, 28, 28]``, ``test_x [10000, 1, 28, 28]``."""
    from torchvision.datasets import MNIST  # imported lazily: only tasks with data need it

    return _load(MNIST, "MNIST", root, download, MNIST_MEAN, MNIST_STD, "MNIST/raw", (60_000, 10_000))


def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = False) -> ClassificationData:
    """CIFAR-10 from ``root`` (or ``$LEARNED_OPT_DATA``), normalised per channel:
    ``train_x [50000, 3, 32, 32]``, ``test_x [10000, 3, 32, 32]``."""
    from torchvision.datasets import CIFAR10

    return _load(CIFAR10, "CIFAR-10", root, download, CIFAR10_MEAN, CIFAR10_STD, "cifar-10-batches-py", (50_000, 10_000))


def _load(cls, what: str, root, download: bool, mean, std, expected: str, sizes: tuple[int, int],
          classes: int = 10) -> ClassificationData:
    """``cls``'s two splits from ``root``: :class:`DataNotFoundError` when ``root / expected`` is not
    there, :class:`DataError` when it is but a split cannot be read or is not what it should be
    (``sizes`` examples, labels ``0 .. classes - 1``)."""
    root = resolve_data_root(root)
    splits = {}
    for train, size in zip((True, False), sizes):
        split = "training" if train else "test"
        unreadable = (f"{what}'s {split} split under {root / expected} cannot be read ({{}}): a file there is "
                      f"missing, damaged, truncated or of another split; replace the folder's files with intact ones")
        try:
            ds = cls(str(root), train=train, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found", "... or corrupted", or a failed read
            if (root / expected).is_dir() or "not found" not in str(exc).lower():
                raise DataError(unreadable.format(exc)) from None
            raise DataNotFoundError(
                f"{what} not found under {root} (expected {root / expected}): point --data-root or "
                f"LEARNED_OPT_DATA at a folder holding {what} in torchvision's layout; nothing is downloaded "
                f"unless asked (`learned-opt corpus --download`, or download=True in Python)"
            ) from None
        except (ValueError, OSError, EOFError, IndexError) as exc:  # e.g. an empty file
            raise DataError(unreadable.format(f"{type(exc).__name__}: {exc}")) from None
        x, y = tensors_from(ds, mean, std)
        if len(x) != len(y) or len(x) != size:
            raise DataError(unreadable.format(f"{len(x)} images and {len(y)} labels, where it holds {size}"))
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes:
            raise DataError(unreadable.format(f"labels from {int(y.min())} to {int(y.max())}, not 0 to {classes - 1}"))
        splits[train] = x, y
    return ClassificationData(*splits[True], *splits[False])
