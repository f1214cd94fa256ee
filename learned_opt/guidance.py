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

**Tapered guidance** (where a generator's manifest says ``"guidance_taper": true``, which
``learned-opt tune-sampling`` writes where it aligns updates with their prompts clearly better):
the unconditional prediction is presumably where pairs from θ typically go, which for a corpus of
training runs is a good way towards the best. Moving away from it helps a prompt that asks for more
than that, the generator's best, where the plain prediction falls short; for a prompt that asks
for less it overshoots, towards networks worse than asked (measured on ``mnist-mlp``). So the scale a row gets follows the share
of the possible improvement its prompt asks for,

    a = (l − l′) / (l − l*)  clipped to [0, 1],    w_row = 1 + a (w − 1)

with l the current metric, l′ the prompt and l* the generator's best prompt (signs flip together
for a metric to maximise): w in full at the best prompt (or beyond it), 1 for a prompt that asks
no improvement. A network already past the best and prompted with the best itself (as a periodic
update late in training can be) gets w in full too, as with constant guidance. A sampler prompted with the best, as :class:`~learned_opt.GptOptimizer` is by
default, gets w exactly and the same networks as with constant guidance.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Callable, Mapping, cast

import torch

from .errors import ConfigError

__all__ = ["check_guidance", "guided_denoiser", "tapered_scale"]


def check_guidance(value, where: str = "guidance") -> float:
    """``value`` as a float; :class:`ConfigError` unless it is a finite number >= 0."""
    # cast: any Real orders against numbers; typeshed's numbers.Real declares only __lt__ and __le__
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and cast(float, value) >= 0):
        raise ConfigError(f"Invalid {where}: {value!r} (a guidance scale: a finite number >= 0; 1 is plain "
                          f"conditional sampling, above 1 follows the prompt more strongly)")
    return float(value)


def tapered_scale(scale: float, metric: torch.Tensor, prompt: torch.Tensor, best: float,
                  direction: str = "min") -> torch.Tensor:
    """The guidance scale of each row ``[B]`` for networks at ``metric`` [B] prompted with ``prompt``
    [B]: ``scale`` in full where the prompt is ``best`` or asks for more than the network has and
    at least the best, 1 where it asks no improvement, linear in the share of the possible
    improvement asked for between (see the module docstring). A metric or prompt that is not finite
    gets ``scale``. ``direction`` is ``"min"`` or ``"max"``: the metric's better side."""
    if direction not in ("min", "max"):
        raise ValueError(f"direction must be 'min' or 'max', got {direction!r}")
    sign = 1.0 if direction == "min" else -1.0
    asked = sign * (metric - prompt)  # > 0: the prompt asks for a better network
    possible = sign * (metric - best)  # > 0: the network is short of the best
    beyond = sign * (prompt - best) <= 0  # the prompt asks for the best or more
    full = (prompt == best) | (beyond & (asked > 0))
    short = possible > 0
    share = (asked / possible.where(short, torch.ones_like(possible))).where(short, torch.zeros_like(asked))
    unknown = ~(torch.isfinite(asked) & torch.isfinite(possible))
    share = torch.where(full | unknown, torch.ones_like(share), share.clamp(0.0, 1.0))
    # exactly ``scale`` at share 1: a best-prompt sampler is bit for bit the constant-guidance one
    return torch.where(share >= 1.0, torch.full_like(share, scale), 1.0 + share * (scale - 1.0))


def guided_denoiser(
    model: Callable[..., torch.Tensor], cond: Mapping[str, torch.Tensor], scale: float | torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_t [B, ...], t [B]) -> x̂0`` guided with ``scale`` (a number, or one per row ``[B]``),
    from one call of ``model`` on ``2B`` rows.

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
    if callable(condition := getattr(model, "condition", None)):
        both = condition(**doubled)
    else:
        both = functools.partial(model, **doubled)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = both(torch.cat([x, x]), torch.cat([t, t]))  # [2B, ...]
        with_prompt, without = out[:b], out[b:]
        w = scale if not isinstance(scale, torch.Tensor) else scale.to(out).view(-1, *[1] * (out.dim() - 1))
        return without + w * (with_prompt - without)

    return denoise
