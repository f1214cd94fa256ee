"""A user task whose unit symmetry is declared by hand: LayerNorm's affine parameters move with
the hidden units they scale, which the chain derivation does not know."""

from torch import nn

from learned_opt.symmetry import Slot, Symmetry, UnitGroup
from learned_opt.tasks import SupervisedTask, load_mnist


class LayerNormMLP(SupervisedTask):
    name = "mnist-layernorm-mlp"

    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10))

    def load_data(self, root=None, *, download=False):
        return load_mnist(root, download=download)

    def symmetry(self):
        incoming = (Slot("1.weight", 0), Slot("1.bias", 0), Slot("2.weight", 0), Slot("2.bias", 0))
        return Symmetry((UnitGroup(8, incoming, (Slot("4.weight", 1),)),))
