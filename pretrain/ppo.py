"""Batched PPO: many CartPole policies trained at once, for the ``cartpole-mlp`` corpus.

``R`` independent runs share one gymnasium vector environment of ``R x envs`` sub-environments
and one set of batched matmuls; each run has its own policy (the task's 4-32-32-2 MLP), its own
value network (4-64-64-1, not stored), its own Adam state and its own hyperparameters (learning
rate, discount, GAE lambda, clip range, entropy bonus). Runs never interact: the loss is a sum of
per-run losses, so each run's gradient is exactly what it would be alone.

Gymnasium 1.x vector environments reset a finished sub-environment on the *next* ``step`` call
("next-step" autoreset): that step ignores the action, returns the new episode's first observation
and a reward of 0. Such steps are not transitions; they are masked out of the loss, and the
advantage recursion is cut at every episode end. A truncated episode (500 steps) is bootstrapped
with the value of its final observation, which the done step itself returns.

Checkpoints are taken at gradient steps (one per minibatch): the init, 198 random intermediate
steps and the final step, as the MNIST corpus does with SGD iterations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from learned_opt.layout import Layout
from learned_opt.tasks import MLP, Task

from .corpus import checkpoint_steps


@dataclass(frozen=True)
class PPOShape:
    """What all runs trained together must share (the step structure)."""

    envs: int = 8  # sub-environments per run
    horizon: int = 128  # environment steps per run between updates
    epochs: int = 4  # passes over each rollout
    minibatches: int = 4  # minibatches per pass
    total_steps: int = 100_000  # environment steps per run
    value_hidden: int = 64

    @property
    def updates(self) -> int:
        return max(1, self.total_steps // (self.envs * self.horizon))

    @property
    def grad_steps(self) -> int:
        return self.updates * self.epochs * self.minibatches


@dataclass
class PPOHparams:
    """Per-run hyperparameters (each a float, or one value per run when batched)."""

    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass
class PPOResult:
    checkpoints: torch.Tensor  # [R, K, P] policy parameters
    steps: torch.Tensor  # [K] gradient-step index of each checkpoint (0 = the init)
    env_steps: torch.Tensor  # [K] environment steps per run seen at each checkpoint
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

    def __init__(self, flat: torch.Tensor, lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-5):
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


def train_ppo(
    task: Task,
    init: torch.Tensor,
    hparams: PPOHparams,
    shape: PPOShape = PPOShape(),
    *,
    seed: int = 0,
    num_checkpoints: int = 200,
    progress=None,
) -> PPOResult:
    """Train ``R = init.shape[0]`` policies from ``init`` [R, P]; hparams fields may be per-run lists.

    Deterministic for a given ``seed``. ``progress`` (optional) is called with the number of
    gradient steps done after each update.
    """
    import gymnasium as gym

    runs, e = init.shape[0], shape.envs
    gen = torch.Generator().manual_seed(seed)
    hp = {k: _as_column(getattr(hparams, k), runs) for k in vars(hparams)}
    for k, v in hp.items():
        if v.numel() != runs:
            raise ValueError(f"hyperparameter {k} has {v.numel()} values for {runs} runs")

    value_sizes = (4, shape.value_hidden, shape.value_hidden, 1)
    with torch.random.fork_rng(devices=[]):  # module inits must not touch the global RNG
        torch.manual_seed(seed)
        policy = _Batched(task.build_model(), init.float())
        value_nets = [MLP(value_sizes, nn.Tanh, flatten=False) for _ in range(runs)]
    value = _Batched(value_nets[0], torch.stack([Layout.of(v).flatten_module(v) for v in value_nets]))
    params = [policy.flat, value.flat]
    opts = [_BatchedAdam(p, hp["lr"]) for p in params]

    save_at = checkpoint_steps(shape.grad_steps, num_checkpoints, gen)
    saved, save_ptr, grad_step = [], 0, 0

    def maybe_save():
        nonlocal save_ptr
        while save_ptr < len(save_at) and save_at[save_ptr] == grad_step:
            saved.append(policy.flat.detach().clone())
            save_ptr += 1

    maybe_save()
    env = gym.make_vec("CartPole-v1", num_envs=runs * e, vectorization_mode="vector_entry_point")
    obs_np, _ = env.reset(seed=seed)
    prev_done = np.zeros(runs * e, dtype=bool)
    finished_returns = [[] for _ in range(runs)]
    episode_return = np.zeros(runs * e)
    T = shape.horizon
    try:
        for _update in range(shape.updates):
            # ---------------------------------------------------------- rollout [T, R, E]
            obs_buf = torch.zeros(T + 1, runs, e, 4)
            act_buf = torch.zeros(T, runs, e, dtype=torch.long)
            logp_buf, rew_buf = torch.zeros(T, runs, e), torch.zeros(T, runs, e)
            done_buf, valid_buf = (torch.zeros(T, runs, e, dtype=torch.bool) for _ in range(2))
            boot_buf = torch.zeros(T, runs, e)  # value of the final obs of truncated episodes
            for t in range(T):
                obs = torch.from_numpy(obs_np).view(runs, e, 4)
                with torch.no_grad():
                    logits = policy(obs)  # [R, E, 2]
                    probs = logits.softmax(-1)
                    a = torch.multinomial(probs.view(-1, 2), 1, generator=gen).view(runs, e)
                    logp = torch.log_softmax(logits, -1).gather(-1, a[..., None])[..., 0]
                obs_buf[t], act_buf[t], logp_buf[t] = obs, a, logp
                valid_buf[t] = torch.from_numpy(~prev_done).view(runs, e)
                obs_np, r, term, trunc, _ = env.step(a.view(-1).numpy())
                episode_return += np.where(prev_done, 0.0, r)
                done = term | trunc
                for i in np.flatnonzero(done & ~prev_done):
                    finished_returns[i // e].append(episode_return[i])
                    episode_return[i] = 0.0
                rew_buf[t] = torch.from_numpy(r.astype(np.float32)).view(runs, e)
                done_buf[t] = torch.from_numpy(done).view(runs, e)
                if trunc.any():
                    with torch.no_grad():
                        v_final = value(torch.from_numpy(obs_np).view(runs, e, 4))[..., 0]
                    boot_buf[t] = torch.where(torch.from_numpy(trunc & ~term).view(runs, e), v_final, 0.0)
                prev_done = done
            obs_buf[T] = torch.from_numpy(obs_np).view(runs, e, 4)

            # ---------------------------------------------------------- GAE
            with torch.no_grad():
                values = value(obs_buf.permute(1, 0, 2, 3).reshape(runs, -1, 4)).view(runs, T + 1, e)
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
                order = torch.randperm(n, generator=gen)
                for k in range(shape.minibatches):
                    idx = order[k * mb : (k + 1) * mb]
                    o, a, old, ad, ret, w = (x[:, idx] for x in (b_obs, b_act, b_logp, b_adv, b_ret, b_valid))
                    count = w.sum(1).clamp_min(1.0)  # [R]
                    mean = (ad * w).sum(1, keepdim=True) / count[:, None]
                    var = ((ad - mean) ** 2 * w).sum(1, keepdim=True) / count[:, None]
                    ad = (ad - mean) / (var.sqrt() + 1e-8)
                    logits = policy(o)  # [R, mb, 2]
                    logp_all = torch.log_softmax(logits, -1)
                    logp = logp_all.gather(-1, a[..., None])[..., 0]
                    ratio = (logp - old).exp()
                    pg = -torch.minimum(ratio * ad, ratio.clamp(1 - clip, 1 + clip) * ad)
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
                    v = value(o)[..., 0]
                    per_sample = pg - ent_c * entropy + v_c * (v - ret) ** 2
                    loss = ((per_sample * w).sum(1) / count).sum()  # runs are independent
                    grads = torch.autograd.grad(loss, params)
                    norm = torch.sqrt(sum(g.pow(2).sum(1) for g in grads))  # [R]
                    scale = (hp["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)[:, None]
                    for opt, g in zip(opts, grads):
                        opt.step(g * scale)
                    grad_step += 1
                    maybe_save()
            if progress is not None:
                progress(grad_step)
    finally:
        env.close()

    per_update = shape.epochs * shape.minibatches
    train_return = torch.tensor([np.mean(r[-10:]) if r else float("nan") for r in finished_returns])
    return PPOResult(
        checkpoints=torch.stack(saved, dim=1),
        steps=save_at.clone(),
        env_steps=(save_at + per_update - 1).div(per_update, rounding_mode="floor") * T * e,
        train_return=train_return,
    )
