"""``mnist-mlp``: G.pt's MNIST MLP, 784-10-10 with ReLU (7,960 parameters).

Parameters, in signature order (part of the format of every corpus and generator for this task):
``fc1.weight`` [10, 784], ``fc1.bias`` [10], ``fc2.weight`` [10, 10], ``fc2.bias`` [10]. The
forward takes normalised images ``[N, 1, 28, 28]`` (mean 0.1307, std 0.3081: :func:`load_mnist`)
and returns logits ``[N, 10]``.
"""

from .base import MLP, Metric
from .datasets import MNIST_NORMALIZATION, load_mnist
from .supervised import SupervisedTask


class MnistMLP(SupervisedTask):
    name = "mnist-mlp"
    description = "MNIST, MLP 784-10-10 ReLU (7,960 parameters), G.pt's MNIST task"
    input_normalization = MNIST_NORMALIZATION
    metrics = {**SupervisedTask.metrics,
               "test_error": Metric("test_error", "min", 5.0, "error on the MNIST test set, in percent")}

    def build_model(self) -> MLP:
        return MLP((784, 10, 10))

    def load_data(self, root=None, *, download: bool = False):
        return load_mnist(root, download=download)
