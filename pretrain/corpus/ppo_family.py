"""The corpus builder's family of control tasks: policies of any ControlTask trained by batched PPO.

A control corpus (``learned-opt corpus --task cartpole-mlp``, or any task of kind ``control``;
:class:`PPOFamily`) draws each run's hyperparameters with ``random.Random(seed)`` from the task's
``corpus_ranges``, else :class:`~learned_opt.recipes.PPORanges` (the defaults below):

==================  =========================================================================
hyperparameter      range
==================  =========================================================================
lr                  log-uniform [1e-4, 3e-3] (Adam, eps 1e-5, policy and value net;
                    ``--lr-range LOW HIGH`` sets the interval)
gamma               uniform [0.97, 0.999]
gae_lambda          uniform [0.9, 0.99]
clip                uniform [0.1, 0.3]
entropy_coef        0 with probability 0.5, else log-uniform [1e-4, 1e-2]
env_steps           one of 25,000 / 50,000 / 100,000 per run (``--env-steps N`` sets every
                    run's), rounded down to whole updates of ``envs x horizon`` steps
value_coef          0.5 (fixed); max_grad_norm 0.5 (fixed)
==================  =========================================================================

The step structure (:class:`PPOShape`: 8 environments x 128 steps per update, 4 epochs of 4
minibatches) is fixed per corpus, recorded in the store's settings and in every run's hparams, so
runs with the same ``env_steps`` train together in one batch. A stored run's ``steps`` are
gradient steps; the environment steps its checkpoints had seen are ``info["env_steps"]`` (a
list of ``K`` ints; also ``ceil(step / (ppo_epochs * minibatches)) * envs * horizon``). Its metric
``return`` is the task's greedy return over its fixed evaluation episodes.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from learned_opt import tasks
from learned_opt.baselines.ppo import PPOHparams, PPOShape, train_ppo
from learned_opt.errors import LearnedOptError
from learned_opt.recipes import PPO_ADAM_EPS, PPORanges
from learned_opt.tasks import Task

from ..seeding import log_uniform, seeded_init
from .family import FinishedRun, TaskFamily, bad_rows


CORPUS_SHAPE = PPOShape()  # recipes.PPO_STEPS: 8 environments x 128 steps, 4 epochs of 4 minibatches; total_steps is per run
_SHAPE_KEYS = ("envs", "horizon", "epochs", "minibatches", "value_hidden")
_SHAPE_HPARAMS = {"envs": "envs", "horizon": "horizon", "epochs": "ppo_epochs", "minibatches": "minibatches",
                  "value_hidden": "value_hidden"}  # PPOShape field -> hparams key (not "epochs": that is MNIST's)


def sample_ppo_hparams(
    seed: int, ranges: PPORanges = PPORanges(), *, env_steps: int | None = None, shape: PPOShape = CORPUS_SHAPE
) -> dict:
    """The hyperparameters of the control corpus run with this seed (same seed, same result)."""
    rng = random.Random(seed)
    # every value is drawn in a fixed order, so one setting never shifts the others
    u_lr, gamma, lam, clip = rng.random(), rng.uniform(*ranges.gamma), rng.uniform(*ranges.gae_lambda), rng.uniform(*ranges.clip)
    no_ent, u_ent = rng.random() < ranges.p_no_entropy, rng.random()
    steps = rng.choice(ranges.env_steps)
    return {
        "algorithm": "ppo",
        "lr": log_uniform(*ranges.lr, u_lr),
        "gamma": gamma,
        "gae_lambda": lam,
        "clip": clip,
        "entropy_coef": 0.0 if no_ent else log_uniform(*ranges.entropy_coef, u_ent),
        "value_coef": ranges.value_coef,
        "max_grad_norm": ranges.max_grad_norm,
        "env_steps": int(steps if env_steps is None else env_steps),
        **{_SHAPE_HPARAMS[k]: getattr(shape, k) for k in _SHAPE_KEYS},
        "adam_eps": PPO_ADAM_EPS,
    }


@dataclass
class PPORunPlan:
    """Everything that defines one control corpus run before it is trained."""

    run_id: int
    seed: int
    hparams: dict
    num_checkpoints: int = 200

    @property
    def shape(self) -> PPOShape:
        return PPOShape(total_steps=self.hparams["env_steps"], **{k: self.hparams[_SHAPE_HPARAMS[k]] for k in _SHAPE_KEYS})

    @property
    def total_steps(self) -> int:
        """Gradient steps of the run."""
        return self.shape.grad_steps

    def init(self, task: Task) -> torch.Tensor:
        """The initial flat parameters ``[P]``: ``torch.manual_seed(seed); task.build_model()``."""
        return seeded_init(task, self.seed)


def train_ppo_runs(task: Task, plans: Sequence[PPORunPlan], on_finish: Callable[[list], None],
                   on_progress: Callable[[float], None] = lambda runs: None) -> None:
    """Train ``plans`` (one step structure) together with :func:`train_ppo`; hand over finished runs.

    A run with a non-finite checkpoint or any ``|w| > 10`` is dropped (``dropped_at``: the first such
    checkpoint's step). Kept runs carry ``info["env_steps"]`` ([K] ints).
    """
    if not plans:
        return
    shape = plans[0].shape
    if any(p.shape != shape for p in plans):
        raise ValueError("runs trained together must share their step structure and environment steps")
    keys = [k for k in vars(PPOHparams()) if k in plans[0].hparams]
    hp = PPOHparams(**{k: [float(p.hparams[k]) for p in plans] for k in keys})
    done = 0

    def progress(grad_step: int) -> None:
        nonlocal done
        on_progress(len(plans) * (grad_step - done) / shape.grad_steps)
        done = grad_step

    init = torch.stack([p.init(task) for p in plans])
    res = train_ppo(task, init, hp, shape, num_checkpoints=plans[0].num_checkpoints,
                    run_seeds=[p.seed for p in plans], progress=progress)
    finished = []
    for i, p in enumerate(plans):
        ck, steps = res.checkpoints[i], res.steps[i]
        bad = bad_rows(ck)
        if bool(bad.any()):
            first = int(steps[bad.nonzero()[0, 0]])
            finished.append(FinishedRun(p, steps, None, "non-finite or |w| > 10", first))
        else:
            finished.append(FinishedRun(p, steps, ck, info={"env_steps": res.env_steps[i].tolist()}))
    on_finish(finished)


class PPOFamily(TaskFamily):
    """The corpus builder's family of control tasks (see :class:`pretrain.corpus.TaskFamily`)."""

    name = "control policies"

    def accepts(self, task: Task) -> bool:
        return task.kind == "control"

    def check(self, config) -> None:
        name = tasks.get(config.task).name
        for flag, value in (("--epochs", config.epochs), ("--train-examples", config.train_examples),
                            ("--eval-examples", config.eval_examples)):
            if value is not None:
                raise LearnedOptError(f"{flag} applies to classifier corpora; use --env-steps for {name}")
        if config.gpt_recipe:
            raise LearnedOptError(f"--gpt-recipe applies to classifier corpora, not to {name}")
        if config.eval_on != "test":
            raise LearnedOptError(f"--eval-on applies to classifier corpora; {name}'s return is measured on fixed episodes")
        if config.warm_start is not None:
            raise LearnedOptError(f"--warm-start applies to classifier corpora; {name}'s runs start from their inits")
        if config.init_scale is not None:
            raise LearnedOptError(f"--init-scale applies to classifier corpora; {name}'s runs start from the task's inits")
        shape = self.shape(config)
        if config.env_steps is not None and config.env_steps < shape.envs * shape.horizon:
            raise LearnedOptError(
                f"--env-steps must be >= {shape.envs * shape.horizon} (one update of {shape.envs} environments "
                f"x {shape.horizon} steps), got {config.env_steps}"
            )
        try:
            device = torch.device(config.device)
        except (RuntimeError, TypeError):
            raise LearnedOptError(f"unknown --device {config.device!r}: {name} corpora train on the CPU; use --device "
                                  f"cpu or auto") from None
        if device.type != "cpu":
            raise LearnedOptError(f"{name} corpora train on the CPU (gymnasium environments step in NumPy); "
                                  "drop --device")

    @staticmethod
    def shape(config) -> PPOShape:
        return config.ppo_shape or CORPUS_SHAPE

    @staticmethod
    def ranges(config) -> PPORanges:
        """``--lr-range``'s ranges, else the task's ``corpus_ranges``, else the defaults."""
        return config.ppo_ranges or tasks.get(config.task).corpus_ranges or PPORanges()

    def settings(self, config) -> dict:
        shape = self.shape(config)
        return {
            "seed": config.seed,
            "env_steps": config.env_steps,
            "checkpoints": config.checkpoints,
            "ppo_shape": {k: getattr(shape, k) for k in _SHAPE_KEYS},
            "ranges": json.loads(json.dumps(asdict(self.ranges(config)))),
        }

    def plan(self, run_ids, config, data) -> list[PPORunPlan]:
        ranges, shape = self.ranges(config), self.shape(config)
        return [
            PPORunPlan(r, config.seed + r, sample_ppo_hparams(config.seed + r, ranges, env_steps=config.env_steps,
                                                              shape=shape), config.checkpoints)
            for r in run_ids
        ]

    def groups(self, plans: list[PPORunPlan], batch_runs: int) -> list[list[PPORunPlan]]:
        """Runs grouped by environment steps (so their updates align), cut into ``batch_runs``."""
        by_steps: dict[int, list[PPORunPlan]] = {}
        for p in plans:
            by_steps.setdefault(p.hparams["env_steps"], []).append(p)
        out = []
        for _, group in sorted(by_steps.items()):
            group.sort(key=lambda p: p.run_id)
            out.extend(group[i : i + batch_runs] for i in range(0, len(group), batch_runs))
        return out

    def trainer(self, task: Task, config, data, device, start=None) -> Callable:
        return lambda group, on_finish, on_progress: train_ppo_runs(task, group, on_finish, on_progress)
