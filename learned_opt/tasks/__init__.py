"""Tasks: an architecture, its data (or environment) and its metrics.

A task is one short file: a subclass of a *kind* that says only what is particular to it.

* :class:`SupervisedTask` — a classifier on in-memory tensors (cross-entropy; ``test_loss``,
  ``test_error``, ``train_loss``);
* :class:`ControlTask` — a policy in a gymnasium environment (greedy ``return``).

Registered tasks (:func:`names`):

================  ===================================================================
``mnist-mlp``     MNIST, MLP 784-10-10 ReLU (7,960 parameters), metric test loss
``mnist-cnn``     MNIST, G.pt's CNN with one input channel (5,130 parameters)
``cifar10-cnn``   CIFAR-10, G.pt's CNN (5,418 parameters)
``cartpole-mlp``  CartPole-v1 policy, MLP 4-32-32-2 tanh (1,282 parameters), return
================  ===================================================================

:func:`get` also takes ``path/to/file.py:ClassName`` and ``package.module:ClassName``, and installed
packages add tasks through the ``learned_opt.tasks`` entry-point group (:mod:`.registry`).
"""

from .base import MLP, Metric, Task, batched_forward
from .cartpole_mlp import CartPoleMLP
from .cifar10_cnn import Cifar10CNN
from .control import ControlData, ControlTask
from .datasets import CIFAR10_NORMALIZATION, MNIST_NORMALIZATION, load_cifar10, load_mnist, tensors_from
from .mnist_cnn import MnistCNN
from .mnist_mlp import MnistMLP
from .registry import for_generator, get, names, register, source_of
from .supervised import ClassificationData, SupervisedTask, cross_entropy

for _task in (MnistMLP, MnistCNN, Cifar10CNN, CartPoleMLP):
    register(_task.name, _task)

MnistData = ClassificationData  # the name earlier releases used
CartPoleData = ControlData

__all__ = [
    "CIFAR10_NORMALIZATION", "MNIST_NORMALIZATION", "MLP", "CartPoleData", "CartPoleMLP", "Cifar10CNN", "ClassificationData", "ControlData", "ControlTask",
    "Metric", "MnistCNN", "MnistData", "MnistMLP", "SupervisedTask", "Task", "batched_forward",
    "cross_entropy", "for_generator", "get", "load_cifar10", "load_mnist", "names", "register", "source_of", "tensors_from",
]
