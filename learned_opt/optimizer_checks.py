"""Argument checks and parameter handling for :class:`~learned_opt.optimizer.GptOptimizer`'s
constructor: each invalid value raises :class:`ConfigError` with a message that says what to pass.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections import Counter
from numbers import Real
from typing import cast

import torch

from .errors import ArchitectureMismatchError, ConfigError, GenerationError
from .layout import listed, shape_differences
from .options import SEED_LIMIT
from .pretrained import LoadedGenerator

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # prefixes that DDP and torch.compile add to names


def check_sampling(steps, method, t_min, candidates, temperature=None) -> None:
    from .diffusion import METHODS, check_temperature

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"Invalid sampling_steps: {steps!r} (None for the generator's own, or an int >= 1)")
    if method is not None and method not in METHODS:
        raise ConfigError(f"Invalid sampling_method: {method!r} (None for the generator's own, or one of {', '.join(METHODS)})")
    if t_min is not None and (isinstance(t_min, bool) or not isinstance(t_min, int) or t_min < 0):
        raise ConfigError(f"Invalid sampling_t_min: {t_min!r} (None for the generator's own, or an int >= 0)")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"Invalid candidates: {candidates!r} (an int >= 1: samples drawn per update, the best kept)")
    if temperature is not None:
        check_temperature(temperature, "sampling_temperature")


def check_step_size(step_size, option: str = "step_size") -> tuple[float, ...]:
    """``step_size`` as a tuple of step sizes α (the update is θ + α(θ′ − θ)); :class:`ConfigError`,
    naming ``option``, unless it is one finite number > 0 or a non-empty sequence of them."""
    values = (step_size,) if isinstance(step_size, Real) else step_size
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if (not values
            or any(isinstance(a, bool) or not isinstance(a, Real) or not 0 < float(a) < math.inf for a in values)
            or len(set(values)) != len(values)):  # numbers only, so hashable
        raise ConfigError(f"Invalid {option}: {step_size!r} (a number > 0, the update being θ + α(θ′ − θ), "
                          f"or several different ones, e.g. 1, 0.5, 0.25, to choose among)")
    return tuple(float(a) for a in values)


def check_chooser(closure, candidates: int, step_sizes: tuple[float, ...], rank: str) -> None:
    """:class:`GenerationError` when the closure must choose among several points (candidates, each
    at each step size, with ``rank="closure"``) and there is none."""
    points = candidates * len(step_sizes)
    if closure is None and points > 1 and rank == "closure":
        line = "" if len(step_sizes) == 1 else f" with step_size={list(step_sizes)}"
        raise GenerationError(
            f"candidates={candidates}{line} needs a closure to choose among the {points} points; pass one (e.g. the "
            f"metric on held-out training data), or build the optimizer with candidates=1{line and ' and one step size'} "
            f"or rank='self'"
        )


def check_prompt(prompt, where: str, error: type[Exception]) -> None:
    """``error`` unless ``prompt`` is a callable or a finite number (a one-element tensor too)."""
    if callable(prompt):
        return
    if isinstance(prompt, torch.Tensor) and prompt.numel() == 1:
        prompt = prompt.item()
    if isinstance(prompt, bool) or not isinstance(prompt, Real) or not math.isfinite(float(prompt)):
        raise error(
            f"Invalid {where}: {prompt!r} (None for the generator's best prompt, a finite number, or a "
            f"callable metric -> prompt)"
        )


def prompt_value(value, where: str, metric_name: str) -> float:
    """The prompt as a float; :class:`GenerationError` unless it is one finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        shown = f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise GenerationError(f"{where} gave {shown}; give one finite {metric_name!r} value to aim for")
    return float(value)


def check_args(params, every, seed, metric_closure, prompt, max_update_ratio, min_improvement=0.0, guard=True,
               keep_if_met=True) -> None:
    if isinstance(params, torch.Tensor):
        raise ConfigError(
            "params must be an iterable of tensors or parameter-group dicts, got a single tensor; "
            "pass model.parameters() or [tensor]"
        )
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"Invalid every: {every!r} (use None for no periodic updates, or an int >= 1)")
    if every is not None and metric_closure is None:
        raise ConfigError(
            f"every={every} needs metric_closure=<callable returning the generator's metric>, so that periodic "
            f"updates know the current metric; or use every=None and call generate() yourself"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"Invalid seed: {seed!r} (must be an int from 0 to 2**63 - 1)")
    if metric_closure is not None and not callable(metric_closure):
        raise ConfigError("metric_closure must be a callable that returns the generator's metric")
    if prompt is not None:
        check_prompt(prompt, "prompt", ConfigError)
    # cast: any Real orders against numbers; typeshed's numbers.Real declares only __lt__ and __le__
    if not (isinstance(max_update_ratio, Real) and cast(float, max_update_ratio) > 0):
        raise ConfigError(f"Invalid max_update_ratio: {max_update_ratio!r} (must be > 0; math.inf disables the bound)")
    check_min_improvement(min_improvement)
    for name, flag in (("guard", guard), ("keep_if_met", keep_if_met)):
        if not isinstance(flag, bool):  # guard="no" would turn it on
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    if min_improvement and not guard:
        raise ConfigError(f"min_improvement={min_improvement!r} is the guard's margin, and guard=False measures nothing "
                          f"to apply it to: turn the guard on, or leave min_improvement at 0")


def check_min_improvement(value, option: str = "min_improvement") -> None:
    """:class:`ConfigError`, naming ``option``, unless ``value`` is a number in [0, 1)."""
    # cast: any Real orders against numbers; typeshed's numbers.Real declares only __lt__ and __le__
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= cast(float, value) < 1:
        raise ConfigError(f"Invalid {option}: {value!r} (a share in [0, 1) of the current metric by which the guard "
                          f"asks an update to improve it; 0 accepts any update that is not worse)")


def check_base_kwargs(base, base_kwargs: dict, own: list[str]) -> None:
    """:class:`ConfigError` for a keyword that neither GptOptimizer (``own``) nor ``base`` takes,
    naming the closest option of either (before the generator loads, and not blamed on the base)."""
    try:
        accepted = inspect.signature(base).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: let the base decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    for key in base_kwargs:
        if key not in accepted:
            name = getattr(base, "__name__", type(base).__name__)
            close = difflib.get_close_matches(key, [*own, *(k for k in accepted if k != "params")], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown option {key!r}: neither GptOptimizer nor its base {name} takes it{hint}")


def check_updatable(tensors: list[torch.Tensor], names: list[str] | None) -> None:
    """:class:`ConfigError` for a parameter an update cannot write: not real floating point (a
    complex one would lose its imaginary part, an integer one cannot move), not a leaf, or a
    broadcast view whose elements share memory (``expand``: stride 0)."""
    for i, t in enumerate(tensors):
        name = names[i] if names else f"parameter {i}"
        if not t.is_floating_point():
            raise ConfigError(f"GptOptimizer updates real floating-point parameters; {name} is {t.dtype} "
                              f"(shape {list(t.shape)}): leave it out of the parameters given")
        if not t.is_leaf:
            raise ConfigError(f"{name} (shape {list(t.shape)}) is computed from other tensors, not a leaf that an "
                              f"optimizer can update: pass the model's parameters (model.parameters())")
        if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
            raise ConfigError(f"{name} (shape {list(t.shape)}) is a broadcast view whose elements share "
                              f"memory, so no update can write them apart: make it a parameter of its own, "
                              f"e.g. nn.Parameter(t.clone())")


def materialize(params) -> list:
    """A list of tensors, ``(name, tensor)`` pairs or group dicts; refuses duplicates, empties and
    unordered collections (the generator reads parameters in order)."""
    params = list(params) if not isinstance(params, (set, frozenset)) else None  # an iterator: read it once
    if params is None or any(isinstance(g, dict) and isinstance(g.get("params"), (set, frozenset)) for g in params):
        raise ConfigError("params: a set has no order, and a generator reads parameters in order; "
                          "pass model.parameters() or a list")
    if any(isinstance(g, dict) and "params" not in g for g in params):
        raise ConfigError("a param group dict has no 'params' entry; give each group its tensors, e.g. "
                          "{'params': model.layer.parameters(), 'lr': 1e-3}")
    params = [
        dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]))
        if isinstance(g, dict) else g
        for g in params
    ]
    if not params:
        raise ConfigError("GptOptimizer got an empty parameter list; pass model.parameters()")
    seen: set[int] = set()
    for t in flat_params(params)[0]:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"params must hold tensors, got {type(t).__name__}")
        if id(t) in seen:
            raise ConfigError(f"a parameter of shape {list(t.shape)} is listed twice; list each parameter once")
        seen.add(id(t))
    return params


def flat_params(params: list) -> tuple[list[torch.Tensor], list[str] | None]:
    """All tensors in order, and their names when every one is named (else None)."""
    tensors: list[torch.Tensor] = []
    names: list[str | None] = []

    def add(items) -> None:
        if isinstance(items, torch.Tensor):
            items = [items]
        for item in items:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                names.append(item[0])
                tensors.append(item[1])
            else:
                names.append(None)
                tensors.append(item)

    for item in params:
        if isinstance(item, dict):
            add(item["params"])
        else:
            add([item])
    return tensors, (None if any(n is None for n in names) else names)  # type: ignore[return-value]


def check_architecture(gen: LoadedGenerator, tensors: list[torch.Tensor], names: list[str] | None) -> None:
    """:class:`ArchitectureMismatchError` unless the parameters have the generator's shapes, in order.

    Names are labels only (``nn.Sequential`` calls its first layer ``1.weight``, an MLP class
    ``fc1.weight``): shapes in order are what a generator samples. The message names the user's
    parameters by their own names (by position when given ``model.parameters()``) and says how to
    make a generator for their model.
    """
    expected = gen.layout.signature
    given = [_strip_prefix(n) for n in names] if names is not None else [f"parameter #{i}" for i in range(len(tensors))]
    shapes = [tuple(t.shape) for t in tensors]
    diffs = shape_differences(expected, given, shapes)
    if not diffs:
        return
    raise ArchitectureMismatchError(
        f"the parameters given to GptOptimizer do not fit generator {gen.name!r} (made for task {gen.task!r}, "
        f"{gen.layout.num_params:,} parameters; yours: {sum(math.prod(s) for s in shapes):,}):{listed(diffs)}\n"
        + _mismatch_advice(Counter(tuple(shape) for _, shape in expected), Counter(shapes))
    )


def _mismatch_advice(expected: Counter, given: Counter) -> str:
    """What to do about a mismatch: the model's parameters in order, all of them, or a generator of one's own."""
    in_order = ("GptOptimizer(model.parameters(), ...), or parameter groups that together list every parameter "
                "in named_parameters() order")
    if given == expected:
        return f"These are the generator's shapes in another order: pass them in the model's order, {in_order}."
    if not given - expected:
        return f"Each of these shapes is the generator's, but some of its parameters are missing: pass all of them, {in_order}."
    return ("A generator serves one architecture. To make one for yours, describe it as a task in a file "
            "(docs/your-own-model.md), then:\n"
            "  learned-opt corpus --task my_task.py:MyTask --runs 1000 --out corpus/ --data-root DATA\n"
            "  learned-opt train --store corpus/ --out gen/\n"
            "and pass generator='gen/<task name>.json'.")


def _strip_prefix(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name

