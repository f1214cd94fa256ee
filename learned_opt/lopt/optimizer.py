"""``LearnedOptimizer``: the per-parameter learned update rule as a ``torch.optim.Optimizer``.

Usage contract (as any optimizer)::

    opt = LearnedOptimizer(model.parameters())        # the shipped meta-trained weights
    opt = LearnedOptimizer(model.parameters(), weights="runs/lopt/lopt.json", lr=1.0)
    loss.backward(); opt.step(); opt.zero_grad()

``lr`` multiplies every step (1.0 is the step size the rule was meta-trained with, roughly
Adam(1e-3)'s), so LR schedulers work as with any optimizer (one that also cycles momentum, as
``OneCycleLR`` does by default, needs ``cycle_momentum=False``: the rule has no momentum setting).
The step counter lives in each param group (``group["step"]``, the steps the group has taken) and
the momenta and each parameter's own step count in ``state``, so ``state_dict()`` needs no extra
code and loads through ``torch.load(weights_only=True)``. ``step`` draws no random numbers.

Behaviour at the edges, like Adam's: a parameter whose ``grad`` is None is not touched and its
state, step count included, is not advanced; a zero gradient still moves a parameter (the momenta
and the rule's own reading of the parameter act). The rule is told the model's tensor count over
all groups, so splitting parameters into groups changes nothing but what the groups set. Float64
parameters are updated in float64. Sparse gradients and complex parameters are refused, and a
step that would write NaN or Inf (a non-finite gradient, an ``lr`` too large for the parameter's
dtype) raises :class:`~learned_opt.errors.NonFiniteStepError` and changes nothing.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.optim import Optimizer

from ..errors import ConfigError, NonFiniteStepError, OptimizerStateError
from .model import BETAS, MAX_ROWS, moments, step_deltas, stepped
from .weights import LoadedRule, load_rule

# per-parameter state: one momentum per decay rate (shaped like the parameter, as Adam's
# exp_avg, so wrappers that check state shapes, such as GptOptimizer, accept it) and "v"
MOMENTA = tuple(f"m{i}" for i in range(len(BETAS)))


class LearnedOptimizer(Optimizer):
    """A learned update rule (Metz et al. 2020 style) applied to every parameter at every step.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs (``model.named_parameters()``) or
            of param-group dicts (each may set its own ``lr``).
        weights: ``None`` for the shipped weights, a registry name, a path to a learned optimizer's
            ``.json`` manifest, a :class:`~learned_opt.lopt.weights.LoadedRule`, or a dict of the
            MLP's tensors (e.g. :func:`~learned_opt.lopt.model.hand_set_theta`).
        lr: a multiplier of every step, >= 0.
    """

    def __init__(self, params, weights=None, lr: float = 1.0):
        if isinstance(params, torch.Tensor):
            raise ConfigError("params must be an iterable of tensors or of param-group dicts, not a single tensor: "
                              "pass [tensor] or model.parameters()")
        if isinstance(params, (set, frozenset)):
            raise ConfigError(UNORDERED)
        _check_lr(lr)
        lr = lr if isinstance(lr, torch.Tensor) else float(lr)  # a NumPy number would not load with weights_only
        self.rule: LoadedRule = load_rule(weights)
        self._theta_cache: dict = {}
        try:
            super().__init__(params, dict(lr=lr, step=0))
        except ConfigError:
            raise
        except ValueError as exc:  # torch's "optimizer got an empty parameter list"
            raise ConfigError(f"{exc}: give LearnedOptimizer the model's parameters, e.g. model.parameters()") from None

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ConfigError("a param group is a dict with a 'params' entry, e.g. {'params': model.layer.parameters(), "
                              "'lr': 0.5}")
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise ConfigError(UNORDERED)
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        # (name, tensor) pairs, as model.named_parameters() gives, are torch's named parameters
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p for p in params]
        if any(not isinstance(p, torch.Tensor) for p in tensors):
            raise ConfigError("LearnedOptimizer optimizes tensors only (or (name, tensor) pairs, as "
                              "named_parameters() gives); a param group holds something else")
        odd = [p for p in tensors if not (p.is_floating_point() or p.is_complex()) or p.device.type == "meta"]
        if odd:  # an integer tensor cannot move; a meta one holds no values (complex ones: refused at the step)
            raise ConfigError(f"LearnedOptimizer updates real floating-point tensors with values; a param group holds "
                              f"a {odd[0].dtype} tensor on {odd[0].device}: leave it out, or materialise the model first")
        ids = [id(p) for p in tensors]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ConfigError("a parameter is listed twice (in one param group or in two); list each once")
        if "lr" in param_group:
            _check_lr(param_group["lr"])
            if not isinstance(param_group["lr"], torch.Tensor):
                param_group = {**param_group, "lr": float(param_group["lr"])}
        step = param_group.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"a param group's step must be an integer >= 0, got {param_group['step']!r}")
        try:
            super().add_param_group({**param_group, "params": params})
        except TypeError:  # a torch whose optimizers take no (name, tensor) pairs: the tensors alone
            super().add_param_group({**param_group, "params": tensors})

    def _theta(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._theta_cache:
            self._theta_cache[device] = {k: v.to(device) for k, v in self.rule.theta.items()}
        return self._theta_cache[device]

    @torch.no_grad()
    def step(self, closure=None):
        """One learned step of every parameter with a gradient; returns ``closure()``'s loss if given.

        All or nothing: every group is checked, then every new parameter and momentum computed,
        and only then is anything written (a refused step leaves parameters and state as they were)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        if any(p.grad.is_sparse for _, ps in work for p in ps):
            raise ConfigError("LearnedOptimizer does not support sparse gradients")
        if any(p.is_complex() for _, ps in work for p in ps):
            raise ConfigError("LearnedOptimizer does not support complex parameters: optimize "
                              "torch.view_as_real(p) as a real parameter instead")
        # the rule is told the whole model's tensor count, as in meta-training, however it is grouped
        num_tensors = sum(len(group["params"]) for group in self.param_groups)
        steps = []  # (parameter, its state before, its step index, its new value, new state finite), per parameter
        for group, _ in work:  # a group's lr may have been set after it was added
            _check_lr(group["lr"])
        for group, with_grad in work:
            # each parameter counts its own steps (Adam's "step"), so one that had no gradient for a
            # while starts its bias corrections afresh; the group's counter is for states saved before
            known = {p: self.state.get(p) for p in with_grad}  # .get: no empty entry for a step that is refused
            own = {p: (st.get("step", group["step"]) if st else 0) for p, st in known.items()}
            # one vectorised pass per device and step: the rule's MLP runs once over all tensors' elements
            for device, step in dict.fromkeys((p.device, own[p]) for p in with_grad):
                ps = [p for p in with_grad if p.device == device and own[p] == step]
                states = [known[p] or _fresh(p) for p in ps]
                finite: list[torch.Tensor] = []  # per parameter: its new momenta and v are finite
                deltas = step_deltas(self._theta(device), ps, [p.grad for p in ps],
                                     {"m": [[s[k] for k in MOMENTA] for s in states], "v": [s["v"] for s in states]},
                                     step, lr=float(group["lr"]), num_tensors=num_tensors, finite=finite)
                # each new value takes its delta's place (a float32 parameter's, its very memory)
                steps.extend(zip(ps, states, [step] * len(ps), map(_new_value, ps, deltas), finite))
                del deltas
        _refuse_nonfinite(steps)
        # commit: every parameter first (its new value was worked out from the values before the
        # step, as for parameters that share storage it must be), then the momenta, in place, a
        # slice at a time: the new momenta are never held whole
        for p, _, _, new, _ in steps:
            p.copy_(new)
        for p, state, step, _, _ in steps:
            for k in (*MOMENTA, "v"):
                if not state[k].is_contiguous():  # a state set from outside: written in place below
                    state[k] = state[k].contiguous()
            for s, m, v in _new_moments(p, state):
                for k, row in zip(MOMENTA, m):
                    state[k].view(-1)[s] = row  # [elements]
                state["v"].view(-1)[s] = v[0]
            self.state[p].update(state, step=step + 1)
        for group, with_grad in work:
            if with_grad:
                group["step"] += 1
        return loss

    # ---------------------------------------------------------------- state, copies, repr

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rule_sha256"] = self.rule.content_sha256
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by a LearnedOptimizer with the same weights; everything is checked
        before anything changes. The momenta stay float32 whatever the parameters' dtype."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), (list, tuple)):
            raise OptimizerStateError("not an optimizer state_dict (it needs a 'state' mapping and a 'param_groups' "
                                      "list); load one saved by LearnedOptimizer.state_dict()")
        sha = state_dict.get("rule_sha256")  # the weights' content; states saved before: their file's sha256
        if sha is not None and sha not in (self.rule.content_sha256, self.rule.sha256):
            raise OptimizerStateError(f"this state was saved with other learned-optimizer weights than this "
                                      f"optimizer's ({self.rule.name}): their sha256 is {str(sha)[:12]}, not "
                                      f"{self.rule.content_sha256[:12]}; load the same weights first")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                not isinstance(a, dict) or not isinstance(a.get("params"), (list, tuple))
                or len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise OptimizerStateError("the state_dict's param groups do not match this optimizer's (their number "
                                      "or sizes differ)")
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip((pid for g in groups for pid in g["params"]), params))  # torch's own matching
        for pid, s in state_dict["state"].items():
            if pid not in by_id:
                raise OptimizerStateError(f"state for parameter id {pid} that no param group lists")
            shape = by_id[pid].shape
            if not isinstance(s, dict) or not all(
                    isinstance(s.get(k), torch.Tensor) and tuple(s[k].shape) == tuple(shape) for k in (*MOMENTA, "v")):
                raise OptimizerStateError(f"state of parameter {pid} does not fit a parameter of shape {list(shape)} "
                                          f"(it needs {', '.join(MOMENTA)} and v of that shape)")
            if not all(_usable(s[k], k) for k in (*MOMENTA, "v")):
                raise OptimizerStateError(f"state of parameter {pid} is not dense, real and finite (with v >= 0); the "
                                          f"next step would fail or write NaN: load a state saved by "
                                          f"LearnedOptimizer.state_dict()")
            if "step" in s and (isinstance(s["step"], bool) or not isinstance(s["step"], int) or s["step"] < 0):
                raise OptimizerStateError(f"state of parameter {pid} has step {s['step']!r}, not an integer >= 0")
        for g in groups:
            if isinstance(g.get("step"), bool) or not isinstance(g.get("step"), int) or g["step"] < 0:
                raise OptimizerStateError(f"a param group's step is {g.get('step')!r}, not an integer >= 0")
            _check_lr(g.get("lr"), OptimizerStateError)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "rule_sha256"})
        # torch casts state to each parameter's dtype (bf16 momenta would lose precision): take the
        # saved float32 values again
        for pid, s in state_dict["state"].items():
            p = by_id[pid]
            self.state[p].update({k: s[k].to(p.device, torch.float32, copy=True) for k in (*MOMENTA, "v")})

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "rule": self.rule, "_theta_cache": {}}

    def __repr__(self) -> str:
        groups = ", ".join(f"(lr={g['lr']}, step={g['step']}, {len(g['params'])} tensors)" for g in self.param_groups)
        return f"LearnedOptimizer(weights={self.rule.name!r}, sha256={self.rule.sha256[:12]}, groups=[{groups}])"


UNORDERED = ("a set of parameters has no order, and the state of one would load into another on resume: "
             "pass model.parameters() or a list")


def _fresh(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state of a parameter before its first step: zero momenta and ``v``, float32, each of its shape."""
    return {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k in (*MOMENTA, "v")}


def _new_moments(p: torch.Tensor, state: dict[str, torch.Tensor]):
    """``(elements, new momenta [K, n], new v [1, n])`` of a parameter after its step, flattened,
    :data:`~learned_opt.lopt.model.MAX_ROWS` elements at a time."""
    n = p.numel()
    g = p.grad.float().reshape(1, n)  # type: ignore[union-attr]  # only parameters with a gradient are stepped
    m, v = [state[k].reshape(1, n) for k in MOMENTA], state["v"].reshape(1, n)
    for lo in range(0, n, MAX_ROWS):
        s = slice(lo, min(lo + MAX_ROWS, n))
        yield (s, *moments(g[:, s], [r[:, s] for r in m], v[:, s]))


def _new_value(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``p``'s value after the step, :func:`~learned_opt.lopt.model.stepped`: written into
    ``delta``'s memory where ``p`` is float32 (the same numbers, one tensor fewer)."""
    if p.dtype != torch.float32:
        return stepped(p, delta)
    new = delta.view(p.shape)
    return torch.sub(p, new, out=new)


def _refuse_nonfinite(steps: list) -> None:
    """:class:`NonFiniteStepError` naming the first parameter whose new value or state is not finite
    (the state's finiteness as :func:`~learned_opt.lopt.model.step_deltas` found it: nothing is
    written before every one is known to be finite). One synchronisation per device."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for p, _, _, new, state_finite in steps:
        flags.setdefault(p.device, []).append(torch.isfinite(new).all() & state_finite)
    finite = {device: iter(torch.stack(f).tolist()) for device, f in flags.items()}
    for p, *_ in steps:
        if not next(finite[p.device]):
            raise NonFiniteStepError(
                f"the learned step of a parameter of shape {list(p.shape)} ({p.dtype}) is not finite: "
                f"{_cause(p)}; nothing was changed. Skip the batch, lower lr, or clip or scale the "
                f"gradients (GradScaler skips such steps)")


def _cause(p: torch.Tensor) -> str:
    """Why a parameter's step is not finite, as far as the parameter and its gradient tell."""
    grad = p.grad
    assert grad is not None  # only parameters with a gradient are stepped
    if not bool(torch.isfinite(p).all()):
        return "the parameter itself holds NaN or Inf"
    if not bool(torch.isfinite(grad).all()):
        return "its gradient holds NaN or Inf"
    largest = grad.detach().abs().max().item()  # in the gradient's own precision
    if largest > math.sqrt(torch.finfo(torch.float32).max):  # the rule's second moment is float32
        return f"its gradient is finite, but its largest element ({largest:.3g}) squared exceeds float32's range"
    return "lr is too large for its dtype"


def _usable(t: torch.Tensor, key: str) -> bool:
    """Whether a saved momentum (or ``v``, a mean square) can be stepped from."""
    if t.layout != torch.strided or not t.is_floating_point() or t.device.type == "meta":
        return False
    return bool(torch.isfinite(t).all()) and (key != "v" or bool((t >= 0).all()))


def _check_lr(lr, error=ConfigError) -> None:
    """``error`` unless ``lr`` is a finite real number >= 0: a Python or NumPy number, or a one-element
    real tensor (floating-point or integer), as torch's optimizers take."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.is_complex() and lr.dtype != torch.bool:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr < 0:
        raise error(f"Invalid learning rate: {lr!r}; lr multiplies the learned step and must be a finite number >= 0")
