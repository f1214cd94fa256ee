"""A second control task, defined outside the package: Acrobot-v1 (6 observations, 3 actions)."""

import gymnasium as gym
from torch import nn

from learned_opt.recipes import PPORanges
from learned_opt.tasks import MLP, ControlTask, Metric


class AcrobotMLP(ControlTask):
    name = "acrobot-mlp-test"
    env_id = "Acrobot-v1"
    episodes, max_steps = 3, 40  # short evaluations keep the tests fast
    metrics = {"return": Metric("return", "max", 0.0, "mean greedy return over fixed episodes")}
    corpus_ranges = PPORanges(lr=(1e-3, 2e-3), env_steps=(1024,))

    def build_model(self) -> MLP:
        return MLP((6, 16, 3), activation=nn.Tanh, flatten=False)

    def make_env(self, num_envs: int):
        # episodes truncated after 20 steps, so PPO's rollouts see episode ends and resets
        return gym.make_vec(self.env_id, num_envs=num_envs, vectorization_mode="sync", max_episode_steps=20)
