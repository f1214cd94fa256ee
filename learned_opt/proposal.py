"""The parts of one generative update that talk to the user and to the generator: the metric and
prompt read from what the user gave, θ′ candidates drawn from the generator, and each candidate's
finite and trust-region checks, the measurement of a candidate, and the base step without torch's
second hook wrapper. Used by :meth:`GptOptimizer.generate <learned_opt.optimizer.GptOptimizer.generate>`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Mapping, cast

import torch

from .collectives import from_rank0
from .errors import GenerationError
from .normalization import GPT_TARGET_STD
from .optimizer_checks import prompt_value

MetricValue = float | torch.Tensor | Mapping[str, Any]
# float32's largest finite value: the generator conditions on metrics and prompts in float32
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class GenerationReport:
    """What one generative update did.

    ``accepted`` is True only when θ′ was copied into the parameters. ``failed`` marks a broken
    sample (the generator raised, or returned a non-finite, wrongly shaped or exploding θ′);
    ``reason`` says why an update was not accepted. ``update_ratio`` is ‖θ′−θ‖ divided by the trust
    reference (see :class:`GptOptimizer`); the update is refused above ``max_update_ratio``.
    ``prompt`` is the metric asked for (after clamping), ``step`` the base-step count at the time,
    ``metric_after`` the closure's value with θ′ (None without a closure, or with ``guard=False``
    unless the closure chooses among several points: ``rank="closure"`` and more than one
    candidate or step size). With several ``candidates``, ``candidate_metrics`` holds the closure's
    value for each sample that passed validation (None where it was not finite or the closure
    failed) and θ′ is the best of them; with ``rank="self"`` ``predicted_metrics`` holds the
    generator's predicted metric per sample (None where the sample failed validation) and θ′ is
    the best predicted (``candidate_metrics`` then holds the guard's measurement of it alone).
    ``kept`` marks an update skipped because the metric already met the prompt (``keep_if_met``).
    With several step sizes every candidate is measured (or predicted) at each of them: the lists
    then hold points (candidate-major: each candidate at each step size, ``predicted_metrics``
    all ``candidates × len(step_size)`` of them, ``candidate_metrics`` those that passed
    validation), and ``update_ratio`` is that of the point. ``step_size`` is the α of the point
    kept (or refused by the guard), None when none was chosen.
    """

    accepted: bool
    reason: str | None
    metric_before: float
    metric_after: float | None
    prompt: float
    update_ratio: float | None
    seconds: float
    step: int
    failed: bool = False
    candidates: int = 1
    candidate_metrics: list[float | None] | None = None
    predicted_metrics: list[float | None] | None = None
    kept: bool = False
    step_size: float | None = None


def sample_candidates(opt, theta: torch.Tensor, before: float, target: float) -> tuple[torch.Tensor | None, str | None]:
    """θ′ candidates [C, P] from the generator (one batched call), or the reason they could not be drawn."""
    gen = opt.generator
    dtype = torch.float32
    c, p = opt.candidates, theta.numel()
    try:
        out = gen.sample(
            theta.to(dtype)[None].expand(c, -1),  # [C, P]
            torch.full((c,), before, dtype=dtype, device=theta.device),
            torch.full((c,), target, dtype=dtype, device=theta.device),
            steps=opt.sampling_steps,
            method=opt.sampling_method,
            t_min=opt.sampling_t_min,
            guidance=opt.guidance,
            guidance_taper=opt.guidance_taper,
            temperature=opt.sampling_temperature,
            generator=opt._rng,
        )
    except Exception as exc:  # a broken generator must not break training
        return None, f"the generator raised {exc!r}"
    if not isinstance(out, torch.Tensor) or out.numel() != c * p or out.dim() > 2 or (
        out.dim() == 2 and out.shape[0] != c
    ):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return None, f"the generator returned shape {shape}, expected {[c, p]}"
    return out.reshape(c, p).to(theta.device, torch.float32), None


def along_line(theta: torch.Tensor, samples: torch.Tensor, step_sizes: tuple[float, ...]) -> torch.Tensor:
    """θ + α(θ′ − θ) for each candidate θ′ [C, P] and each step size α: [C·S, P], candidate-major
    (point ``i`` is candidate ``i // S`` at step size ``step_sizes[i % S]``); α = 1 is θ′ itself.
    Computed in θ's precision, at least float32."""
    if step_sizes == (1.0,):
        return samples
    dtype = torch.promote_types(theta.dtype, torch.float32)
    base = theta.to(dtype)
    return torch.stack([s.to(dtype) if a == 1 else base + a * (s.to(dtype) - base)
                        for s in samples for a in step_sizes])


def line_points(opt, theta: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, list[tuple[float | None, str | None]]]:
    """Each candidate θ′ [C, P] at each of ``opt.step_sizes`` (:func:`along_line`, from rank 0's θ
    under torch.distributed, so that every rank loads the same point), and each point's
    ``(update_ratio, reason)`` from :func:`validate_sample`. A point fails when its candidate does,
    whatever its step size (a broken θ′ is not rescued by a short step), and when it fails itself."""
    checks = [validate_sample(opt, theta, s) for s in samples]  # per candidate
    if opt.step_sizes == (1.0,):
        return samples, checks
    s = len(opt.step_sizes)
    points = along_line(from_rank0(theta), samples, opt.step_sizes)
    return points, [checks[i // s] if checks[i // s][1] is not None else validate_sample(opt, theta, p)
                    for i, p in enumerate(points)]


def validate_sample(opt, theta: torch.Tensor, new: torch.Tensor) -> tuple[float | None, str | None]:
    """``(update_ratio, reason)``: reason is None when θ′ passes the finite and trust checks."""
    if not torch.isfinite(new).all():
        return None, "the sampled parameters contain NaN or Inf"
    narrow = [(p.dtype, view) for p, view in zip(opt.params, opt.generator.layout.unflatten(new).values())
              if p.is_floating_point() and torch.finfo(p.dtype).max < torch.finfo(new.dtype).max]
    for dtype, view in narrow:  # e.g. 1e5 in a float16 parameter
        if not torch.isfinite(view.to(dtype)).all():
            return None, f"the sampled parameters overflow a {dtype} parameter"
    theta32 = theta.float()
    corpus_norm = math.sqrt(theta.numel()) * GPT_TARGET_STD / opt.generator.normalization.param_scale
    reference = max(float(theta32.norm()), corpus_norm)
    ratio = float((new - theta32).norm()) / reference
    if not ratio <= opt.max_update_ratio:
        return ratio, (
            f"the update's norm is {ratio:.3g} times the reference norm, above max_update_ratio="
            f"{opt.max_update_ratio:g}"
        )
    return ratio, None

def metric_value(opt, value: MetricValue, where: str) -> float:
    name = opt.generator.metric_name
    if isinstance(value, Mapping):
        if name not in value:
            raise GenerationError(
                f"{where} returned metrics {sorted(map(str, value))}, but the generator "
                f"{opt.generator.name!r} is conditioned on {name!r}; return that metric"
            )
        value = value[name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise GenerationError(f"{where} returned a tensor of shape {list(value.shape)}; return one {name!r} value")
        if value.device.type == "meta":
            raise GenerationError(f"{where} returned a tensor on the meta device, which holds no value; "
                                  f"return the {name!r} computed on real data")
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, Real):  # True would pass for 1.0
        raise GenerationError(f"{where} returned {type(value).__name__}; return the {name!r} as a number")
    value = float(value)
    if not math.isfinite(value):
        raise GenerationError(f"{where} returned {name}={value}; a generative update needs a finite metric")
    if abs(value) > _FLOAT32_MAX:  # the generator computes in float32: this would become inf
        raise GenerationError(
            f"{where} returned {name}={value:g}, beyond float32's range (about ±3.4e38) that the generator "
            f"computes in; pass the metric in its usual units"
        )
    return value

def resolve_prompt(opt, prompt, metric: float) -> float:
    gen = opt.generator
    if prompt is None:
        prompt = gen.best_prompt
    elif callable(prompt):
        prompt = prompt_value(prompt(metric), "the prompt callable", gen.metric_name)
    else:
        prompt = prompt_value(prompt, "the prompt", gen.metric_name)
    lo, hi = gen.metric_range
    if not lo <= prompt <= hi:
        clamped = min(max(prompt, lo), hi)
        warnings.warn(
            f"prompt {prompt:g} is outside the generator's {gen.metric_name} range [{lo:g}, {hi:g}]; "
            f"using {clamped:g}",
            UserWarning,
            stacklevel=5,
        )
        prompt = clamped
    return prompt


def improvement(after: float, before: float, direction: str) -> float:
    """How much better ``after`` is than ``before`` (negative when worse); ``direction`` is
    ``"min"`` or ``"max"``, the better way."""
    return before - after if direction == "min" else after - before


def worse(after: float, before: float, direction: str, margin: float = 0.0) -> bool:
    """Whether ``after`` improves on ``before`` by less than ``margin`` times ``|before|`` (at 0:
    whether it is worse at all)."""
    return improvement(after, before, direction) < margin * abs(before)


def meets(metric, prompt, direction: str):
    """Whether ``metric`` already meets ``prompt`` (floats, or tensors elementwise): ``<=`` for a
    minimised metric, ``>=`` for a maximised one. An update is then not needed."""
    return metric <= prompt if direction == "min" else metric >= prompt


def call_metric(closure: Callable[[], MetricValue], params: list[torch.Tensor]) -> MetricValue:
    """The closure's value, measured under ``torch.no_grad()``; a grad mode the closure switched
    on is switched off again when it returns (else restoring θ would fail on leaf tensors).

    torch's usual loss closure (``zero_grad(); loss = ...; loss.backward(); return loss``) cannot
    run without gradients: it is run again with them and its loss detached. Either way the
    parameters and their ``.grad`` are left as they were (a closure that changes the weights in
    place, then returns or raises, changes nothing), the same tensors with the same values, so an
    update stays transactional and references to them stay valid.
    """
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    values = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            return closure()
    except RuntimeError as exc:
        if "does not require grad" not in str(exc):  # not backward() under no_grad: the closure's own error
            raise
        with torch.enable_grad():
            value = closure()
        return value.detach() if isinstance(value, torch.Tensor) else value
    finally:
        with torch.no_grad():
            for p, value, (grad, saved) in zip(params, values, grads):
                p.copy_(value)  # weights it changed in place
                if grad is not None:
                    grad.copy_(cast(torch.Tensor, saved))  # values the closure changed in place (backward, zero_grad)
                p.grad = grad  # a gradient it set to None or replaced


def load_sample(layout, flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        layout.load_into(flat, params)


def restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    with torch.no_grad():  # whatever grad mode a closure left behind
        for p, b in zip(params, backup):
            p.copy_(b)


def measure(opt, closure: Callable[[], MetricValue]) -> tuple[float | None, str | None]:
    """The closure's finite metric for ``opt``'s parameters as they are, or None and why not."""
    try:
        value = metric_value(opt, call_metric(closure, opt.params), "the closure")
    except GenerationError as exc:  # NaN/Inf, a missing metric, a value that is not one number
        return None, f"with the sampled parameters, {exc}"
    except Exception as exc:  # θ′ broke the closure: the caller restores, counts and reports
        return None, f"the closure failed on the sampled parameters: {exc!r}"
    return value, None


def unhooked_step(base: torch.optim.Optimizer):
    """The base class's step without torch's hook wrapper, or None when that is not safe.

    Only torch's own wrapper (marked ``hooked``) is skipped, and only when nothing patched the
    instance's ``step`` (an LR scheduler or a library built on ``opt.base``): then the base's own
    ``step`` is called as usual.
    """
    step = type(base).step
    if "step" in vars(base) or not getattr(step, "hooked", False):
        return None
    return getattr(step, "__wrapped__", None)
