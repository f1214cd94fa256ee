"""``LearnedOptimizer``: the per-parameter learned update rule as a ``torch.optim.Optimizer``.

Usage contract (as any optimizer)::

    opt = LearnedOptimizer(model.parameters())        # the shipped meta-trained weights
    opt = LearnedOptimizer(model.parameters(), weights="runs/lopt/lopt.json", lr=1.0)
    loss.backward(); opt.step(); opt.zero_grad()

``lr`` multiplies every step (1.0 is the step size the rule was meta-trained with, roughly
Adam(1e-3)'s), so LR schedulers work as with any optimizer. The step counter lives in each param
group (``group["step"]``) and the momenta in ``state``, so ``state_dict()`` needs no extra code and
loads through ``torch.load(weights_only=True)``. ``step`` draws no random numbers.

Behaviour at the edges, like Adam's: a parameter whose ``grad`` is None is not touched and its
state is not advanced; a zero gradient still moves a parameter (the momenta and the rule's own
reading of the parameter act). A sparse gradient is refused.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ..errors import ConfigError, OptimizerStateError
from .model import BETAS, init_state, update
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
        _check_lr(lr)
        self.rule: LoadedRule = load_rule(weights)
        self._theta_cache: dict = {}
        super().__init__(params, dict(lr=lr, step=0))

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        # (name, tensor) pairs, as model.named_parameters() gives, are torch's named parameters
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p for p in params]
        if any(not isinstance(p, torch.Tensor) for p in tensors):
            raise ConfigError("LearnedOptimizer optimizes tensors only (or (name, tensor) pairs, as "
                              "named_parameters() gives); a param group holds something else")
        ids = [id(p) for p in tensors]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ConfigError("a parameter is listed twice (in one param group or in two); list each once")
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        if "step" in param_group and (not isinstance(param_group["step"], int) or param_group["step"] < 0):
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
        """One learned step of every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            if any(p.grad.is_sparse for p in with_grad):
                raise ConfigError("LearnedOptimizer does not support sparse gradients")
            for p in with_grad:
                if not self.state[p]:  # lazy initialisation
                    fresh = init_state([p])
                    self.state[p].update(zip(MOMENTA, fresh["m"][0].unbind(0)), v=fresh["v"][0])
            # one vectorised pass per device: the rule's MLP runs once over all tensors' elements
            for device in dict.fromkeys(p.device for p in with_grad):
                ps = [p for p in with_grad if p.device == device]
                state = {"m": [torch.stack([self.state[p][k] for k in MOMENTA]) for p in ps],
                         "v": [self.state[p]["v"] for p in ps]}
                new_p, new_state = update(self._theta(device), ps, [p.grad for p in ps], state, group["step"],
                                          lr=group["lr"], num_tensors=len(group["params"]))
                torch._foreach_copy_(ps, list(new_p))
                for p, m, v in zip(ps, new_state["m"], new_state["v"]):
                    self.state[p].update(zip(MOMENTA, m.unbind(0)), v=v)
            group["step"] += 1
        return loss

    # ---------------------------------------------------------------- state, copies, repr

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["rule_sha256"] = self.rule.sha256
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by a LearnedOptimizer with the same weights; everything is checked
        before anything changes."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise OptimizerStateError("not an optimizer state_dict (it needs 'state' and 'param_groups')")
        sha = state_dict.get("rule_sha256")
        if sha is not None and sha != self.rule.sha256:
            raise OptimizerStateError(f"this state was saved with learned-optimizer weights {str(sha)[:12]}, this "
                                      f"optimizer has {self.rule.sha256[:12]}; load the same weights first")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise OptimizerStateError("the state_dict's param groups do not match this optimizer's (their number "
                                      "or sizes differ)")
        shapes = {i: p.shape for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        flat_ids = [pid for g in groups for pid in g["params"]]
        for pid, s in state_dict["state"].items():
            if pid not in flat_ids:
                raise OptimizerStateError(f"state for parameter id {pid} that no param group lists")
            shape = shapes[flat_ids.index(pid)]
            if not all(isinstance(s.get(k), torch.Tensor) and tuple(s[k].shape) == tuple(shape) for k in (*MOMENTA, "v")):
                raise OptimizerStateError(f"state of parameter {pid} does not fit a parameter of shape {list(shape)} "
                                          f"(it needs {', '.join(MOMENTA)} and v of that shape)")
        for g in groups:
            if not isinstance(g.get("step"), int) or g["step"] < 0:
                raise OptimizerStateError(f"a param group's step is {g.get('step')!r}, not an integer >= 0")
            _check_lr(g.get("lr"), OptimizerStateError)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "rule_sha256"})
        for s in self.state.values():  # keep the rule's fp32 state whatever the parameter's dtype
            s.update({k: s[k].float() for k in (*MOMENTA, "v")})

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "rule": self.rule, "_theta_cache": {}}

    def __repr__(self) -> str:
        groups = ", ".join(f"(lr={g['lr']}, step={g['step']}, {len(g['params'])} tensors)" for g in self.param_groups)
        return f"LearnedOptimizer(weights={self.rule.name!r}, sha256={self.rule.sha256[:12]}, groups=[{groups}])"


def _check_lr(lr, error=ConfigError) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise error(f"Invalid learning rate: {lr!r}; lr multiplies the learned step and must be a finite number >= 0")
