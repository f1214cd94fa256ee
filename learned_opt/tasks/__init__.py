"""The task registry: ``get(name)`` and ``names()``.

================  ==================================================================
``mnist-mlp``     MNIST, MLP 784-10-10 ReLU (7,960 parameters), metric test loss
``cartpole-mlp``  CartPole-v1 policy, MLP 4-32-32-2 tanh (1,282 parameters), return
================  ==================================================================
"""

from .base import MLP, Metric, Task, batched_forward, get, names, permute_mlp, register
from .cartpole_mlp import CartPoleData, CartPoleMLP
from .mnist_mlp import MnistData, MnistMLP, load_mnist

register(MnistMLP.name, MnistMLP)
register(CartPoleMLP.name, CartPoleMLP)

__all__ = [
    "MLP",
    "CartPoleData",
    "CartPoleMLP",
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
