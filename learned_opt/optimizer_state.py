"""Loading a :class:`~learned_opt.optimizer.GptOptimizer` ``state_dict``, checked before anything is loaded.

``load_state_dict`` must be all or nothing: every part of the state (the ``"gpt"`` entry and the
base optimizer's groups and per-parameter tensors) is checked here first, so a bad state raises
:class:`OptimizerStateError` and leaves the optimizer exactly as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import OptimizerStateError
from .jsoncheck import is_number

# torch.optim.Adafactor's row and column statistics of a matrix: they broadcast to its shape
FACTORED_STATE = ("row_var", "col_var")
COUNTERS = ("steps", "attempted", "accepted", "rejected", "failed", "kept")
OUTCOMES = ("accepted", "rejected", "failed", "kept")  # each attempted update counts exactly one
# Attributes that optimizers pickled by older releases lack, and the behaviour they had then:
# no keep_if_met (θ was never kept), no sampling temperature (the plain sampler), no step size (θ′
# itself), no guard margin (any update not worse was accepted), no guidance taper (constant guidance).
PICKLED_BEFORE = {"keep_if_met": False, "sampling_temperature": 1.0, "step_sizes": (1.0,), "min_improvement": 0.0,
                  "guidance_taper": False}


def gpt_entry(opt) -> dict:
    """The ``"gpt"`` entry of :meth:`GptOptimizer.state_dict <learned_opt.optimizer.GptOptimizer.state_dict>`:
    counters, generator name + sha256, the private RNG's state (a fresh uint8 tensor) and the seed."""
    return {
        "counters": dict(opt.counters),
        "generator_name": opt.generator.name,
        "generator_sha256": opt.generator.sha256,
        "rng_state": opt._rng.get_state(),
        "seed": opt.seed,
    }


def load_state(opt, state_dict: Mapping) -> None:
    """:meth:`GptOptimizer.load_state_dict <learned_opt.optimizer.GptOptimizer.load_state_dict>`:
    the pre-hooks on a copy, every check, then the base's state, the counters, the RNG and the post-hooks."""
    if not isinstance(state_dict, Mapping):
        raise _refuse(f"it is a {type(state_dict).__name__}, not the mapping state_dict() returns")
    loaded = copy.deepcopy(dict(state_dict))
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, loaded)
        if result is not None:
            loaded = dict(result)
    gpt = loaded.pop("gpt", None)
    counters, rng_state = check_state(opt, loaded, gpt)  # OptimizerStateError; nothing changed yet
    # torch's load builds new groups and state and swaps them in, then runs the base class's
    # __setstate__ (Adam's reads every "step"): a failure there would leave them half loaded
    before = {"state": opt.base.state, "param_groups": opt.base.param_groups}
    try:
        opt.base.load_state_dict(loaded)
    except BaseException as exc:
        opt.base.__dict__.update(before)
        if not isinstance(exc, Exception) or isinstance(exc, OptimizerStateError):  # the base's own refusal,
            raise  # KeyboardInterrupt, SystemExit: restored, re-raised as they are
        raise _refuse(f"{type(opt.base).__name__} could not load it ({type(exc).__name__}: {exc})") from exc
    finally:
        opt.param_groups = opt.base.param_groups  # the base's groups and state, shared again
        opt.state = opt.base.state
    opt.counters = counters
    if rng_state is None:
        opt._rng.manual_seed(opt.seed)
    else:
        opt._rng.set_state(rng_state)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def check_state(opt, state_dict: dict, gpt: Any) -> tuple[dict[str, int], torch.Tensor | None]:
    """``(counters, rng_state)`` to load into ``opt`` (rng_state None: reseed); raises
    :class:`OptimizerStateError` on anything that would fail or corrupt the optimizer."""
    _check_base(opt, state_dict)
    _check_by_a_step(opt.base, state_dict)
    if gpt is None:  # a plain base-optimizer state
        return {k: 0 for k in COUNTERS}, None
    if not isinstance(gpt, Mapping):
        raise _refuse(f"its 'gpt' entry is a {type(gpt).__name__}, not a mapping")
    if gpt.get("generator_sha256") != opt.generator.sha256:
        raise OptimizerStateError(
            f"this state was saved with generator {gpt.get('generator_name')!r} (sha256 "
            f"{str(gpt.get('generator_sha256'))[:12]}...), but the optimizer uses {opt.generator.name!r} "
            f"(sha256 {opt.generator.sha256[:12]}...); load it with the same generator"
        )
    return _counters(gpt.get("counters", {})), _rng_state(gpt.get("rng_state"), opt._rng)


def _refuse(why: str) -> OptimizerStateError:
    return OptimizerStateError(
        f"cannot load this optimizer state: {why}; nothing was changed. Load a state saved by "
        "GptOptimizer.state_dict() for this model"
    )


def _counters(given: Any) -> dict[str, int]:
    if not isinstance(given, Mapping):
        raise _refuse(f"its counters are a {type(given).__name__}, not a mapping")
    unknown = set(given) - set(COUNTERS)
    if unknown:
        raise OptimizerStateError(f"unknown counters {sorted(map(str, unknown))} in the state; it is not a GptOptimizer state")
    out = {}
    for k in COUNTERS:
        v = given.get(k, 0)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _refuse(f"counter {k!r} is {v!r}, not an integer >= 0")
        out[k] = int(v)
    return out


def _rng_state(given: Any, rng: torch.Generator) -> torch.Tensor:
    if not isinstance(given, torch.Tensor):
        raise _refuse(f"its rng_state is {type(given).__name__}, not the uint8 tensor state_dict() saves")
    if given.dtype != torch.uint8 or given.dim() != 1:
        raise _refuse(f"its rng_state is a {given.dtype} tensor of shape {list(given.shape)}, not a uint8 vector")
    state = given.to("cpu")
    probe = torch.Generator(device=rng.device)  # try it on a scratch generator, never on the real one
    try:
        probe.set_state(state)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise OptimizerStateError(
            f"cannot load this optimizer state: its rng_state ({state.numel()} bytes) does not fit a "
            f"{rng.device.type} generator ({exc}); nothing was changed. A state saved on another kind of device "
            f"resumes on that kind; or delete state_dict['gpt'] to load only the base optimizer's state "
            f"(the counters restart and the sampler is reseeded)"
        ) from None
    return state


def _check_base(opt, state_dict: dict) -> None:
    """The groups and per-parameter state, as ``torch.optim.Optimizer.load_state_dict`` reads them."""
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, Sequence) or not isinstance(state, Mapping):
        raise _refuse("it has no 'param_groups' list and 'state' mapping")
    mine = opt.param_groups
    if len(groups) != len(mine):
        raise _refuse(f"it has {len(groups)} parameter groups, the optimizer {len(mine)}")
    params: dict[Any, torch.Tensor] = {}
    for i, (saved, group) in enumerate(zip(groups, mine)):
        ids = saved.get("params") if isinstance(saved, Mapping) else None
        if not isinstance(ids, Sequence) or len(ids) != len(group["params"]):
            n = len(ids) if isinstance(ids, Sequence) else "no"
            raise _refuse(f"group {i} has {n} parameters, the optimizer's has {len(group['params'])}")
        _check_settings(i, saved, group, opt.base)
        params.update(zip(ids, group["params"]))
    numel = sum(p.numel() for p in params.values())
    unknown = [key for key in state if key not in params]
    if unknown:  # torch would drop their state without a word
        raise _refuse(f"it holds state for parameters {unknown[:4]!r} that no group lists")
    for key, entry in state.items():
        p = params[key]
        if not isinstance(entry, Mapping):
            raise _refuse(f"the state of parameter {key!r} is a {type(entry).__name__}, not a mapping")
        live = opt.base.state.get(p, {})
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and not _fits(name, value, p, live.get(name), numel):
                raise _refuse(
                    f"state {name!r} of a parameter of shape {list(p.shape)} has shape {list(value.shape)}"
                )


def _check_by_a_step(base: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load the state into a copy of ``base`` (over copies of its parameters) and take one step
    there with zero gradients. What fails there (an entry missing or of the wrong type, a negative
    step count, a setting this device cannot run) or makes a parameter non-finite (NaN moments, a
    negative second moment) would do the same at the real optimizer's next step. Nothing of
    ``base`` is touched: its class's step runs on the copy, past any hook or patched ``step``."""
    try:  # every attribute (Optimizer.__getstate__ keeps only three, and LBFGS needs its _params)
        scratch = object.__new__(type(base))
        scratch.__dict__.update(copy.deepcopy(base.__dict__))
    except Exception:  # a base that cannot be copied: the other checks are all there is
        return
    params = [p for g in scratch.param_groups for p in g["params"]]
    finite = [bool(torch.isfinite(p).all()) if p.is_floating_point() else False for p in params]
    step = type(scratch).step
    step = getattr(step, "__wrapped__", step) if getattr(step, "hooked", False) else step
    try:
        scratch.load_state_dict(copy.deepcopy(state_dict))
        with torch.no_grad():
            for p in params:
                p.grad = torch.zeros_like(p)
        step(scratch, lambda: torch.zeros(()))  # type: ignore[arg-type, return-value]  # torch: loss as float
    except Exception as exc:
        raise _refuse(f"{type(base).__name__} could not take a step with it ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if any(was and not bool(torch.isfinite(p).all()) for p, was in zip(params, finite)):
        raise _refuse(f"a step of {type(base).__name__} with it makes parameters non-finite (NaN or infinite "
                      f"moments, or a negative second moment)")


def _fits(name: str, value: torch.Tensor, p: torch.Tensor, live: Any, numel: int) -> bool:
    """Whether per-parameter state ``name`` may have ``value``'s shape: the parameter's (Adam's
    moments), a scalar (a step count), the shape the live optimizer keeps it in, a vector over all
    ``numel`` parameters (LBFGS keeps its directions under the first), or factored statistics that
    broadcast to the parameter (:data:`FACTORED_STATE`). Anything else would fail or corrupt the step."""
    if value.dim() == 0 or value.shape == p.shape:
        return True
    if isinstance(live, torch.Tensor) and live.shape == value.shape:
        return True
    if value.dim() == 1 and value.numel() == numel:
        return True
    return name in FACTORED_STATE and _broadcasts(value.shape, p.shape)


def _check_settings(i: int, saved: Mapping, group: Mapping, base: torch.optim.Optimizer) -> None:
    """Each setting of the live group in saved group ``i``, of the live value's kind (see
    :func:`_same_kind`; ``None`` is accepted for a flag or a string, as torch's ``foreach``,
    ``fused`` and ``line_search_fn`` take). torch loads the saved group in place of the live one and
    would fail, or corrupt the state, at the next step; a setting that the base's ``__setstate__``
    fills in (one that older releases of it did not save) may be missing."""
    loaded = _as_loaded(base, saved)
    for key, live in group.items():
        if key in ("params", "param_names"):
            continue
        if loaded is not None and key not in loaded:
            raise _refuse(f"group {i} has no {key!r}, which {type(base).__name__} needs (a state saved by another "
                          f"kind of optimizer?)")
        if key in saved and live is not None and not _same_kind(saved[key], live):
            raise _refuse(f"group {i}'s {key!r} is {saved[key]!r}, where the optimizer has {live!r}")


def _as_loaded(base: torch.optim.Optimizer, saved: Mapping) -> dict | None:
    """The saved group's settings as ``base`` holds them once loaded: its class's ``__setstate__``
    run on a scratch instance fills in defaults. None when that cannot be run (nothing to compare)."""
    probe = object.__new__(type(base))
    group = {k: v for k, v in saved.items() if k != "params"} | {"params": []}
    try:
        probe.__setstate__({"defaults": dict(base.defaults), "state": {}, "param_groups": [group]})
        return dict(probe.param_groups[0])
    except Exception:
        return None


def _same_kind(value: Any, live: Any) -> bool:
    """A finite number (or one-element tensor) for a number or tensor, a flag for a flag, a string
    for a string, a sequence as long whose items are each of their live item's kind (Adam's betas,
    Adafactor's ``(None, 1e-3)``); anything for other live values."""
    if live is None:
        return True
    if isinstance(live, bool):
        return value is None or isinstance(value, bool)
    if is_number(live) or isinstance(live, torch.Tensor):
        return is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                     and bool(torch.isfinite(value).all()))
    if isinstance(live, str):
        return value is None or isinstance(value, str)
    if isinstance(live, (tuple, list)):
        return (isinstance(value, (tuple, list)) and len(value) == len(live)
                and all(_same_kind(v, w) for v, w in zip(value, live)))
    return True


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False
