"""Batched PPO: ``R`` policies of any control task trained at once (discrete actions).

``R`` independent runs share one vector environment of ``R x envs`` sub-environments (the task's
:meth:`~learned_opt.tasks.ControlTask.make_env`) and one set of batched matmuls; each run has its
own policy (the task's model), its own value network (observations-64-64-1, tanh, not stored), its
own Adam state and its own hyperparameters (learning rate, discount, GAE lambda, clip range,
entropy bonus). Runs never interact: the loss is a sum of per-run losses, so each run's gradient
is exactly what it would be alone. The control corpus trains its runs with this
(:mod:`pretrain.corpus.ppo_family`); ``eval`` and ``demo`` use it as the control baseline (the
demo with one run). Schulman et al. 2017, https://arxiv.org/abs/1707.06347.

The observation size and the number of actions come from the environment's spaces (a
``Discrete`` action space is required); actions are sampled from the policy's softmax.

Gymnasium 1.x vector environments reset a finished sub-environment on the *next* ``step`` call
("next-step" autoreset): that step ignores the action, returns the new episode's first observation
and a reward of 0. Such steps are not transitions; they are masked out of the loss, and the
advantage recursion is cut at every episode end. A truncated episode is bootstrapped with the
value of its final observation, which the done step itself returns.

Checkpoints are taken at gradient steps (one per minibatch): the init, 198 random intermediate
steps and the final step, as a supervised corpus does with its iterations.

Randomness. With ``run_seeds`` (what the corpus builder passes) every run has its own streams,
derived from its seed alone: its checkpoint steps (stream 1, as a supervised run's), its action
sampling and minibatch order (stream 2), the starting points of its episodes (stream 3: the
run's own NumPy generator, handed to the task's
:meth:`~learned_opt.tasks.ControlTask.draw_starts`; every sub-environment is reset to them with
:meth:`~learned_opt.tasks.ControlTask.reset_to`, at the start and after every episode) and its
value network's init (stream 4). A run is then the same whatever other runs train beside it, so a
resumed or sharded corpus reproduces it. Without ``run_seeds`` the streams of run ``r`` derive
from ``(seed, r)`` and all runs share the checkpoint steps drawn from ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, cast

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, EnvironmentStepError
from ..layout import Layout
from ..recipes import PPO_ADAM_EPS, PPO_BASELINE, PPO_STEPS
from ..seeding import checkpoint_steps, stream, stream_seed
from ..tasks import MLP, ControlTask


@dataclass(frozen=True)
class PPOShape:
    """What all runs trained together must share (the step structure; defaults: recipes.PPO_STEPS)."""

    envs: int = PPO_STEPS["envs"]  # sub-environments per run
    horizon: int = PPO_STEPS["horizon"]  # environment steps per run between updates
    epochs: int = PPO_STEPS["epochs"]  # passes over each rollout
    minibatches: int = PPO_STEPS["minibatches"]  # minibatches per pass
    total_steps: int = 100_000  # environment steps per run (rounded down to whole updates, at least one)
    value_hidden: int = PPO_STEPS["value_hidden"]

    @property
    def steps_per_update(self) -> int:
        return self.envs * self.horizon

    @property
    def updates(self) -> int:
        return max(1, self.total_steps // self.steps_per_update)

    @property
    def grad_steps(self) -> int:
        return self.updates * self.epochs * self.minibatches


@dataclass
class PPOHparams:
    """Per-run hyperparameters (each a float, or one value per run when batched; defaults: recipes.PPO_BASELINE)."""

    lr: float = PPO_BASELINE["lr"]  # Adam (eps recipes.PPO_ADAM_EPS), policy and value network
    gamma: float = PPO_BASELINE["gamma"]
    gae_lambda: float = PPO_BASELINE["gae_lambda"]
    clip: float = PPO_BASELINE["clip"]
    entropy_coef: float = PPO_BASELINE["entropy_coef"]
    value_coef: float = PPO_BASELINE["value_coef"]
    max_grad_norm: float = PPO_BASELINE["max_grad_norm"]


@dataclass
class PPOResult:
    checkpoints: torch.Tensor  # [R, K, P] policy parameters
    steps: torch.Tensor  # [K] gradient-step index of each checkpoint (0 = the init); [R, K] with run_seeds
    env_steps: torch.Tensor  # like steps: environment steps per run seen at each checkpoint
    train_return: torch.Tensor  # [R] mean return of the episodes finished in the last update
    extra: dict = field(default_factory=dict)


class _Batched:
    """Parameters of ``R`` copies of one module as a flat leaf ``[R, P]`` with vmapped forward."""

    def __init__(self, module: nn.Module, flat: torch.Tensor):
        self.module, self.layout = module, Layout.of(module)
        self.flat = flat.detach().clone().requires_grad_(True)  # [R, P]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [R, N, in] -> [R, N, out]
        def one(p, xi):
            return torch.func.functional_call(self.module, p, (xi,))

        return torch.func.vmap(one)(self.layout.unflatten(self.flat), x)


class _BatchedAdam:
    """Adam on a ``[R, P]`` leaf with one learning rate per row."""

    def __init__(self, flat: torch.Tensor, lr: torch.Tensor, betas=(0.9, 0.999), eps: float = PPO_ADAM_EPS):
        self.flat, self.lr, self.betas, self.eps = flat, lr[:, None], betas, eps
        self.m, self.v, self.t = torch.zeros_like(flat), torch.zeros_like(flat), 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        self.flat.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def _as_column(values, runs: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    return t.expand(runs).clone() if t.numel() == 1 else t


def _spaces(task: ControlTask, env) -> tuple[int, int]:
    """``(observation size, number of actions)`` of one sub-environment."""
    n = getattr(env.single_action_space, "n", None)
    if n is None:
        raise ConfigError(f"PPO here needs discrete actions; {task.env_id} has {env.single_action_space}")
    return int(np.prod(env.single_observation_space.shape)), int(n)


def _checked(task: ControlTask, obs: np.ndarray) -> np.ndarray:
    if not np.isfinite(obs).all():
        raise EnvironmentStepError(f"{task.env_id} returned non-finite observations; check the gymnasium installation")
    return np.asarray(obs, dtype=np.float32)


def train_ppo(
    task: ControlTask,
    init: torch.Tensor,
    hparams: PPOHparams = PPOHparams(),
    shape: PPOShape = PPOShape(),
    *,
    seed: int = 0,
    num_checkpoints: int = 200,
    run_seeds: Sequence[int] | None = None,
    checkpoint_at: Sequence[int] | None = None,
    progress=None,
) -> PPOResult:
    """Train ``R = init.shape[0]`` policies from ``init`` [R, P]; hparams fields may be per-run lists.

    Deterministic for a given ``seed``. With ``run_seeds`` ([R] ints) each run's randomness comes
    from its own seed (see the module's docstring): a run does not depend on its batch mates, and
    ``steps`` / ``env_steps`` are ``[R, K]``. ``checkpoint_at`` (sorted gradient steps in
    ``[0, shape.grad_steps]``) replaces the drawn checkpoint steps with the same ones for every run
    (``num_checkpoints`` is then ignored; training is unchanged). ``progress`` (optional) is called
    with the number of gradient steps done after each update.
    """
    if shape.steps_per_update % shape.minibatches:
        raise ConfigError(f"envs x horizon ({shape.steps_per_update}) must be a multiple of minibatches "
                          f"({shape.minibatches})")
    runs, e = init.shape[0], shape.envs
    hp = {k: _as_column(getattr(hparams, k), runs) for k in vars(hparams)}
    for name, v in hp.items():
        if v.numel() != runs:
            raise ValueError(f"hyperparameter {name} has {v.numel()} values for {runs} runs")
    shared_steps = run_seeds is None
    if run_seeds is None:
        run_seeds = [stream_seed(seed, 100 + r) for r in range(runs)]
    run_seeds = [int(s) for s in run_seeds]
    if len(run_seeds) != runs:
        raise ValueError(f"{len(run_seeds)} run seeds for {runs} runs")
    gens = [stream(s, 2) for s in run_seeds]  # actions and minibatch order
    env_rngs = [np.random.default_rng(stream_seed(s, 3)) for s in run_seeds]  # episode starts

    if checkpoint_at is not None:
        save_at = torch.as_tensor(list(checkpoint_at), dtype=torch.long)
        if save_at.numel() == 0 or bool((save_at.diff() <= 0).any()) or int(save_at[0]) < 0 \
                or int(save_at[-1]) > shape.grad_steps:
            raise ValueError(f"checkpoint_at must be increasing steps in [0, {shape.grad_steps}]")
        save_rows = save_at.expand(runs, -1)
    elif shared_steps:
        save_at = checkpoint_steps(shape.grad_steps, num_checkpoints, torch.Generator().manual_seed(seed))
        save_rows = save_at.expand(runs, -1)
    else:
        save_rows = torch.stack([checkpoint_steps(shape.grad_steps, num_checkpoints, stream(s, 1)) for s in run_seeds])

    env = task.make_env(runs * e)
    try:
        obs_dim, _ = _spaces(task, env)
        value_sizes = (obs_dim, shape.value_hidden, shape.value_hidden, 1)
        value_nets = []
        with torch.random.fork_rng(devices=[]):  # module inits must not touch the global RNG
            policy = _Batched(task.build_model(), init.float())
            for s in run_seeds:
                torch.manual_seed(stream_seed(s, 4))
                value_nets.append(MLP(value_sizes, nn.Tanh, flatten=False))
        value = _Batched(value_nets[0], torch.stack([Layout.of(v).flatten_module(v) for v in value_nets]))
        params = [policy.flat, value.flat]
        opts = [_BatchedAdam(p, hp["lr"]) for p in params]

        saved = torch.empty(runs, save_rows.shape[1], init.shape[1])
        save_when: dict[int, list[tuple[int, int]]] = {}  # grad step -> [(run, slot)]
        for run, row in enumerate(save_rows.tolist()):
            for slot, step in enumerate(row):
                save_when.setdefault(step, []).append((run, slot))
        grad_step = 0

        def maybe_save():
            for r, slot in save_when.get(grad_step, ()):
                saved[r, slot] = policy.flat[r].detach()

        def starts(done: np.ndarray) -> np.ndarray:  # the next episodes' starts, each from its run's stream
            runs_done = np.flatnonzero(done) // e
            return np.concatenate([task.draw_starts(env_rngs[r], int((runs_done == r).sum()))
                                   for r in np.unique(runs_done)])

        maybe_save()
        everyone = np.ones(runs * e, dtype=bool)
        obs_np = _checked(task, task.reset_to(env, starts(everyone)))
        rows = torch.arange(runs)[:, None]
        prev_done = np.zeros(runs * e, dtype=bool)
        finished_returns: list[list[float]] = [[] for _ in range(runs)]
        episode_return = np.zeros(runs * e)
        T = shape.horizon
        for _update in range(shape.updates):
            # ---------------------------------------------------------- rollout [T, R, E]
            obs_buf = torch.zeros(T + 1, runs, e, obs_dim)
            act_buf = torch.zeros(T, runs, e, dtype=torch.long)
            logp_buf, rew_buf = torch.zeros(T, runs, e), torch.zeros(T, runs, e)
            done_buf, valid_buf = (torch.zeros(T, runs, e, dtype=torch.bool) for _ in range(2))
            boot_buf = torch.zeros(T, runs, e)  # value of the final obs of truncated episodes
            uniforms = torch.stack([torch.rand(T, e, generator=g) for g in gens], dim=1)  # [T, R, E]
            for t in range(T):
                obs = torch.from_numpy(obs_np).view(runs, e, obs_dim)
                with torch.no_grad():
                    logits = policy(obs)  # [R, E, A]
                    cdf = logits.softmax(-1).cumsum(-1)
                    a = (uniforms[t, ..., None] >= cdf[..., :-1]).sum(-1)  # P(a) = softmax(logits)[a]
                    logp = torch.log_softmax(logits, -1).gather(-1, a[..., None])[..., 0]
                obs_buf[t], act_buf[t], logp_buf[t] = obs, a, logp
                valid_buf[t] = torch.from_numpy(~prev_done).view(runs, e)
                try:
                    obs_np, r, term, trunc, _ = env.step(a.view(-1).numpy())
                except Exception as exc:  # a broken environment must not look like a bad policy
                    raise EnvironmentStepError(f"{task.env_id} failed to step: {exc}") from exc
                obs_np = np.asarray(obs_np, dtype=np.float32).reshape(runs * e, obs_dim)
                r, term, trunc = np.asarray(r), np.asarray(term), np.asarray(trunc)
                if prev_done.any():  # autoreset: the new episodes start where the runs' own streams say
                    obs_np[prev_done] = task.reset_to(env, starts(prev_done), prev_done).reshape(-1, obs_dim)
                _checked(task, obs_np)
                episode_return += np.where(prev_done, 0.0, r)
                done = term | trunc
                for i in np.flatnonzero(done & ~prev_done):
                    finished_returns[i // e].append(episode_return[i])
                    episode_return[i] = 0.0
                rew_buf[t] = torch.from_numpy(r.astype(np.float32)).view(runs, e)
                done_buf[t] = torch.from_numpy(done).view(runs, e)
                if trunc.any():
                    with torch.no_grad():
                        v_final = value(torch.from_numpy(obs_np).view(runs, e, obs_dim))[..., 0]
                    boot_buf[t] = torch.where(torch.from_numpy(trunc & ~term).view(runs, e), v_final, 0.0)
                prev_done = done
            obs_buf[T] = torch.from_numpy(obs_np).view(runs, e, obs_dim)

            # ---------------------------------------------------------- GAE
            with torch.no_grad():
                values = value(obs_buf.permute(1, 0, 2, 3).reshape(runs, -1, obs_dim)).view(runs, T + 1, e)
                values = values.permute(1, 0, 2)  # [T+1, R, E]
                gamma, lam = hp["gamma"][:, None], hp["gae_lambda"][:, None]
                adv = torch.zeros(T, runs, e)
                last = torch.zeros(runs, e)
                for t in reversed(range(T)):
                    not_done = (~done_buf[t]).float()
                    # terminated: no future; truncated: the final observation's value; else V(s_t+1)
                    next_v = values[t + 1] * not_done + boot_buf[t]
                    delta = rew_buf[t] + gamma * next_v - values[t]
                    last = delta + gamma * lam * not_done * last
                    adv[t] = last
                returns = adv + values[:T]

            # ---------------------------------------------------------- PPO epochs, [R, N] per run
            flat = lambda x: x.permute(1, 0, *range(2, x.dim())).reshape(runs, T * e, *x.shape[3:])  # noqa: E731
            b_obs, b_act, b_logp = flat(obs_buf[:T]), flat(act_buf), flat(logp_buf)
            b_adv, b_ret, b_valid = flat(adv), flat(returns), flat(valid_buf).float()
            n = T * e
            mb = n // shape.minibatches
            clip, ent_c, v_c = hp["clip"][:, None], hp["entropy_coef"][:, None], hp["value_coef"][:, None]
            for _epoch in range(shape.epochs):
                order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # [R, n]: per run
                for k in range(shape.minibatches):
                    idx = order[:, k * mb : (k + 1) * mb]
                    o, a, old, ad, ret, w = (x[rows, idx] for x in (b_obs, b_act, b_logp, b_adv, b_ret, b_valid))
                    count = w.sum(1).clamp_min(1.0)  # [R]
                    mean = (ad * w).sum(1, keepdim=True) / count[:, None]
                    var = ((ad - mean) ** 2 * w).sum(1, keepdim=True) / count[:, None]
                    ad = (ad - mean) / (var.sqrt() + 1e-8)
                    logits = policy(o)  # [R, mb, A]
                    logp_all = torch.log_softmax(logits, -1)
                    logp = logp_all.gather(-1, a[..., None])[..., 0]
                    ratio = (logp - old).exp()
                    pg = -torch.minimum(ratio * ad, ratio.clamp(1 - clip, 1 + clip) * ad)
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
                    v = value(o)[..., 0]
                    per_sample = pg - ent_c * entropy + v_c * (v - ret) ** 2
                    loss = ((per_sample * w).sum(1) / count).sum()  # runs are independent
                    grads = torch.autograd.grad(loss, params)
                    norm = torch.sqrt(cast(torch.Tensor, sum(g.pow(2).sum(1) for g in grads)))  # [R], a sum of two
                    scale = (hp["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)[:, None]
                    for opt, g in zip(opts, grads):
                        opt.step(g * scale)
                    grad_step += 1
                    maybe_save()
            if progress is not None:
                progress(grad_step)
    finally:
        env.close()

    train_return = torch.tensor([np.mean(r[-10:]) if r else float("nan") for r in finished_returns])
    steps = save_at.clone() if shared_steps else save_rows.clone()
    return PPOResult(
        checkpoints=saved,
        steps=steps,
        env_steps=env_steps_at(steps, shape),
        train_return=train_return,
    )


def env_steps_at(steps: torch.Tensor, shape: PPOShape) -> torch.Tensor:
    """Environment steps per run seen by the checkpoint after ``steps`` gradient steps."""
    per_update = shape.epochs * shape.minibatches
    return (steps + per_update - 1).div(per_update, rounding_mode="floor") * shape.horizon * shape.envs
