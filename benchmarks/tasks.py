"""Held-out MNIST MLPs for ``learned-opt bench --mode lopt``: sizes that neither meta-training
(MLPs of widths up to 16 at 28x28, up to 64 at 14x14) nor any corpus has seen.

    learned-opt bench --mode lopt --data-root DIR --out bench-lopt/ \\
        --task benchmarks/tasks.py:Mlp128x64 --task benchmarks/tasks.py:Mlp48x24

Each is a :class:`~learned_opt.tasks.SupervisedTask` as ``mnist-mlp`` is: 28x28 normalised MNIST
(:func:`~learned_opt.tasks.load_mnist`), ReLU between layers, PyTorch's default init.
"""

from __future__ import annotations

from learned_opt.tasks import MLP, SupervisedTask, load_mnist
from learned_opt.tasks.datasets import MNIST_NORMALIZATION


class HeldOutMnistMLP(SupervisedTask):
    """An MNIST MLP of ``sizes`` (a subclass sets ``name``, ``description`` and ``sizes``)."""

    sizes: tuple[int, ...] = ()
    input_normalization = MNIST_NORMALIZATION

    def build_model(self) -> MLP:
        return MLP(self.sizes)

    def load_data(self, root=None, *, download: bool = False):
        return load_mnist(root, download=download)


class Mlp128x64(HeldOutMnistMLP):
    name = "mnist-mlp-128x64"
    description = "MNIST, MLP 784-128-64-10 ReLU (109,386 parameters), held out from meta-training"
    sizes = (784, 128, 64, 10)


class Mlp48x24(HeldOutMnistMLP):
    name = "mnist-mlp-48x24"
    description = "MNIST, MLP 784-48-24-10 ReLU (39,106 parameters), held out from meta-training"
    sizes = (784, 48, 24, 10)


class Mlp32(HeldOutMnistMLP):
    name = "mnist-mlp-32-validation"
    description = "MNIST, MLP 784-32-10 (25,450 parameters): the learned optimizer's validation task (benchmarks/lopt_select.py)"
    sizes = (784, 32, 10)
