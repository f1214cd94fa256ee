"""``cartpole-mlp``: a CartPole-v1 policy, MLP 4-32-32-2 with tanh (1,282 parameters).

Parameters, in signature order: ``fc1.weight`` [32, 4], ``fc1.bias`` [32], ``fc2.weight`` [32, 32],
``fc2.bias`` [32], ``fc3.weight`` [2, 32], ``fc3.bias`` [2]. The forward takes observations
``[N, 4]`` and returns action logits ``[N, 2]``.

Metric ``return``: the mean undiscounted return of the *greedy* policy (argmax of the logits) over
``EPISODES`` = 10 episodes of gymnasium's ``CartPole-v1`` (capped at 500 steps). The 10 starting
states are drawn once from ``numpy.random.default_rng(EPISODE_SEED)`` with CartPole's own reset
distribution (uniform in ±0.05), and every policy is evaluated from the same 10 states, so a
parameter vector always gets the same return, whatever batch it is evaluated in.

Many policies are evaluated at once in one gymnasium vector environment (``CartPoleVectorEnv``,
``B x EPISODES`` sub-environments). Gymnasium 1.x resets a finished sub-environment on the *next*
step ("next-step" autoreset); rewards are therefore counted only until an episode's first
``terminated or truncated``, and the rollout stops once every episode has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EnvironmentStepError
from .base import MLP, Metric, Task, batched_forward, permute_mlp

EPISODES = 10
EPISODE_SEED = 2022
VALIDATION_EPISODE_SEED = 2023  # other starting states, for choices that must not see the evaluation episodes
MATCHING_SEED = 2024  # the observations generator training may compare policies on
MATCHING_STATES = 20_000
# Where CartPole-v1 episodes live: the cart within ±2.4, the pole within ±12° (0.2095 rad) before
# termination; velocities in the range greedy policies of the corpus reach.
MATCHING_BOX = np.array([2.4, 2.0, 0.2095, 2.0])
MAX_STEPS = 500


@dataclass(frozen=True)
class CartPoleData:
    """What evaluation needs: the starting states of the evaluation episodes."""

    start_states: np.ndarray  # [EPISODES, 4] float64
    max_steps: int = MAX_STEPS


def evaluation_start_states(episodes: int = EPISODES, seed: int = EPISODE_SEED) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.05, 0.05, size=(episodes, 4))


class CartPoleMLP(Task):
    name = "cartpole-mlp"
    description = "CartPole-v1 policy, MLP 4-32-32-2 tanh (1,282 parameters), metric greedy return"
    metrics = {
        "return": Metric("return", "max", 500.0, f"mean greedy return over {EPISODES} fixed episodes"),
    }
    default_metric = "return"
    sizes = (4, 32, 32, 2)

    def build_model(self) -> MLP:
        return MLP(self.sizes, activation=nn.Tanh, flatten=False)

    def load_data(self, root=None, *, download: bool = False) -> CartPoleData:
        """CartPole needs no dataset: returns the fixed evaluation episodes (``root`` is ignored)."""
        return CartPoleData(evaluation_start_states())

    def validation_data(self, data: CartPoleData, holdout: int = 5000) -> CartPoleData:
        """Evaluation episodes from other starting states (seed ``VALIDATION_EPISODE_SEED``);
        ``holdout`` does not apply."""
        return CartPoleData(evaluation_start_states(len(data.start_states), VALIDATION_EPISODE_SEED), data.max_steps)

    def hidden_sizes(self) -> tuple[int, ...]:
        return self.sizes[1:-1]

    def permute(self, flat: torch.Tensor, perms: Sequence[torch.Tensor]) -> torch.Tensor:
        return permute_mlp(self.layout(), flat, perms)

    def logits(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Action logits of ``B`` policies on observations: ``[B, P]``, ``[N, 4]`` -> ``[B, N, 2]``."""
        with torch.device("meta"):  # only the structure: functional_call supplies every parameter
            model = self.build_model()
        return batched_forward(model, self.layout(), flat, inputs)

    def matching_inputs(self, data: CartPoleData) -> torch.Tensor:
        """``MATCHING_STATES`` observations drawn uniformly from ``±MATCHING_BOX`` (seed
        ``MATCHING_SEED``): states, not episodes, so no evaluation episode is involved."""
        rng = np.random.default_rng(MATCHING_SEED)
        return torch.from_numpy(rng.uniform(-MATCHING_BOX, MATCHING_BOX, size=(MATCHING_STATES, 4))).float()

    @torch.no_grad()
    def rollout(self, flat: torch.Tensor, data: CartPoleData | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Greedy rollouts of ``B`` policies on the evaluation episodes.

        Returns ``(returns [B, E], pole_angles [T, B, E])``; angles after an episode ends are NaN.
        """
        import gymnasium as gym

        data = data or self.load_data()
        flat = flat.detach().float().cpu()
        b, e = flat.shape[0], data.start_states.shape[0]
        with torch.device("meta"):  # only the structure: functional_call supplies every parameter
            model = self.build_model()
        layout = self.layout()
        params = layout.unflatten(flat)

        def policy(p, obs):  # obs [E, 4] -> actions [E]
            return torch.func.functional_call(model, p, (obs,)).argmax(-1)

        act = torch.func.vmap(policy)
        env = gym.make_vec("CartPole-v1", num_envs=b * e, vectorization_mode="vector_entry_point")
        try:
            env.reset(seed=0)
            base = env.unwrapped
            base.state = np.tile(data.start_states, (b, 1)).T.copy()  # [4, B*E]
            obs = base.state.T.astype(np.float32)
            alive = np.ones(b * e, dtype=bool)
            returns = np.zeros(b * e)
            angles = []
            for _ in range(data.max_steps):
                if not np.isfinite(obs).all():
                    raise EnvironmentStepError(
                        "CartPole returned non-finite observations; check the gymnasium installation"
                    )
                angles.append(np.where(alive, obs[:, 2], np.nan))
                actions = act(params, torch.from_numpy(obs).view(b, e, 4)).reshape(-1).numpy()
                try:
                    obs, reward, terminated, truncated, _ = env.step(actions)
                except Exception as exc:  # a broken environment must not look like a bad policy
                    raise EnvironmentStepError(f"CartPole failed to step: {exc}") from exc
                returns += np.where(alive, reward, 0.0)
                alive &= ~(terminated | truncated)
                if not alive.any():
                    break
        finally:
            env.close()
        return torch.from_numpy(returns).float().view(b, e), np.stack(angles).reshape(-1, b, e)

    def evaluate(self, flat: torch.Tensor, data: CartPoleData | None = None, metrics: Sequence[str] | None = None):
        for m in metrics or self.metrics:
            self.metric(m)
        returns, _ = self.rollout(flat, data)
        return {"return": returns.mean(-1)}
