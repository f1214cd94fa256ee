"""Checks of command-line values that several commands share: ``--device``, ``--seed``, ``--out``,
plots.

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

__all__ = ["SEED_LIMIT", "DeprecatedAlias", "parse_device", "check_seed", "check_out_dir", "check_export_target",
           "check_plots"]

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


def check_export_target(out: str | os.PathLike, name: str, *, own: bool, source=None) -> None:
    """Refuse, before any work, to write ``NAME.json`` (and its weights) into ``out`` over weights
    that this job did not write: ``own`` says whether one there is this job's (a resumed job's
    earlier export), and ``source`` is a manifest the job starts from, which is never replaced."""
    target = Path(out) / f"{name}.json"
    if source is not None and Path(source).resolve() == target.resolve():
        raise ConfigError(f"{target} is what this job starts from, and its export would replace it: choose "
                          f"another --out (or --name)")
    if own:
        return
    if target.exists():
        raise ConfigError(f"{target} holds weights that this job did not write, and its export would replace "
                          f"them: choose another --out (or --name)")
    weights = target.with_suffix(".safetensors")
    if weights.exists():
        raise ConfigError(f"{weights} is there without its manifest, and this job's export would replace it: "
                          f"move it aside, or choose another --out (or --name)")


def check_out_dir(path: str | os.PathLike, *, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that exists as something other than a folder (or
    lies under a file) or cannot be written (nor made, in the folder above it), and an empty name
    (which would write into the current folder)."""
    if not os.fspath(path).strip():
        raise ConfigError(f"{option} is empty: name a folder to write into (e.g. {option} runs/out)")
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "exists and is not a folder" if p == path else f"lies under {p}, which is not a folder"
                raise ConfigError(f"{option} {path} {where}: choose a folder to write into")
            if not os.access(p, os.W_OK | os.X_OK):
                where = "" if p == path else f" (nor can it be made in {p})"
                raise ConfigError(f"{option} {path} cannot be written{where}: choose a folder you can write into, "
                                  f"or fix its permissions")
            return


def check_plots(wanted: bool, option: str = "--no-plots") -> None:
    """Refuse, before any work, a command that will draw PNGs where matplotlib is not installed
    (it is in the ``dev`` extra, not the runtime package): the results would be lost to an
    ImportError after the whole run."""
    if not wanted:
        return
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        found = False
    if not found:
        raise ConfigError(f"the plots need matplotlib, which is not installed: pip install matplotlib "
                          f"(or 'learned-opt[dev]'), or pass {option}")
