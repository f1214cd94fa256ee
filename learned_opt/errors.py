"""The package's own exception types.

Every error a user can provoke with bad input is a :class:`LearnedOptError`, so a caller can catch
the package's failures in one place, and the command line turns them into a one-line message and a
non-zero exit code instead of a traceback. Messages say what went wrong *and* what to do.
"""

from __future__ import annotations


class LearnedOptError(Exception):
    """Base class of every error raised on purpose by learned-opt."""


class UnknownTaskError(LearnedOptError, KeyError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(LearnedOptError, FileNotFoundError):
    """A dataset is not where the data root says it should be."""


class DataError(LearnedOptError, ValueError):
    """A dataset is where the data root says, but cannot be read: a file damaged, truncated or of
    another split."""


class ArchitectureMismatchError(LearnedOptError, ValueError):
    """A model's parameters do not match an architecture signature."""


class StoreError(LearnedOptError):
    """A checkpoint corpus on disk is missing, corrupt, or written for something else."""


class WeightsError(LearnedOptError):
    """Generator weights or their manifest are missing, corrupt, or of the wrong version."""


class GenerationError(LearnedOptError):
    """A generative update could not be made (invalid sample, metric unavailable, ...)."""


class ConfigError(LearnedOptError, ValueError):
    """A configuration value (generator preset, diffusion schedule, ...) that is invalid or unknown."""


class EnvironmentStepError(LearnedOptError, RuntimeError):
    """A reinforcement-learning environment failed to step or returned invalid observations."""


class OptimizerStateError(LearnedOptError, ValueError):
    """An optimizer ``state_dict`` that does not belong to this optimizer or its generator."""


class NonFiniteStepError(LearnedOptError, FloatingPointError):
    """An optimizer step would write NaN or Inf into parameters or their state (nothing was written)."""


class TrainingError(LearnedOptError):
    """Generator training cannot start, resume or export as asked (another configuration, no checkpoint, ...)."""
