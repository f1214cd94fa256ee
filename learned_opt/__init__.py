"""learned-opt: train networks with a generative model of neural-network checkpoints."""

__version__ = "0.1.0.dev0"

from . import tasks  # noqa: E402
from .diffusion import Diffusion, DiffusionConfig  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureMismatchError,
    ConfigError,
    DataError,
    DataNotFoundError,
    GenerationError,
    LearnedOptError,
    NonFiniteStepError,
    OptimizerStateError,
    StoreError,
    UnknownTaskError,
    WeightsError,
)
from .generator import PRESETS, Gpt, GptConfig, build_generator  # noqa: E402
from .lopt import LearnedOptimizer  # noqa: E402
from .layout import Layout, Signature, compare_signatures, signature_of  # noqa: E402
from .normalization import Normalization  # noqa: E402
from .optimizer import GenerationReport, GptOptimizer  # noqa: E402
from .pretrained import LoadedGenerator, list_pretrained, load_generator, save_generator  # noqa: E402

__all__ = [
    "PRESETS",
    "ArchitectureMismatchError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "Diffusion",
    "DiffusionConfig",
    "GenerationError",
    "GenerationReport",
    "Gpt",
    "GptConfig",
    "GptOptimizer",
    "Layout",
    "LearnedOptError",
    "LearnedOptimizer",
    "LoadedGenerator",
    "NonFiniteStepError",
    "Normalization",
    "OptimizerStateError",
    "Signature",
    "StoreError",
    "UnknownTaskError",
    "WeightsError",
    "build_generator",
    "compare_signatures",
    "list_pretrained",
    "load_generator",
    "save_generator",
    "signature_of",
    "tasks",
]
