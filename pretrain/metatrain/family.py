"""The inner tasks of meta-training: small MLPs on downsampled MNIST, drawn at random.

A task is an MLP of random depth and widths (:class:`MlpSpec`) on MNIST at ``image_size`` x
``image_size`` (average-pooled from 28 x 28 for speed) or, per task, pooled further by a factor of
``pools``, with a random minibatch size and a random init scale; ``max_params`` bounds its size.
The data split is the package's :class:`~learned_opt.tasks.SupervisedTask` machinery: the last
``holdout`` training images are the validation set the outer loss reads; the test set is never
seen. A population trains one task at a time, every member from the same init on the same
minibatches (only the rule's perturbation differs), with :func:`torch.func.vmap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from learned_opt.errors import ConfigError
from learned_opt.tasks import ClassificationData, SupervisedTask, load_mnist
from learned_opt.tasks.base import MLP


@dataclass(frozen=True)
class MlpSpec:
    """One inner task: layer sizes (input first, 10 classes last), minibatch size, init scale."""

    sizes: tuple[int, ...]
    batch_size: int
    init_scale: float

    def to_json(self) -> dict:
        return {"sizes": list(self.sizes), "batch_size": self.batch_size, "init_scale": self.init_scale}

    @property
    def num_params(self) -> int:
        return sum(a * b + b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Flat images ``[B, S*S]`` average-pooled to this task's input resolution."""
        side, mine = math.isqrt(x.shape[1]), math.isqrt(self.sizes[0])
        if mine == side:
            return x
        return F.avg_pool2d(x.view(-1, 1, side, side), side // mine).flatten(1)


class MnistMlpFamily(SupervisedTask):
    """MLPs of varied depths and widths on downsampled MNIST (the task kind's data split and loss)."""

    name = "mnist-mlp-family"
    description = "MLPs of random depth/width on downsampled MNIST"

    def __init__(self, image_size: int = 14, widths=(16, 32, 64), depths=(1, 2), batch_sizes=(32, 64, 128),
                 init_scales=(0.5, 2.0), pools=(1,), max_params: int = 0):
        if not widths or not depths or not batch_sizes:
            raise ConfigError(f"the task distribution yields no task: widths {list(widths)}, depths {list(depths)}, "
                              f"batch sizes {list(batch_sizes)}; give at least one of each")
        if any(int(w) < 1 for w in widths) or any(int(d) < 0 for d in depths) or any(int(b) < 1 for b in batch_sizes):
            raise ConfigError("widths and batch sizes must be >= 1 and depths >= 0")
        lo, hi = init_scales
        if not 0 < lo <= hi:
            raise ConfigError(f"init scales must satisfy 0 < low <= high, got {list(init_scales)}")
        if not 1 <= image_size <= 28 or 28 % image_size:
            raise ConfigError(f"image_size must divide 28 (7, 14 or 28), got {image_size}")
        if not pools or any(int(k) < 1 or image_size % int(k) for k in pools):
            raise ConfigError(f"pool factors must divide image_size {image_size}, got {list(pools)}")
        if max_params < 0:
            raise ConfigError(f"max_params must be >= 0 (0: no limit), got {max_params}")
        self.image_size, self.widths, self.depths = image_size, tuple(widths), tuple(depths)
        self.batch_sizes, self.init_scales = tuple(batch_sizes), (float(lo), float(hi))
        self.pools, self.max_params = tuple(int(k) for k in pools), int(max_params)
        smallest = MlpSpec(((image_size // max(self.pools)) ** 2, *[min(widths)] * min(depths), 10), 1, 1.0)
        if self.max_params and smallest.num_params > self.max_params:
            raise ConfigError(f"the task distribution yields no task within max_params {self.max_params}: the "
                              f"smallest MLP has {smallest.num_params} parameters")

    def sample(self, gen: torch.Generator) -> MlpSpec:
        """A task: input resolution ``image_size / k`` for a pool factor ``k`` of ``pools``, hidden
        widths, batch size and init scale; drawn again while it has more than ``max_params``."""
        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=gen))]

        while True:  # terminates: the smallest task fits (checked in __init__)
            side = self.image_size // pick(self.pools)
            depth = pick(self.depths)
            hidden = [pick(self.widths) for _ in range(depth)]
            lo, hi = self.init_scales
            scale = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand((), generator=gen)))
            spec = MlpSpec((side ** 2, *hidden, 10), pick(self.batch_sizes), round(scale, 6))
            if not self.max_params or spec.num_params <= self.max_params:
                return spec

    def build_model(self, spec: MlpSpec | None = None) -> nn.Module:
        return MLP(list(spec.sizes if spec else (self.image_size ** 2, 32, 10)))

    def load_data(self, root=None, *, download: bool = False) -> ClassificationData:
        return self.downsample(load_mnist(root, download=download))

    def downsample(self, data: ClassificationData) -> ClassificationData:
        """Images average-pooled to ``image_size`` and flattened: ``[N, image_size**2]``."""
        k = data.train_x.shape[-1] // self.image_size

        def pool(x):
            return (F.avg_pool2d(x, k) if k > 1 else x).flatten(1).contiguous()

        return ClassificationData(pool(data.train_x), data.train_y, pool(data.test_x), data.test_y)

    def evaluate(self, flat, data, metrics=None, chunk=50):  # not used by meta-training
        raise NotImplementedError("the meta-training family is evaluated through its validation loss")


def init_params(spec: MlpSpec, gen: torch.Generator, pop: int) -> tuple[torch.Tensor, ...]:
    """PyTorch's ``nn.Linear`` init times ``spec.init_scale``, repeated for ``pop`` members:
    ``(w0 [pop, out, in], b0 [pop, out], w1, b1, ...)``."""
    out = []
    for fan_in, fan_out in zip(spec.sizes[:-1], spec.sizes[1:]):
        bound = spec.init_scale / math.sqrt(fan_in)
        w = (torch.rand((fan_out, fan_in), generator=gen) * 2 - 1) * bound
        b = (torch.rand((fan_out,), generator=gen) * 2 - 1) * bound
        out += [w.expand(pop, -1, -1).clone(), b.expand(pop, -1).clone()]
    return tuple(out)


def forward(params, x: torch.Tensor) -> torch.Tensor:
    """One MLP's logits; ``params`` = ``(w0, b0, w1, b1, ...)``, ReLU between layers."""
    n = len(params) // 2
    for i in range(n):
        x = x @ params[2 * i].T + params[2 * i + 1]
        if i < n - 1:
            x = torch.relu(x)
    return x


def loss_of(params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(params, x), y)
