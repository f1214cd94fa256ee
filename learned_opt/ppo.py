"""Single-policy PPO on CartPole: the ``cartpole-mlp`` demo's baseline.

A plain loop on one policy (an ``nn.Module`` and ``torch.optim.Adam``), small enough to read in one
sitting. ``pretrain/ppo.py`` trains hundreds of policies at once for the corpus with the same
algorithm; the runtime package does not depend on it.

Each update collects ``envs x horizon`` environment steps with the stochastic policy from one
gymnasium vector environment, computes GAE advantages with a separate value network (4-64-64-1,
tanh), then takes ``epochs x minibatches`` clipped-surrogate steps (Schulman et al. 2017,
https://arxiv.org/abs/1707.06347). The policy after every update is kept, so its greedy return
can be measured afterwards, all at once, with the task's own evaluation.

Gymnasium 1.x vector environments reset a finished sub-environment on the *next* ``step`` call
("next-step" autoreset): that step ignores the action and returns the new episode's first
observation with reward 0. It is not a transition and is masked out of the loss. The step that
ends an episode returns the episode's final observation, so a truncated episode (500 steps) is
bootstrapped with that observation's value and a terminated one with 0.

Randomness comes from ``seed`` alone (the value network's init, action sampling, minibatch order,
the environments' starting states); the global RNG is not touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, EnvironmentStepError
from .tasks import MLP, Task

__all__ = ["PPOConfig", "PPORun", "train_ppo"]


@dataclass(frozen=True)
class PPOConfig:
    """Hyperparameters of :func:`train_ppo` (CleanRL-like defaults, a higher learning rate)."""

    lr: float = 1e-3  # Adam (eps 1e-5), policy and value network
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    envs: int = 8  # sub-environments
    horizon: int = 128  # steps per sub-environment between updates
    epochs: int = 4  # passes over each rollout
    minibatches: int = 4  # per pass
    value_hidden: int = 64

    @property
    def steps_per_update(self) -> int:
        return self.envs * self.horizon


@dataclass
class PPORun:
    """The policies after each update of one PPO run."""

    env_steps: list[int]  # [K] environment steps seen (0 = the init)
    policies: torch.Tensor  # [K, P] flat policy parameters
    seconds: float  # wall time of the training (rollouts and updates)


def train_ppo(task: Task, init: torch.Tensor, env_steps: int, config: PPOConfig = PPOConfig(), *,
              seed: int = 0) -> PPORun:
    """Train one CartPole policy from the flat ``init`` [P] for about ``env_steps`` environment steps.

    ``env_steps`` is rounded down to whole updates of ``config.envs x config.horizon`` steps (at
    least one). ``init`` is not modified. A vector environment that raises or returns non-finite
    observations raises :class:`EnvironmentStepError`.
    """
    import gymnasium as gym

    if config.horizon * config.envs % config.minibatches:
        raise ConfigError("envs x horizon must be a multiple of minibatches")
    if env_steps < config.steps_per_update:
        raise ConfigError(f"PPO needs at least {config.steps_per_update} environment steps (one update of "
                          f"{config.envs} environments x {config.horizon} steps), got {env_steps}")
    updates = env_steps // config.steps_per_update
    layout = task.layout()
    with torch.random.fork_rng(devices=[]):  # module inits must not touch the caller's RNG
        torch.manual_seed(seed)
        policy = task.build_model()
        value = MLP((4, config.value_hidden, config.value_hidden, 1), nn.Tanh, flatten=False)
    layout.load_into(init.detach().float().clone(), list(policy.parameters()))
    params = list(policy.parameters()) + list(value.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, eps=1e-5)
    rng = torch.Generator().manual_seed(seed)
    E, T = config.envs, config.horizon
    n, mb = E * T, E * T // config.minibatches

    saved, seen = [layout.flatten_module(policy)], [0]
    start = time.perf_counter()
    env = gym.make_vec("CartPole-v1", num_envs=E, vectorization_mode="vector_entry_point")
    try:
        obs_np, _ = env.reset(seed=seed)
        prev_done = np.zeros(E, dtype=bool)
        for _update in range(updates):
            # ---------------------------------------------------------- rollout [T, E]
            obs_buf = torch.zeros(T + 1, E, 4)
            act_buf = torch.zeros(T, E, dtype=torch.long)
            logp_buf, rew_buf = torch.zeros(T, E), torch.zeros(T, E)
            term_buf, done_buf, valid_buf = (torch.zeros(T, E, dtype=torch.bool) for _ in range(3))
            for t in range(T):
                obs = _checked(obs_np)
                with torch.no_grad():
                    logp_all = torch.log_softmax(policy(obs), -1)  # [E, 2]
                    a = torch.multinomial(logp_all.exp(), 1, generator=rng)[:, 0]
                obs_buf[t], act_buf[t], logp_buf[t] = obs, a, logp_all.gather(-1, a[:, None])[:, 0]
                valid_buf[t] = torch.from_numpy(~prev_done)  # the step after an episode's end is a reset
                try:
                    obs_np, r, term, trunc, _ = env.step(a.numpy())
                except Exception as exc:  # a broken environment must not look like a bad policy
                    raise EnvironmentStepError(f"CartPole failed to step: {exc}") from exc
                rew_buf[t] = torch.from_numpy(np.asarray(r, dtype=np.float32))
                term_buf[t], done_buf[t] = torch.from_numpy(term), torch.from_numpy(term | trunc)
                prev_done = term | trunc
            obs_buf[T] = _checked(obs_np)

            # ---------------------------------------------------------- GAE
            with torch.no_grad():
                values = value(obs_buf)[..., 0]  # [T+1, E]
                adv = torch.zeros(T, E)
                last = torch.zeros(E)
                for t in reversed(range(T)):
                    # terminated: no future; truncated: the value of the final observation, which
                    # the done step returned (obs_buf[t + 1]); otherwise V(s_t+1)
                    next_v = values[t + 1] * (~term_buf[t]).float()
                    delta = rew_buf[t] + config.gamma * next_v - values[t]
                    last = delta + config.gamma * config.gae_lambda * (~done_buf[t]).float() * last
                    adv[t] = last
                returns = adv + values[:T]

            # ---------------------------------------------------------- clipped surrogate steps
            b_obs, b_act, b_logp = obs_buf[:T].reshape(n, 4), act_buf.reshape(n), logp_buf.reshape(n)
            b_adv, b_ret, b_valid = adv.reshape(n), returns.reshape(n), valid_buf.reshape(n).float()
            for _epoch in range(config.epochs):
                order = torch.randperm(n, generator=rng)
                for idx in order.split(mb):
                    w = b_valid[idx]
                    count = w.sum().clamp_min(1.0)
                    ad = b_adv[idx]
                    mean = (ad * w).sum() / count
                    std = (((ad - mean) ** 2 * w).sum() / count).sqrt()
                    ad = (ad - mean) / (std + 1e-8)
                    logp_all = torch.log_softmax(policy(b_obs[idx]), -1)  # [mb, 2]
                    ratio = (logp_all.gather(-1, b_act[idx, None])[:, 0] - b_logp[idx]).exp()
                    pg = -torch.minimum(ratio * ad, ratio.clamp(1 - config.clip, 1 + config.clip) * ad)
                    entropy = -(logp_all.exp() * logp_all).sum(-1)
                    v_loss = (value(b_obs[idx])[:, 0] - b_ret[idx]) ** 2
                    per_sample = pg - config.entropy_coef * entropy + config.value_coef * v_loss
                    loss = (per_sample * w).sum() / count
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
            saved.append(layout.flatten_module(policy))
            seen.append(seen[-1] + n)
    finally:
        env.close()
    return PPORun(seen, torch.stack(saved), time.perf_counter() - start)


def _checked(obs: np.ndarray) -> torch.Tensor:
    if not np.isfinite(obs).all():
        raise EnvironmentStepError("CartPole returned non-finite observations; check the gymnasium installation")
    return torch.from_numpy(np.asarray(obs, dtype=np.float32))
