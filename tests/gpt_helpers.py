"""Small generators and a toy problem shared by the optimizer tests (no files, no data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator
from learned_opt.layout import Layout
from learned_opt.normalization import Normalization
from learned_opt.pretrained import LoadedGenerator, sha256_file
from learned_opt.tasks import MLP

SIZES = (8, 6, 3)  # a 75-parameter MLP: fc1.weight [6, 8], fc1.bias, fc2.weight [3, 6], fc2.bias
NORM = Normalization(param_scale=2.0, metric_lo=0.0, metric_hi=5.0)
DIFFUSION = DiffusionConfig(num_steps=100)


def toy_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES)


def toy_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, SIZES[0], generator=g)
    return x, torch.randn(64, SIZES[-1], generator=g)


def toy_loss(model: nn.Module, data=None) -> torch.Tensor:
    x, y = data if data is not None else toy_data()
    return nn.functional.mse_loss(model(x), y)


def tiny_generator(perturb: float = 0.0, seed: int = 0, name: str = "toy-tiny", chunk_size: int = 16) -> LoadedGenerator:
    """A tiny untrained generator for the toy MLP; ``perturb`` > 0 makes its decoder non-zero,
    so that samples differ from θ (and depend on the sampling noise)."""
    torch.manual_seed(seed)
    layout = Layout.of(toy_model(), chunk_size=chunk_size)
    model = build_generator(layout, "tiny")
    if perturb:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in model.decoder.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * perturb)
    return LoadedGenerator.from_model(
        model, DIFFUSION, NORM, name=name, task="toy", metric="loss", best_prompt=0.0, metric_direction="min"
    )


def save_tiny_generator(folder: Path, **kwargs) -> Path:
    """Write ``tiny_generator(**kwargs)`` as a manifest + safetensors pair; return the manifest path.

    (``save_generator`` needs a registered task; the toy one is not registered.)
    """
    from safetensors.torch import save_file

    gen = tiny_generator(**kwargs)
    weights = Path(folder) / f"{gen.name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in gen.model.state_dict().items()}, str(weights))
    manifest = dict(gen.manifest, weights_file=weights.name, weights_sha256=sha256_file(weights))
    path = weights.with_suffix(".json")
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


class FnGenerator(LoadedGenerator):
    """A generator whose sample is ``fn(theta)``: for deliberately good or bad updates."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], base: LoadedGenerator | None = None):
        base = base or tiny_generator()
        super().__init__(base.name, base.manifest, base.model, base.diffusion, base.normalization, base.sha256)
        self.fn = fn
        self.calls = 0

    def sample(self, theta, metric, prompt, *, steps=None, method=None, t_min=None, guidance=None, temperature=None,
               guidance_taper=None, generator):
        self.calls += 1
        self.last_call = dict(theta=theta.clone(), metric=metric.clone(), prompt=prompt.clone(), steps=steps,
                              method=method, t_min=t_min)
        return self.fn(theta)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Deep copies of parameters, gradients and optimizer state, for exact comparisons."""
    out = {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }
    if opt is not None:
        sd = opt.state_dict()
        sd.pop("gpt", None)
        out["state"] = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in sd["state"].items()}
        out["groups"] = [dict(g) for g in sd["param_groups"]]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        _equal(a[k], b[k], k)


def _equal(x, y, where: str) -> None:
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            _equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, where
