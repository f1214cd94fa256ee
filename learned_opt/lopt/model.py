"""The per-parameter update rule: its features, its MLP, and the pure update function.

In the spirit of Metz et al. 2020 ("Tasks, stability, architecture, and compute", the
``small_fc_lopt`` of ``learned_optimization``): every element of every parameter tensor is fed to
one small MLP, shared by all elements, that reads

* the parameter and its gradient;
* momenta of the gradient at decay rates ``BETAS`` (0.5, 0.9, 0.99, 0.999);
* a second-moment estimate ``v`` (decay ``BETA2``), used to normalise the gradient and each momentum
  (``g / sqrt(v)``, ``m / sqrt(v)``: Adam's direction at several momenta);
* each of those per-element features divided by its root mean square over the tensor, then clipped
  to ``[-CLIP, CLIP]`` (so the rule sees shapes, not scales, and works on any network);
* and, not normalised per tensor, Adam's direction at each momentum, ``m̂_k / sqrt(v̂)`` with Adam's
  bias corrections, clipped: scale-free already, these keep what the normalised features lose, how
  large the momentum is against the gradient's noise (which is what makes Adam's steps shrink late
  in training);
* the log of the tensor's number of elements (per tensor), the training step through sinusoids of
  several periods (``TIMESCALES``) and the log of the number of tensors (scalars broadcast to the
  elements: with the size, a rule meta-trained on small networks can scale its steps to wide ones).

It outputs a direction ``d`` and a log magnitude ``s``; the update is, as in Metz 2020,
``p <- p - lr * d * exp(EXP_MULT * s) * STEP_MULT``.

:func:`update` is pure (no in-place writes, no Python loop over elements, no RNG), so it runs under
``torch.func.vmap`` over a population of MLP weights and inner networks, which is how meta-training
(``learned-opt meta-train``) trains a whole population in one process.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

BETAS = (0.5, 0.9, 0.99, 0.999)  # momentum decay rates
BETA2 = 0.999  # second-moment decay rate
TIMESCALES = (10.0, 100.0, 1000.0, 10000.0)  # periods / 2π of the step sinusoids
CLIP = 5.0  # per-element features are clipped to [-CLIP, CLIP] after RMS normalisation
EPS = 1e-8
STEP_MULT = 1e-3  # Metz 2020's step_mult: a unit direction moves a parameter by 1e-3
EXP_MULT = 1e-2  # the log magnitude's multiplier
HIDDEN = (32, 32)
MAX_ROWS = 1 << 18  # elements per pass of the MLP: a larger model takes several, so a step's memory stays bounded
NUM_NORMALISED = 3 + 2 * len(BETAS)  # p, g, g/sqrt(v), m_k, m_k/sqrt(v): divided by their RMS over the tensor
NUM_ELEMENT_FEATURES = NUM_NORMALISED + len(BETAS)  # + m̂_k/sqrt(v̂), bias-corrected, not normalised
NUM_FEATURES = NUM_ELEMENT_FEATURES + 1 + 2 * len(TIMESCALES) + 1  # + log(numel) + sinusoids + log(num tensors)
ADAM_FEATURE = NUM_NORMALISED + BETAS.index(0.9)  # m̂_0.9 / sqrt(v̂): the hand-set rule's direction (Adam's)

FEATURE_CONFIG = {
    "betas": list(BETAS), "beta2": BETA2, "timescales": list(TIMESCALES), "clip": CLIP, "eps": EPS,
    "step_mult": STEP_MULT, "exp_mult": EXP_MULT, "num_features": NUM_FEATURES, "adam_directions": "bias-corrected",
    "tensor_features": ["log numel"],
}


def theta_shapes(hidden: Sequence[int] = HIDDEN) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the MLP's tensors: ``w{i}`` ``[in, out]`` and ``b{i}`` ``[out]``."""
    sizes = [NUM_FEATURES, *hidden, 2]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"w{i}"], shapes[f"b{i}"] = (a, b), (b,)
    return shapes


def hand_set_theta(hidden: Sequence[int] = HIDDEN, seed: int = 0, noise: float = 0.01) -> dict[str, torch.Tensor]:
    """An MLP whose step is Adam(lr 1e-3)'s, ``1e-3 * m̂_0.9 / sqrt(v̂ + EPS)`` (clipped at
    ``CLIP``), at ``lr=1``, plus small random weights (``noise``) elsewhere.

    Two hidden units carry ``relu(x)`` and ``relu(-x)`` of that feature through every layer and the
    direction output takes their difference, so the rule is exactly that step when ``noise=0``.
    It is where meta-training starts. Drawn from its own generator: the global RNG is untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = {k: torch.randn(s, generator=gen) * (noise / math.sqrt(s[0]) if len(s) == 2 else 0.0)
             for k, s in theta_shapes(hidden).items()}
    n = len(hidden)
    theta["w0"][:, :2] = 0.0
    theta["w0"][ADAM_FEATURE, 0], theta["w0"][ADAM_FEATURE, 1] = 1.0, -1.0
    for i in range(1, n):
        theta[f"w{i}"][:, :2] = 0.0
        theta[f"w{i}"][:2, :] = 0.0
        theta[f"w{i}"][0, 0] = theta[f"w{i}"][1, 1] = 1.0
    out = theta[f"w{n}"]
    out[:2, :] = 0.0
    out[0, 0], out[1, 0] = 1.0, -1.0
    out[:, 1] = 0.0  # magnitude 0: exp(0) = 1
    return theta


def init_state(params: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Zero momenta ``m`` ``[len(BETAS), *shape]`` and second moments ``v`` per tensor (fp32)."""
    return {
        "m": tuple(torch.zeros((len(BETAS), *p.shape), dtype=torch.float32, device=p.device) for p in params),
        "v": tuple(torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params),
    }


def _raw_rows(p: torch.Tensor, g: torch.Tensor, m_row, rsqrt: torch.Tensor):
    """The features that are normalised by their RMS over the tensor, as they are before that, one
    row at a time (``[1, n]`` each, :data:`NUM_NORMALISED` of them): p, g, g/sqrt(v), each m_k, each
    m_k/sqrt(v); ``m_row(k)`` gives m_k."""
    yield p
    yield g
    yield g * rsqrt
    for k in range(len(BETAS)):
        yield m_row(k)
    for k in range(len(BETAS)):
        yield m_row(k) * rsqrt


def bias_corrections(step, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias corrections after step ``step`` (0-based): ``1 - beta_k^(step+1)`` ``[K, 1]``
    and ``1 - BETA2^(step+1)``."""
    t = torch.as_tensor(step, dtype=torch.float32, device=device) + 1
    betas = torch.tensor(BETAS, dtype=torch.float32, device=device)
    return (1 - betas ** t).unsqueeze(1), 1 - torch.tensor(BETA2, device=device) ** t


def moments(g: torch.Tensor, m, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The momenta ``[K, n]`` and second moment ``[1, n]`` after a step with gradient ``g``
    (``[1, n]``, fp32) from ``m`` (``[K, n]``, or a sequence of K rows ``[1, n]``) and ``v`` ``[1, n]``."""
    b = torch.tensor(BETAS, dtype=torch.float32, device=g.device).view(-1, 1)
    m = m if isinstance(m, torch.Tensor) else torch.cat(list(m))
    return b * m + (1 - b) * g, BETA2 * v + (1 - BETA2) * g.square()


def features(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step=0, corrections=None
             ) -> torch.Tensor:
    """Per-element features ``[NUM_ELEMENT_FEATURES, n]`` of one tensor (``n`` = its numel), after
    step ``step`` (0-based) updated the momenta ``m`` and ``v``; ``corrections`` is
    :func:`bias_corrections` of that step where the caller has it already."""
    n = p.numel()
    return features_of(p.reshape(1, n), g.reshape(1, n), m.reshape(len(BETAS), n), v.reshape(1, n), None,
                       bias_corrections(step, p.device) if corrections is None else corrections)


def features_of(p, g, m, v, rms: torch.Tensor | None, corrections) -> torch.Tensor:
    """:func:`features` of flattened elements (``p``, ``g``, ``v`` ``[1, n]``, ``m`` ``[K, n]``, after
    the step), normalised by ``rms`` ``[NUM_NORMALISED, 1]`` (None: by these elements' own RMS,
    which is right where they are the whole tensor)."""
    rsqrt = torch.rsqrt(v + EPS)
    bc_m, bc_v = corrections
    adam = (m / bc_m) * torch.rsqrt(v / bc_v + EPS)  # [K, n]
    raw = torch.cat(list(_raw_rows(p, g, lambda k: m[k:k + 1], rsqrt)))  # [NUM_NORMALISED, n]
    if rms is None:
        rms = raw.square().mean(dim=1, keepdim=True).add(EPS).sqrt()
    return torch.cat([(raw / rms).clamp(-CLIP, CLIP), adam.clamp(-CLIP, CLIP)])


def _rows_of(m, n: int) -> list[torch.Tensor]:
    """A tensor's momenta before the step, ``[K, *shape]`` or a sequence of K tensors, as K rows ``[1, n]``."""
    return list(m.reshape(len(BETAS), n).split(1)) if isinstance(m, torch.Tensor) else [t.reshape(1, n) for t in m]


def _slices(p: torch.Tensor, g: torch.Tensor, m: list[torch.Tensor], v: torch.Tensor, corrections,
            finite: list | None):
    """``(elements, features)`` of one flattened tensor before the step (``p``, ``g``, ``v`` ``[1, n]``,
    ``m`` K rows), :data:`MAX_ROWS` elements at a time. A larger tensor's RMS comes first, from a
    pass that holds one row of its features at a time (the new momenta are worked out again for
    each slice: they are never held whole). Once done, appends to ``finite`` (where given) whether
    the new momenta and ``v`` are all finite, a 0-d bool tensor."""
    flags = []
    for s, new_m, new_v, rms in _new_slices(p, g, m, v):
        if finite is not None:
            flags.append(torch.isfinite(new_m).all() & torch.isfinite(new_v).all())
        yield new_v.shape[1], features_of(p[:, s], g[:, s], new_m, new_v, rms, corrections)
    if finite is not None:
        finite.append(torch.stack(flags).all())


def _new_slices(p, g, m, v):
    """``(elements, new momenta, new v, rms)`` of :func:`_slices`, a slice at a time."""
    n = p.shape[1]
    if n <= MAX_ROWS:
        yield (slice(None), *moments(g, m, v), None)
        return
    new_v = BETA2 * v + (1 - BETA2) * g.square()
    b = torch.tensor(BETAS, dtype=torch.float32, device=g.device).view(-1, 1)
    rows = _raw_rows(p, g, lambda k: b[k:k + 1] * m[k] + (1 - b[k:k + 1]) * g, torch.rsqrt(new_v + EPS))
    del new_v
    rms = torch.cat([x.square().mean(dim=1, keepdim=True) for x in rows]).add(EPS).sqrt()
    for lo in range(0, n, MAX_ROWS):
        s = slice(lo, min(lo + MAX_ROWS, n))
        yield (s, *moments(g[:, s], [r[:, s] for r in m], v[:, s]), rms)


def tensor_features(p: torch.Tensor) -> torch.Tensor:
    """Per-tensor features ``[1]``: the log of the tensor's number of elements."""
    return torch.full((1,), math.log(max(p.numel(), 1)), dtype=torch.float32, device=p.device)


def step_features(step, num_tensors: int, device, dtype=torch.float32) -> torch.Tensor:
    """Per-tensor features ``[2 * len(TIMESCALES) + 1]``: sin/cos of step / timescale, log(#tensors)."""
    t = torch.as_tensor(step, dtype=dtype, device=device) / torch.tensor(TIMESCALES, dtype=dtype, device=device)
    return torch.cat([t.sin(), t.cos(), torch.full((1,), math.log(max(num_tensors, 1)), dtype=dtype, device=device)])


def mlp(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP on features ``x`` ``[n, NUM_FEATURES]`` -> ``[n, 2]`` (direction, log magnitude)."""
    return head(theta, x @ theta["w0"] + theta["b0"])


def head(theta: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """The MLP after its first linear layer: ``h`` ``[n, hidden[0]]`` (pre-activation) -> ``[n, 2]``."""
    n_layers = sum(1 for k in theta if k.startswith("w"))
    for i in range(1, n_layers):
        h = torch.relu(h) @ theta[f"w{i}"] + theta[f"b{i}"]
    return h


def step_deltas(
    theta: dict[str, torch.Tensor],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: dict[str, Sequence],
    step,
    lr: float | torch.Tensor = 1.0,
    num_tensors: int | None = None,
    finite: list | None = None,
) -> list[torch.Tensor]:
    """Each tensor's learned step, flat fp32 ``[numel]`` (its new value is ``p - delta``), from the
    momenta before the step: ``state["m"]`` holds per tensor ``[K, *shape]`` or a sequence of K
    tensors of its shape, ``state["v"]`` one of its shape. Nothing is modified in place.

    ``step`` is the index of this step (0 for the first); ``num_tensors`` (default ``len(params)``)
    is the tensor count the rule is told. The first layer runs per tensor, the rest of the MLP over
    the tensors' elements concatenated, :data:`MAX_ROWS` elements at a time (a tensor larger than
    that in slices, whose new momenta are never held whole), so that a step's memory beyond the
    deltas is the same whatever the model's size; the result is :func:`mlp` on every element's
    full feature vector (bit for bit as one pass where the tensors have at most :data:`MAX_ROWS`
    elements in all; above, to float rounding). Where ``finite`` is a list, each tensor's new
    momenta and ``v`` are checked on the way: a 0-d bool tensor per tensor, True where all are finite.
    """
    if not params:
        return []
    num_tensors = len(params) if num_tensors is None else num_tensors
    deltas: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []  # first-layer outputs [n, hidden0] waiting for the rest of the MLP
    pending = 0  # their elements

    def rest_of_mlp() -> None:
        nonlocal pending
        if rows:
            out = head(theta, torch.cat(rows) if len(rows) > 1 else rows[0])  # [n, 2]
            deltas.append(out[:, 0] * torch.exp(EXP_MULT * out[:, 1]))
            rows.clear()
        pending = 0

    scalars = step_features(step, num_tensors, params[0].device)  # [S]
    corrections = bias_corrections(step, params[0].device)  # once per step, not per tensor
    # The first layer in parts: the per-element features of each tensor, and the per-tensor and
    # shared scalars, whose contribution is one bias row per tensor (same sum as
    # mlp(theta, cat([features, tensor_features, scalars]))).
    w0 = theta["w0"]
    size_row = w0[NUM_ELEMENT_FEATURES:NUM_ELEMENT_FEATURES + 1]  # [1, hidden0]
    bias = scalars @ w0[NUM_ELEMENT_FEATURES + 1:] + theta["b0"]  # [hidden0]
    for p, g, m, v in zip(params, grads, state["m"], state["v"]):
        n = p.numel()
        row_bias = bias + tensor_features(p) @ size_row  # [hidden0]
        for count, f in _slices(p.float().reshape(1, n), g.float().reshape(1, n), _rows_of(m, n), v.reshape(1, n),
                                corrections, finite):
            if pending + count > MAX_ROWS:
                rest_of_mlp()
            rows.append(f.T @ w0[:NUM_ELEMENT_FEATURES] + row_bias)  # [count, hidden0]
            pending += count
    rest_of_mlp()
    directions = torch.cat(deltas) if deltas else torch.zeros(0, device=params[0].device)
    return list((directions * STEP_MULT * lr).split([p.numel() for p in params]))


def stepped(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``p - delta`` in float32, or in the parameter's own dtype where it is wider (float64 is not
    rounded), as ``p``'s dtype."""
    wide = torch.promote_types(p.dtype, torch.float32)
    return (p.to(wide) - delta.view(p.shape).to(wide)).to(p.dtype)


def update(
    theta: dict[str, torch.Tensor],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: dict[str, Sequence[torch.Tensor]],
    step,
    lr: float | torch.Tensor = 1.0,
    num_tensors: int | None = None,
) -> tuple[tuple[torch.Tensor, ...], dict[str, tuple[torch.Tensor, ...]]]:
    """One learned step of every tensor in ``params``: ``(new_params, new_state)``, with the state as
    :func:`init_state` makes it; nothing is modified in place. Computed in fp32 (a float64 parameter
    is updated in float64); new parameters take each parameter's dtype. :func:`step_deltas` says
    what the arguments are and how the rule runs; this is the pure form meta-training vmaps.
    """
    deltas = step_deltas(theta, params, grads, state, step, lr, num_tensors)
    new = [moments(g.float().reshape(1, -1), _rows_of(m, p.numel()), v.reshape(1, -1))
           for p, g, m, v in zip(params, grads, state["m"], state["v"])]
    return (tuple(stepped(p, d) for p, d in zip(params, deltas)),
            {"m": tuple(m.view(len(BETAS), *p.shape) for (m, _), p in zip(new, params)),
             "v": tuple(v.view(p.shape) for (_, v), p in zip(new, params))})
