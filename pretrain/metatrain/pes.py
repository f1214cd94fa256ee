"""Persistent evolution strategies (PES, Vicol, Metz & Sohl-Dickstein 2021) over truncated unrolls.

A population of ``2 * pairs`` inner trainings runs one task. Each truncation of ``truncation``
inner steps, member ``i`` of pair ``i`` uses the rule's weights ``theta + eps_i`` and member
``pairs + i`` uses ``theta - eps_i`` (antithetic), ``eps_i ~ N(0, sigma^2)`` drawn fresh each
truncation. Each member keeps its own inner network and optimizer state across truncations
(persistent), and PES keeps the sum ``xi_i`` of every ``eps_i`` since the task began. The outer
loss of a member is its mean validation loss over the truncation's steps (clipped at
``loss_clip``, non-finite counted as ``loss_clip``; with ``log_loss`` the mean of its logarithm,
which weighs a late halving of the loss as much as an early one), and the gradient estimate is

    g = sum_i xi_i * (L+_i - L-_i) / (2 * pairs * sigma^2),

unbiased for the loss of the whole unroll, where truncated ES would count only this truncation's
``eps_i``. After ``unroll`` inner steps a new task is drawn, every member restarts from one fresh
init, and ``xi`` is reset.

The population's inner steps are one call of ``vmap(step)`` over its members: the members share
minibatches and differ only in the rule's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad_and_value, vmap

from learned_opt.lopt.model import init_state, update

from .family import MlpSpec, init_params, loss_of


@dataclass
class Unroll:
    """The population's inner trainings on one task, and PES's accumulated perturbations."""

    spec: MlpSpec
    params: tuple[torch.Tensor, ...]  # each [2P, ...]
    state: dict[str, tuple[torch.Tensor, ...]]  # "m" [2P, K, ...], "v" [2P, ...]
    xi: dict[str, torch.Tensor]  # [P, ...] per rule tensor
    step: int = 0

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_json(), "params": list(self.params), "m": list(self.state["m"]),
                "v": list(self.state["v"]), "xi": dict(self.xi), "step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> "Unroll":
        spec = MlpSpec(tuple(d["spec"]["sizes"]), int(d["spec"]["batch_size"]), float(d["spec"]["init_scale"]))
        return cls(spec, tuple(d["params"]), {"m": tuple(d["m"]), "v": tuple(d["v"])}, dict(d["xi"]), int(d["step"]))


def new_unroll(spec: MlpSpec, theta: dict[str, torch.Tensor], pairs: int, gen: torch.Generator) -> Unroll:
    """A fresh population of ``2 * pairs`` members (this process's pairs), all from one init drawn
    from ``gen`` (the same draw whatever ``pairs`` is)."""
    params = init_params(spec, gen, 2 * pairs)
    one = init_state([p[0] for p in params])
    state = {k: tuple(t.expand(2 * pairs, *t.shape).clone() for t in v) for k, v in one.items()}
    xi = {k: torch.zeros((pairs, *v.shape)) for k, v in theta.items()}
    return Unroll(spec, params, state, xi)


def _member_step(theta, params, m, v, x, y, xv, yv, step: int):
    """One inner step of one member: gradient on (x, y), the learned update, validation loss."""
    grads, _ = grad_and_value(loss_of)(params, x, y)
    new_params, new_state = update(theta, params, grads, {"m": m, "v": v}, step)
    return new_params, new_state["m"], new_state["v"], loss_of(new_params, xv, yv)


def truncation(
    theta: dict[str, torch.Tensor],
    unroll: Unroll,
    data,
    *,
    pairs: int,
    sigma: float,
    length: int,
    val_batch: int,
    loss_clip: float,
    log_loss: bool = False,
    gen: torch.Generator,
    part: tuple[int, int] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``length`` inner steps of every member; return (PES gradient estimate, per-member mean
    validation losses ``[2P]``, whatever the objective). ``unroll`` is advanced in place.

    ``part = (lo, hi)``: ``unroll`` holds only pairs ``[lo, hi)`` of ``pairs`` (one rank's share,
    :mod:`pretrain.metatrain.shard`); the perturbations of all pairs are still drawn, so every rank
    consumes ``gen`` alike, and the estimate returned is this share's term of the sum over pairs.
    """
    lo, hi = part if part is not None else (0, pairs)
    eps = {k: (torch.randn((pairs, *v.shape), generator=gen) * sigma)[lo:hi] for k, v in theta.items()}
    pop_theta = {k: torch.cat([theta[k] + e, theta[k] - e]) for k, e in eps.items()}  # [2P, ...]
    for k, e in eps.items():
        unroll.xi[k] = unroll.xi[k] + e
    n_train, n_val = data.train_x.shape[0], data.test_x.shape[0]
    mine = hi - lo
    total, objective = torch.zeros(2 * mine), torch.zeros(2 * mine)
    for _ in range(length):
        idx = torch.randint(n_train, (unroll.spec.batch_size,), generator=gen)
        vidx = torch.randint(n_val, (val_batch,), generator=gen)
        x, xv = unroll.spec.inputs(data.train_x[idx]), unroll.spec.inputs(data.test_x[vidx])
        y, yv = data.train_y[idx], data.test_y[vidx]
        step = unroll.step

        def one(th, p, m, v):
            return _member_step(th, p, m, v, x, y, xv, yv, step)

        params, m, v, vloss = vmap(one)(pop_theta, unroll.params, unroll.state["m"], unroll.state["v"])
        vloss = torch.nan_to_num(vloss, nan=loss_clip, posinf=loss_clip).clamp(max=loss_clip)
        total += vloss
        objective += vloss.clamp(min=1e-6).log() if log_loss else vloss
        unroll.params, unroll.state, unroll.step = tuple(params), {"m": tuple(m), "v": tuple(v)}, step + 1
        if not all(torch.isfinite(p).all() for p in unroll.params):  # a diverged member stays at the clip value
            unroll.params = tuple(torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0) for p in unroll.params)
    losses, objective = total / length, objective / length  # [2 * mine]
    diff = objective[:mine] - objective[mine:]  # [mine]
    grad = {k: torch.einsum("p,p...->...", diff, xi) / (2 * pairs * sigma**2) for k, xi in unroll.xi.items()}
    return grad, losses
