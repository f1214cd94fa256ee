"""``mnist-cnn``: G.pt's CIFAR-10 CNN with one input channel, on MNIST (5,130 parameters).

``Conv2d(1, 16, 3, stride 2, padding 1)`` -> ReLU -> ``Conv2d(16, 32, 3, stride 2, padding 1)``
-> ReLU -> global average pool -> ``Linear(32, 10)``. Parameters, in signature order:
``0.weight`` [16, 1, 3, 3], ``0.bias`` [16], ``2.weight`` [32, 16, 3, 3], ``2.bias`` [32],
``6.weight`` [10, 32], ``6.bias`` [10]. Inputs are normalised MNIST images (:func:`load_mnist`).
"""

from torch import nn

from ..recipes import SupervisedRanges
from .datasets import MNIST_NORMALIZATION, load_mnist
from .supervised import SupervisedTask


def gpt_cnn(in_channels: int) -> nn.Sequential:
    """G.pt's small CNN: two stride-2 convolutions, global average pooling, a linear readout."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )


class MnistCNN(SupervisedTask):
    name = "mnist-cnn"
    description = "MNIST, G.pt's CNN with one input channel (5,130 parameters)"
    input_normalization = MNIST_NORMALIZATION
    # One epoch of this CNN costs ~30x the MLP's (~3 s on one CPU thread at batch 128) and already
    # takes G.pt's recipe to ~25% test error (~12% after 3): short runs make a corpus of 1,000
    # affordable on CPU, and their 200 checkpoints cover the part of training one update must jump.
    corpus_ranges = SupervisedRanges(epochs=(1, 2, 3, 4))

    def build_model(self) -> nn.Sequential:
        return gpt_cnn(1)

    def load_data(self, root=None, *, download: bool = False):
        return load_mnist(root, download=download)
