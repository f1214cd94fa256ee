"""The control kind: a policy network acting greedily in a gymnasium environment.

A concrete task names its environment and its policy network (logits over discrete actions);
everything else follows from the kind::

    class CartPoleMLP(ControlTask):
        name = "cartpole-mlp"
        env_id = "CartPole-v1"
        def build_model(self):
            return MLP((4, 32, 32, 2), activation=nn.Tanh, flatten=False)

Metric ``return``: the mean undiscounted return of the *greedy* policy (argmax of the logits) over
``episodes`` fixed episodes of at most ``max_steps`` steps. The episodes start from the same
states for every policy (:meth:`ControlTask.episode_starts`: by default reset seeds drawn from
``episode_seed``), so a parameter vector always gets the same return, whatever batch it is
evaluated in. :meth:`ControlTask.validation_data` gives episodes from other starting states
(``validation_episode_seed``), for choices that must not see the evaluation episodes.

Many policies are evaluated at once in one gymnasium vector environment (``B x episodes``
sub-environments). Gymnasium 1.x resets a finished sub-environment on the *next* step; rewards are
therefore counted only until an episode's first ``terminated or truncated``, and the rollout stops
once every episode has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError, EnvironmentStepError
from ..recipes import PPORanges
from .base import Metric, Task

MATCHING_SEED = 2024  # the observations generator training may compare policies on
MATCHING_STATES = 20_000


@dataclass(frozen=True)
class ControlData:
    """What evaluation needs: where the episodes start, and how long they may last."""

    start_states: np.ndarray  # [E] reset seeds, or [E, obs] states for tasks that set states (episode_starts)
    max_steps: int = 500


class ControlTask(Task):
    """A policy (observations -> action logits) evaluated by its greedy return in ``env_id``."""

    kind = "control"
    description = "a policy evaluated by its greedy return"
    env_id: str
    episodes = 10
    episode_seed = 2022
    validation_episode_seed = 2023
    labelling_episode_seed = 2024
    max_steps = 500
    matching_box: Sequence[float] | None = None  # observations output matching may use: uniform in ±box
    metrics = {"return": Metric("return", "max", 500.0, "mean greedy return over fixed episodes")}
    default_metric = "return"
    corpus_ranges: PPORanges | None = None  # None for the kind's defaults
    solved_return: float | None = None  # the mean return at which the environment counts as solved, if it has one
    traced_observation = 0  # which observation entry rollout() traces (the control demo plots it)
    traced_label: str | None = None  # what that entry is (None: "observation <i>")
    traced_limit: float | None = None  # |entry| beyond which an episode ends, drawn by the demo (None: none)

    # ------------------------------------------------------------------ the environment

    def make_env(self, num_envs: int):
        """A gymnasium vector environment of ``num_envs`` copies (the native vectorised one where
        the environment has it)."""
        import gymnasium as gym

        spec = gym.spec(self.env_id)
        mode = "vector_entry_point" if getattr(spec, "vector_entry_point", None) else "sync"
        return gym.make_vec(self.env_id, num_envs=num_envs, vectorization_mode=mode)

    def draw_starts(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` episode starts drawn from ``rng``: ``[n]`` reset seeds. A task that sets start states
        itself returns ``[n, obs]`` states and overrides :meth:`reset_to` (PPO draws each run's
        episodes from the run's own generator with this)."""
        return rng.integers(0, 2**31 - 1, size=n)

    def episode_starts(self, episodes: int, seed: int) -> np.ndarray:
        """Where ``episodes`` fixed episodes start: :meth:`draw_starts` from ``default_rng(seed)``."""
        return self.draw_starts(np.random.default_rng(seed), episodes)

    def reset_to(self, env, starts: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Reset the sub-environments of ``env`` to ``starts`` (one per sub-environment, or one per
        ``True`` entry of the bool ``mask`` ``[N]``, in order; the others are left as they are);
        returns the first observations of the reset ones ``[n, obs]``."""
        if mask is None:
            obs, _ = env.reset(seed=[int(s) for s in starts])
            return np.asarray(obs, dtype=np.float32)
        seeds = np.zeros(len(mask), dtype=np.int64)
        seeds[mask] = starts
        obs, _ = env.reset(seed=[int(s) for s in seeds], options={"reset_mask": np.asarray(mask, dtype=bool)})
        return np.asarray(obs, dtype=np.float32)[mask]

    def load_data(self, root=None, *, download: bool = False) -> ControlData:
        """The fixed evaluation episodes (a control task needs no dataset; ``root`` is ignored)."""
        return ControlData(self.episode_starts(self.episodes, self.episode_seed), self.max_steps)

    def validation_data(self, data: ControlData, holdout: int = 5000) -> ControlData:
        """Episodes from other starting states (``validation_episode_seed``); ``holdout`` does not apply."""
        return ControlData(self.episode_starts(len(data.start_states), self.validation_episode_seed), data.max_steps)

    def labelling_data(self, data: ControlData, holdout: int = 5000, examples: int = 10_000) -> ControlData:
        """Episodes from yet other starting states (``labelling_episode_seed``); ``holdout`` and
        ``examples`` do not apply."""
        return ControlData(self.episode_starts(len(data.start_states), self.labelling_episode_seed), data.max_steps)

    def matching_inputs(self, data: ControlData) -> torch.Tensor:
        """``MATCHING_STATES`` observations uniform in ``±matching_box`` (seed ``MATCHING_SEED``):
        states, not episodes, so no evaluation episode is involved."""
        if self.matching_box is None:
            raise ConfigError(f"task {self.name!r} sets no matching_box (the observations to match policies "
                              "on); set one in the task or train without --output-matching")
        box = np.asarray(self.matching_box, dtype=np.float64)
        rng = np.random.default_rng(MATCHING_SEED)
        return torch.from_numpy(rng.uniform(-box, box, size=(MATCHING_STATES, len(box)))).float()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def rollout(self, flat: torch.Tensor, data: ControlData | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Greedy rollouts of ``B`` policies on the evaluation episodes.

        Returns ``(returns [B, E], trace [T, B, E])``: observation entry ``traced_observation`` at
        every step (CartPole traces the pole's angle), NaN after an episode has ended.
        """
        data = data or self.load_data()
        flat = flat.detach().float().cpu()
        b, e = flat.shape[0], len(data.start_states)
        with torch.device("meta"):  # only the structure: functional_call supplies every parameter
            model = self.build_model()
        params = self.layout().unflatten(flat)

        def policy(p, obs):  # obs [E, D] -> actions [E]
            return torch.func.functional_call(model, p, (obs,)).argmax(-1)

        act = torch.func.vmap(policy)
        env = self.make_env(b * e)
        try:
            obs = self.reset_to(env, np.concatenate([data.start_states] * b))
            alive = np.ones(b * e, dtype=bool)
            returns = np.zeros(b * e)
            trace = []
            for _ in range(data.max_steps):
                if not np.isfinite(obs).all():
                    raise EnvironmentStepError(
                        f"{self.env_id} returned non-finite observations; check the gymnasium installation"
                    )
                trace.append(np.where(alive, obs[:, self.traced_observation], np.nan))
                actions = act(params, torch.from_numpy(obs).view(b, e, -1)).reshape(-1).numpy()
                try:
                    obs, reward, terminated, truncated, _ = env.step(actions)
                except Exception as exc:  # a broken environment must not look like a bad policy
                    raise EnvironmentStepError(f"{self.env_id} failed to step: {exc}") from exc
                obs = np.asarray(obs, dtype=np.float32)
                returns += np.where(alive, reward, 0.0)
                alive &= ~(terminated | truncated)
                if not alive.any():
                    break
        finally:
            env.close()
        return torch.from_numpy(returns).float().view(b, e), np.stack(trace).reshape(-1, b, e)

    def evaluate(self, flat: torch.Tensor, data: ControlData | None = None, metrics: Sequence[str] | None = None):
        """``return`` of many policies ``[B, P]`` at once (greedy, over the fixed episodes)."""
        for m in metrics or self.metrics:
            self.metric(m)
        returns, _ = self.rollout(flat, data)
        return {"return": returns.mean(-1)}
