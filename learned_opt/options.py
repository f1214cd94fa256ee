"""Checks of command-line values that several commands share: ``--device``, ``--seed``, ``--out``.

Each raises :class:`~learned_opt.errors.ConfigError` with a message naming the option, so the
command line prints one line instead of the traceback torch or the file system would give, and
does so before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["SEED_LIMIT", "DeprecatedAlias", "parse_device", "check_seed", "check_out_dir"]

SEED_LIMIT = 2**63  # seeds (and seed + i for the i-th run or init) must lie in [0, SEED_LIMIT): torch's int64


class DeprecatedAlias(argparse.Action):
    """An option's old spelling, hidden from --help: stores into the new option's ``dest`` and says
    on stderr which name to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"{parser.prog}: {option_string} is deprecated here; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def parse_device(spec: str, *, local_rank: int = 0, option: str = "--device") -> torch.device:
    """The device ``spec`` names: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (``cuda:LOCAL_RANK`` when
    CUDA is there, else ``cpu``); plain ``cuda`` means this process's own GPU, ``cuda:local_rank``.

    Refuses other device types (``meta``, ``mps``, ...), CUDA where there is none and a GPU index
    this machine does not have."""
    if spec == "auto":
        spec = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown {option} {spec!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option} {spec!r} is not supported: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {spec} asked for, but CUDA is not available here: use {option} cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {spec}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"numbered from 0")
    return dev


def check_seed(seed: int, count: int = 1, *, option: str = "--seed") -> None:
    """Refuse a seed for which ``seed .. seed + count - 1`` (one per run or init) is not a valid torch seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed + max(count, 1) > SEED_LIMIT:
        span = f" (it seeds {count:,} runs or inits, {option} to {option} + {count - 1:,}, all below 2**63)" if count > 1 else ""
        raise ConfigError(f"{option} must be an integer from 0 to {SEED_LIMIT - max(count, 1):,}{span}, got {seed!r}")


def check_out_dir(path: str | os.PathLike, *, option: str = "--out") -> None:
    """Refuse an output folder that exists as something other than a folder (or lies under a file)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "exists and is not a folder" if p == path else f"lies under {p}, which is not a folder"
                raise ConfigError(f"{option} {path} {where}: choose a folder to write into")
            return
