"""learned-opt: train networks with a generative model of neural-network checkpoints."""

from . import tasks
from .errors import (
    ArchitectureMismatchError,
    DataNotFoundError,
    GenerationError,
    LearnedOptError,
    StoreError,
    UnknownTaskError,
    WeightsError,
)
from .layout import Layout, Signature, compare_signatures, signature_of
from .optimizer import GenerationReport, GptOptimizer
from .pretrained import list_pretrained, load_generator

__version__ = "0.1.0.dev0"

__all__ = [
    "ArchitectureMismatchError",
    "DataNotFoundError",
    "GenerationError",
    "GenerationReport",
    "GptOptimizer",
    "Layout",
    "LearnedOptError",
    "Signature",
    "StoreError",
    "UnknownTaskError",
    "WeightsError",
    "compare_signatures",
    "list_pretrained",
    "load_generator",
    "signature_of",
    "tasks",
]
