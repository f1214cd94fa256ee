"""``cartpole-mlp``: a CartPole-v1 policy, MLP 4-32-32-2 with tanh (1,282 parameters).

Parameters, in signature order: ``fc1.weight`` [32, 4], ``fc1.bias`` [32], ``fc2.weight`` [32, 32],
``fc2.bias`` [32], ``fc3.weight`` [2, 32], ``fc3.bias`` [2]. The forward takes observations
``[N, 4]`` and returns action logits ``[N, 2]``.

The 10 evaluation episodes start from states drawn once from ``numpy.random.default_rng(2022)``
with CartPole's own reset distribution (uniform in ±0.05), set directly in the environment.
"""

import math

import numpy as np
from torch import nn

from .base import MLP
from .control import ControlTask


class CartPoleMLP(ControlTask):
    name = "cartpole-mlp"
    description = "CartPole-v1 policy, MLP 4-32-32-2 tanh (1,282 parameters), metric greedy return"
    env_id = "CartPole-v1"
    solved_return = 475.0  # CartPole-v1's reward threshold
    traced_observation = 2
    traced_label = "pole angle (rad)"
    traced_limit = 12 * 2 * math.pi / 360  # CartPole-v1 ends an episode beyond ±12° (or at |x| > 2.4)
    # Where CartPole-v1 episodes live: the cart within ±2.4, the pole within ±12° (0.2095 rad) before
    # termination; velocities in the range greedy policies of the corpus reach.
    matching_box = (2.4, 2.0, 0.2095, 2.0)

    def build_model(self) -> MLP:
        return MLP((4, 32, 32, 2), activation=nn.Tanh, flatten=False)

    def draw_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n, 4]`` start states, uniform in ±0.05 as CartPole's reset draws them."""
        return rng.uniform(-0.05, 0.05, size=(n, 4))

    def reset_to(self, env, starts: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        if mask is not None:
            env.unwrapped.state[:, mask] = starts.T
            return starts.astype(np.float32)  # CartPole observes its state
        env.reset(seed=0)
        env.unwrapped.state = starts.T.copy()  # the native vector env keeps states as [4, N]
        return env.unwrapped.state.T.astype(np.float32)  # laid out as the env's own observations
