"""``cifar10-cnn``: G.pt's CIFAR-10 CNN (5,418 parameters), the network of ``mnist-cnn`` with 3
input channels. CIFAR-10 is read with torchvision's ``CIFAR10`` loader from the data root
(``DATA/cifar-10-batches-py``), normalised per channel (:func:`load_cifar10`); without it the
error says how to get it (``--download``, on a machine with a network).
"""

from torch import nn

from .datasets import CIFAR10_NORMALIZATION, load_cifar10
from .mnist_cnn import gpt_cnn
from .supervised import SupervisedTask


class Cifar10CNN(SupervisedTask):
    name = "cifar10-cnn"
    description = "CIFAR-10, G.pt's CNN (5,418 parameters)"
    input_normalization = CIFAR10_NORMALIZATION

    def build_model(self) -> nn.Sequential:
        return gpt_cnn(3)

    def load_data(self, root=None, *, download: bool = False):
        return load_cifar10(root, download=download)
