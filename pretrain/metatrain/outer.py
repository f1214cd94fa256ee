"""The outer optimizers of meta-training: Adam, or a learned rule (the rule training itself).

Both are functional steps on the rule's weights, a dict of tensors: ``step(theta, grad, state, t)``
returns the new weights and updates ``state`` (a dict of tensors, checkpointed) in place.

* ``adam`` — Adam with ``lr`` (betas 0.9, 0.999);
* ``learned`` — a learned update rule (:func:`learned_opt.lopt.model.update`) applied to the
  rule's own weights as to any network's parameters. ``weights="self"`` uses the weights being
  meta-trained at that very step (Metz et al. 2020's "using them to train themselves"); any other
  value is loaded as :class:`~learned_opt.LearnedOptimizer` would load it (a registry name, a
  manifest path, ``"hand-set"``). ``lr`` is in Adam's units: the rule's own multiplier is
  ``lr / STEP_MULT``, so ``--outer-lr 1e-3`` takes steps of the size Adam(1e-3)'s would.
"""

from __future__ import annotations

import torch

from learned_opt.errors import ConfigError
from learned_opt.lopt.model import STEP_MULT, init_state, update
from learned_opt.lopt.weights import load_rule

OUTER_OPTIMIZERS = ("adam", "learned")
SELF = "self"


class OuterOptimizer:
    """One outer optimizer: ``kind`` ``"adam"`` or ``"learned"`` (with ``weights``)."""

    def __init__(self, kind: str = "adam", lr: float = 1e-3, weights: str = SELF):
        if kind not in OUTER_OPTIMIZERS:
            raise ConfigError(f"unknown outer optimizer {kind!r}; choose one of {', '.join(OUTER_OPTIMIZERS)}")
        self.kind, self.lr, self.weights = kind, lr, weights
        self._rule, self.sha256 = None, None
        if kind == "learned" and weights != SELF:
            rule = load_rule(weights)  # fails here, before any step, on bad weights
            self._rule, self.sha256 = rule.theta, rule.sha256 or None

    def describe(self) -> str:
        if self.kind == "adam":
            return f"Adam (lr {self.lr:g})"
        source = "the rule being meta-trained (it trains itself)" if self.weights == SELF else str(self.weights)
        return f"a learned rule, {source} (steps of Adam({self.lr:g})'s size)"

    def step(self, theta: dict[str, torch.Tensor], grad: dict[str, torch.Tensor], state: dict, t: int
             ) -> dict[str, torch.Tensor]:
        """The weights after outer step ``t`` (1-based) with gradient estimate ``grad``."""
        if self.kind == "adam":
            return adam_step(theta, grad, state, self.lr, t)
        return self._learned_step(theta, grad, state, t)

    def _learned_step(self, theta, grad, state, t):
        names = sorted(theta)
        params = [theta[k] for k in names]
        if not state:
            fresh = init_state(params)
            for k, m, v in zip(names, fresh["m"], fresh["v"]):
                state[f"m.{k}"], state[f"v.{k}"] = m, v
        rule = theta if self._rule is None else self._rule
        new, s = update(rule, params, [grad[k] for k in names],
                        {"m": [state[f"m.{k}"] for k in names], "v": [state[f"v.{k}"] for k in names]},
                        t - 1, lr=self.lr / STEP_MULT)
        for k, m, v in zip(names, s["m"], s["v"]):
            state[f"m.{k}"], state[f"v.{k}"] = m, v
        return dict(zip(names, new))


def adam_step(theta, grad, adam: dict, lr: float, t: int, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on a dict of tensors (functional: returns the new weights, updates ``adam`` in place)."""
    out = {}
    for k, g in grad.items():
        m = adam.get(f"m.{k}", torch.zeros_like(g)) * b1 + (1 - b1) * g
        v = adam.get(f"v.{k}", torch.zeros_like(g)) * b2 + (1 - b2) * g * g
        adam[f"m.{k}"], adam[f"v.{k}"] = m, v
        out[k] = theta[k] - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return out
