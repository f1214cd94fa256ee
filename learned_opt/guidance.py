"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) for a sampler's model calls.

A generator trained with prompt dropout (``learned-opt train --prompt-dropout P``) predicts θ′
both with the prompt and without it: in a share P of its training pairs the prompt's tokens
(the prompted metric l′ and the difference l′ − l) were replaced by a learned null prompt, while
θ and its current metric l stayed. With guidance scale w the sampler uses

    x̂0 = x̂0(θ, l, no prompt) + w · (x̂0(θ, l, l′) − x̂0(θ, l, no prompt))

at every step: w = 1 is the plain conditional prediction (and the sampler then runs its plain
path, one model call per step, bit for bit as without guidance), w = 0 ignores the prompt and
w > 1 moves further in the direction the prompt points. Both predictions come from one model
call on a doubled batch. The model is any callable taking ``drop_prompt`` (``[B]`` bool) among
its conditioning, like :class:`~learned_opt.generator.Gpt`.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Callable, Mapping

import torch

from .errors import ConfigError

__all__ = ["check_guidance", "guided_denoiser"]


def check_guidance(value, where: str = "guidance") -> float:
    """``value`` as a float; :class:`ConfigError` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"Invalid {where}: {value!r} (a guidance scale: a finite number >= 0; 1 is plain "
                          f"conditional sampling, above 1 follows the prompt more strongly)")
    return float(value)


def guided_denoiser(
    model: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor], scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t [B, ...], t [B]) -> x̂0`` guided with ``scale``, from one call of ``model`` on ``2B`` rows.

    The conditioning is doubled once: rows ``:B`` keep the prompt, rows ``B:`` drop it. A model
    with a ``condition(**cond)`` method is conditioned once, as :meth:`Diffusion.sample` does.
    """
    tensors = [v for v in cond.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise ConfigError("classifier-free guidance needs tensor conditioning to double")
    b = tensors[0].shape[0]
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    keep = torch.zeros(b, dtype=torch.bool, device=tensors[0].device)
    doubled["drop_prompt"] = torch.cat([keep, ~keep])  # [2B]: the prompt kept, then dropped
    if callable(getattr(model, "condition", None)):
        both = model.condition(**doubled)
    else:
        both = functools.partial(model, **doubled)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = both(torch.cat([x, x]), torch.cat([t, t]))  # [2B, ...]
        with_prompt, without = out[:b], out[b:]
        return without + scale * (with_prompt - without)

    return denoise
