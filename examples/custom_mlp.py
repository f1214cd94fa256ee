"""A task of your own: an MLP 784-32-10 on MNIST, a width the package ships no generator for.

Make a corpus, train a generator, evaluate it, then use it in a training loop (see
``docs/your-own-model.md``)::

    learned-opt corpus --task examples/custom_mlp.py:Mnist32 --runs 4 --epochs 1 --out c/ --data-root DATA
    learned-opt train --store c/ --out g/ --preset tiny --steps 20
    learned-opt eval --generator g/mnist-mlp-32.json --task examples/custom_mlp.py:Mnist32 --inits 2 --out e/ --data-root DATA

Run this file to make one generative update with that generator:
``python examples/custom_mlp.py g/mnist-mlp-32.json [DATA]`` (DATA: torchvision's MNIST folder;
``$LEARNED_OPT_DATA`` when left out).
"""

import sys

from torch import nn

from learned_opt.tasks import MNIST_NORMALIZATION, SupervisedTask, load_mnist


class Mnist32(SupervisedTask):
    name = "mnist-mlp-32"
    input_normalization = MNIST_NORMALIZATION  # what load_mnist applies; the generator's manifest records it

    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    def load_data(self, root=None, *, download=False):
        return load_mnist(root, download=download)  # normalised train/test tensors


if __name__ == "__main__":
    import torch
    import torch.nn.functional as F

    from learned_opt import DataNotFoundError, GptOptimizer

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python examples/custom_mlp.py GENERATOR.json [DATA]  (make a generator with the commands above)")
    task = Mnist32()
    try:
        data = task.load_data(sys.argv[2] if len(sys.argv) == 3 else None)  # None: $LEARNED_OPT_DATA
    except DataNotFoundError:
        sys.exit("MNIST not found: pass its folder as DATA (torchvision's layout, DATA/MNIST/raw) "
                 "or set LEARNED_OPT_DATA")
    model = task.build_model()
    opt = GptOptimizer(model.parameters(), generator=sys.argv[1], lr=1e-3)
    x_val, y_val = data.train_x[-5000:], data.train_y[-5000:]  # held out from training, not the test set

    def held_out_loss() -> torch.Tensor:  # generate() conditions on a metric measured without gradients
        return F.cross_entropy(model(x_val), y_val)

    report = opt.generate(held_out_loss)
    after = "not measured" if report.metric_after is None else f"{report.metric_after:.3f}"  # a failed sample
    why = "" if report.accepted else f" ({report.reason})"
    print(f"accepted={report.accepted}{why} held-out loss {report.metric_before:.3f} -> {after}")
