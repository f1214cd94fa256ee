"""Warm-started runs: runs that start from a generator's one update of their initialisation.

A generator trained on runs from random inits sees, late in training, networks that no run of its
corpus passed through: in periodic mode, the networks that descend from its own first update. A
warm-started run starts where such a network starts — θ₀ is the generator's best-prompt update of
the run's seeded init, sampled with the generator's own sampler and the run's own noise stream —
and then trains with its drawn hyperparameters like any other run, so that a generator trained on
the store also learns how those networks go on.

``learned-opt corpus --warm-start GENERATOR --warm-from N`` makes every run with id ≥ N warm;
the store records the generator (name and weights sha256), ``N``, the prompt and the sampler, so
a resume with another generator is refused. A warm run's first checkpoint is its start; with
``--warm-first-checkpoint init`` it is the seeded init instead (the store records that too), so
that the run reads as one jump from a random init to the generator's update and training on from
there: pairs from the init then teach a generator to reach in one update where its own update
and a whole training run after it end. A store of plain runs can take warm-started runs
after its last run id (``--warm-from`` past it); see :func:`~pretrain.corpus.build.accept_settings`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from learned_opt.errors import ConfigError
from learned_opt.pretrained import LoadedGenerator, load_generator
from learned_opt.seeding import stream
from learned_opt.tasks import Task

from .config import WARM_FIRST

WARM_STREAM = 3  # a run's RNG stream for its warm start's sampling noise (1: checkpoint steps, 2: data order)


class WarmStart:
    """θ₀ of the runs with id ≥ ``from_run``: ``generator``'s best-prompt update of their init.

    Called as ``start(params, plans)`` with the runs' inits ``[R, P]`` and their plans; returns
    the starts ``[R, P]`` (rows of runs below ``from_run`` unchanged). The init's metric, which
    the generator is conditioned on, is the task's evaluation on ``eval_data`` (the data the
    store's metrics are measured on).
    """

    def __init__(self, generator: LoadedGenerator, task: Task, from_run: int, eval_data: Any = None,
                 first_checkpoint: str = "start"):
        if generator.layout.signature != task.signature:
            raise ConfigError(f"--warm-start {generator.name!r} generates parameters of another shape than task "
                              f"{task.name!r}'s model: pass a generator trained on a {task.name} corpus")
        if from_run < 0:
            raise ConfigError(f"--warm-from must be a run id >= 0, got {from_run}")
        if first_checkpoint not in WARM_FIRST:
            raise ConfigError(f"a warm run's first checkpoint is its 'start' or its 'init', got {first_checkpoint!r}")
        self.generator, self.task, self.from_run, self.eval_data = generator, task, int(from_run), eval_data
        self.first_checkpoint = first_checkpoint

    @classmethod
    def load(cls, source: str, task: Task, from_run: int, eval_data: Any = None, device: str | None = None,
             first_checkpoint: str = "start") -> "WarmStart":
        return cls(load_generator(source, device=device), task, from_run, eval_data, first_checkpoint)

    @property
    def prompt(self) -> float:
        """The generator's best prompt, within its metric range."""
        lo, hi = self.generator.metric_range
        return min(max(self.generator.best_prompt, lo), hi)

    def settings(self) -> dict:
        """What the store records: which runs start warm, from which generator, prompted how."""
        gen = self.generator
        first = {} if self.first_checkpoint == "start" else {"first_checkpoint": self.first_checkpoint}
        return {"from_run": self.from_run, "generator": gen.name, "sha256": gen.sha256,
                "prompt": self.prompt, "sampler": dict(gen.sampling), **first}

    def first_checkpoints(self, inits: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """What the runs' first checkpoints hold ``[R, P]``: their ``starts`` (this object's output for
        ``inits``), or with ``first_checkpoint="init"`` the ``inits`` themselves."""
        return inits if self.first_checkpoint == "init" else starts

    def __call__(self, params: torch.Tensor, plans: Sequence[Any]) -> torch.Tensor:
        rows = [i for i, p in enumerate(plans) if p.run_id >= self.from_run]
        if not rows:
            return params
        gen = self.generator
        inits = params[rows].to(gen.device, torch.float32)
        with torch.random.fork_rng(devices=[]):  # an evaluation that builds modules leaves the caller's RNG alone
            metric = self.task.evaluate(inits, self.eval_data)[gen.metric_name].float()
        prompt = torch.full((1,), self.prompt, device=gen.device)
        out = params.clone()
        for k, i in enumerate(rows):  # one sample per run, from the run's own noise: a start never depends on its batch
            noise = stream(plans[i].seed, WARM_STREAM)
            out[i] = gen.sample(inits[k : k + 1], metric[k : k + 1], prompt, generator=noise)[0].to(params)
        return out
