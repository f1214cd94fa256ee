"""A task of your own: a small CNN on MNIST (two 8-channel convolutions, max pooling, a linear readout).

The unit symmetry (which channels may be reordered without changing the function) is derived from
the chain of layers, so neuron tokens and permutation augmentation work as for an MLP. The
smallest commands that run end to end (about three minutes on 2 CPU cores: a CNN's checkpoints
cost more to evaluate than an MLP's, so the corpus keeps 20 per run, measured on 1,000 test
images, and eval trains its baselines for 300 steps)::

    learned-opt corpus --task examples/custom_cnn.py:SmallCNN --runs 4 --epochs 1 --checkpoints 20 \
        --eval-examples 1000 --out c-cnn/ --data-root DATA
    learned-opt train --store c-cnn/ --out g-cnn/ --preset tiny --steps 20 --tokens neuron
    learned-opt eval --generator g-cnn/mnist-small-cnn.json --task examples/custom_cnn.py:SmallCNN --inits 2 \
        --max-steps 300 --repeats 2 --prompts 5 --out e-cnn/ --data-root DATA
"""

from torch import nn

from learned_opt.tasks import SupervisedTask, load_mnist


class SmallCNN(SupervisedTask):
    name = "mnist-small-cnn"

    def build_model(self):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),  # [8, 7, 7]
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [8, 3, 3]
            nn.Flatten(), nn.Linear(8 * 3 * 3, 10),  # each channel owns 9 inputs of the readout
        )

    def load_data(self, root=None, *, download=False):
        return load_mnist(root, download=download)
