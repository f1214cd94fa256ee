"""What the corpus builder needs from a family of tasks, and what a trained run hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from learned_opt.tasks import Task

from .config import CorpusConfig
from .warm import WarmStart


WEIGHT_LIMIT = 10.0  # G.pt deletes runs with any |w| above this


@dataclass
class FinishedRun:
    """A trained run: its checkpoints, or why it was dropped."""

    plan: Any  # a RunPlan, or another family's plan (run_id, seed, hparams)
    steps: torch.Tensor  # [K] int64
    params: torch.Tensor | None  # [K, P] float32 on CPU; None when dropped
    dropped: str | None = None  # reason
    dropped_at: int | None = None  # step at which the run was found bad
    info: dict = field(default_factory=dict)  # JSON-able extras for the run's record info


def bad_rows(params: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: rows with a non-finite value or any ``|w| > 10``."""
    return ~torch.isfinite(params).all(-1) | (params.abs().amax(-1) > WEIGHT_LIMIT)


# ---------------------------------------------------------------------- task families


class TaskFamily:
    """What the corpus builder needs to know about one family of tasks (see :mod:`pretrain.corpus`).

    ``train(group, on_finish, on_progress)`` (from :meth:`trainer`) trains one group of plans
    together and calls ``on_finish`` with lists of :class:`FinishedRun` (in any order, as runs end)
    and ``on_progress`` with fractions of a run completed.
    """

    name = "?"

    def accepts(self, task: Task) -> bool:
        raise NotImplementedError

    def check(self, config: CorpusConfig) -> None:
        """:class:`LearnedOptError` for options that do not apply or are out of range."""

    def settings(self, config: CorpusConfig) -> dict:
        raise NotImplementedError

    def evaluation_data(self, data: Any, config: CorpusConfig) -> Any:
        """What the saved checkpoints are evaluated on (the task's own data, unless a family cuts it)."""
        return data

    def plan(self, run_ids: Sequence[int], config: CorpusConfig, data: Any) -> list:
        raise NotImplementedError

    def groups(self, plans: list, batch_runs: int) -> list[list]:
        raise NotImplementedError

    def trainer(self, task: Task, config: CorpusConfig, data: Any, device: torch.device,
                start: WarmStart | None = None) -> Callable:
        """``start``: where the runs begin instead of their inits (a :class:`~pretrain.corpus.warm.WarmStart`;
        only families whose :meth:`check` accepts ``--warm-start`` get one)."""
        raise NotImplementedError
