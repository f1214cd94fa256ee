"""The task registry: ``get(name)`` and ``names()``.

=============  ==============================================================
``mnist-mlp``  MNIST, MLP 784-10-10 ReLU (7,960 parameters), metric test loss
=============  ==============================================================
"""

from .base import MLP, Metric, Task, batched_forward, get, names, permute_mlp, register
from .mnist_mlp import MnistData, MnistMLP, load_mnist

register(MnistMLP.name, MnistMLP)

__all__ = [
    "MLP",
    "Metric",
    "MnistData",
    "MnistMLP",
    "Task",
    "batched_forward",
    "get",
    "load_mnist",
    "names",
    "permute_mlp",
    "register",
]
