"""Training pieces: the residual scale estimate, per-layer loss weights, AdamW with its schedule, the EMA."""

from __future__ import annotations

import copy
import math

import torch

from learned_opt.errors import TrainingError
from learned_opt.generator import Gpt
from learned_opt.layout import Layout

from ..dataset import PairDataset, PairSampler
from .config import TrainConfig


RESIDUAL_FLOOR = 0.05  # no parameter's σ_p below this share of the pooled σ


def sample_updates(pairs: PairDataset, sampler: PairSampler, count: int = 1024) -> torch.Tensor:
    """``θ′ - θ`` (generator units) ``[count, P]`` of training pairs drawn (and permuted) as
    training draws them, from a seeded stream of their own."""
    out = []
    for b in range(math.ceil(count / sampler.batch_size)):
        indices, perms = sampler.global_batch(b, stream="residual-std")
        batch = pairs.batch(indices, perms)
        out.append(batch.theta_next - batch.theta)
    return torch.cat(out)[:count]


def residual_scale_estimate(updates: torch.Tensor) -> torch.Tensor:
    """Root mean square per parameter ``[P]`` of sampled updates ``[N, P]`` (:func:`sample_updates`):
    the σ_p of the preconditioned generator, floored at ``RESIDUAL_FLOOR`` times the pooled value."""
    per_param = updates.double().square().mean(0).sqrt()
    pooled = per_param.square().mean().sqrt().item()
    if not pooled > 0:
        raise TrainingError("θ′ - θ is zero on every sampled training pair; the corpus is degenerate")
    return per_param.clamp(min=RESIDUAL_FLOOR * pooled).float()


def layer_weights(layout: Layout, balance: float) -> torch.Tensor:
    """``[1, P]``: parameter p's weight ``(P / n_l) ** balance`` for a layer (parameter tensor) of
    ``n_l`` values, scaled to mean 1. 0 weighs every parameter alike (the default); 1 gives every
    parameter tensor the same share of the loss (a bias is a tensor of its own), so that a
    network's 100 output weights count as much as its 7,840 input weights, since they decide as
    much of its function; on ``mnist-mlp`` the two 10-value biases then weigh 199 times a mean
    parameter each, and the input weights 0.25 times."""
    sizes = torch.tensor(layout.sizes, dtype=torch.float64)
    per_layer = (layout.num_params / sizes) ** balance
    weights = torch.repeat_interleave(per_layer, torch.tensor(layout.sizes))
    return (weights / weights.mean()).float().unsqueeze(0)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Gpt, config: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over decay / no-decay groups and its warmup-cosine schedule."""
    opt = torch.optim.AdamW(model.optim_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.999))

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no callables
        return lr_factor(step, config.warmup, config.steps, config.min_lr_ratio)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Ema:
    """An exponential moving average of a model's weights (the copy that gets exported)."""

    def __init__(self, model: Gpt, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def decay_at(self, step: int) -> float:
        """``decay``, ramped in over the first steps so a short run's EMA is not its initialisation."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: Gpt, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), weight)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
