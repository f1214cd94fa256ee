"""Writing a generator: its manifest (``build_manifest``) and the manifest + safetensors pair
(``save_generator``), each file written atomically; the sha256 helpers both sides use."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import ArchitectureMismatchError, WeightsError
from .fileio import atomic_write_with_manifest, is_plain_name
from .layout import Layout, signature_to_json
from .manifest import MANIFEST_FORMAT_VERSION
from .normalization import Normalization
from .symmetry import chain_symmetry

if TYPE_CHECKING:
    from .diffusion import DiffusionConfig
    from .generator import Gpt


# ---------------------------------------------------------------------- small helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_json(manifest: Mapping) -> str:
    """The manifest as indented JSON; paths and tensor/numpy scalars become plain values.

    A fine-tune's lineage (``training.init_from``: its source's record, which holds its own source's,
    one level deeper per generation) is written on one line, so that indentation does not grow the
    file with every fine-tune of a fine-tune; the JSON is the same either way."""

    def plain(value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if hasattr(value, "item") and callable(value.item):  # numpy scalars
            return value.item()
        if isinstance(value, (set, frozenset, tuple)):
            return list(value)
        raise TypeError(
            f"cannot write {type(value).__name__} into a generator manifest; pass JSON-able "
            f"corpus/training/extra summaries (numbers, strings, lists, dicts)"
        )

    training = manifest.get("training")
    if not isinstance(training, Mapping) or training.get("init_from") is None:
        return json.dumps(manifest, indent=2, default=plain) + "\n"
    mark = "\u0000lineage\u0000"  # a string no manifest holds, replaced by the lineage's one-line JSON
    text = json.dumps({**manifest, "training": {**training, "init_from": mark}}, indent=2, default=plain)
    return text.replace(json.dumps(mark), json.dumps(training["init_from"], default=plain), 1) + "\n"


def _package_version() -> str:
    from . import __version__  # lazy: the package imports this module while initialising

    return __version__


# ---------------------------------------------------------------------- writing


def build_manifest(
    name: str,
    model: "Gpt",
    diffusion: "DiffusionConfig",
    normalization: Normalization,
    *,
    task: str,
    metric: str,
    best_prompt: float,
    corpus: Mapping | None = None,
    training: Mapping | None = None,
    extra: Mapping | None = None,
    metric_direction: str | None = None,
    input_normalization: Mapping | None = None,
    sampling: Mapping | None = None,
    metric_range: tuple[float, float] | None = None,
) -> dict:
    """The manifest of a generator, without the weights' file name and hash.

    ``metric_range`` (the prompts it may be given) defaults to the normalisation's ``[lo, hi]``.

    ``metric_direction`` defaults to the registered task's metric direction; ``input_normalization``
    (``{"mean": [...], "std": [...]}``, a supervised task's) is how the corpus's inputs were prepared;
    ``sampling`` is the sampler entry that ``tune-sampling`` chose, carried over to a derived generator.
    """
    if metric_direction is None:
        from . import tasks

        metric_direction = tasks.get(task).metric(metric).direction
    if metric_direction not in ("min", "max"):
        raise ValueError(f"metric_direction must be 'min' or 'max', got {metric_direction!r}")
    layout: Layout = model.layout
    manifest = {
        "format_version": 1 if layout.scheme == "chunk" else MANIFEST_FORMAT_VERSION,
        "name": name,
        "task": task,
        "signature": signature_to_json(layout.signature),
        "num_params": layout.num_params,
        "metric": metric,
        "metric_direction": metric_direction,
        "metric_range": [float(v) for v in (metric_range or (normalization.metric_lo, normalization.metric_hi))],
        "best_prompt": float(best_prompt),
        "normalization": normalization.to_dict(),
        "tokenisation": tokenisation(layout),
        "model_config": asdict(model.config),
        "diffusion_config": asdict(diffusion) if is_dataclass(diffusion) else dict(diffusion),
        "corpus": dict(corpus or {}),
        "training": dict(training or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
    }
    if input_normalization is not None:
        manifest["input_normalization"] = {k: [float(v) for v in input_normalization[k]] for k in ("mean", "std")}
    if extra:
        manifest["extra"] = dict(extra)
    if sampling:
        manifest["sampling"] = dict(sampling)
    return manifest


def tokenisation(layout: Layout) -> dict:
    """The manifest's ``tokenisation``: the scheme, and for neuron tokens a unit symmetry that is not
    the one derived from the signature (a chain of layers derives its own)."""
    tok: dict[str, Any] = {"scheme": layout.scheme, "chunk_size": layout.chunk_size, "num_tokens": layout.num_tokens}
    if layout.symmetry is not None:
        try:
            derived = chain_symmetry(layout.signature)
        except ArchitectureMismatchError:  # declared by hand: not a chain of layers
            derived = None
        if layout.symmetry != derived:
            tok["symmetry"] = layout.symmetry.to_json()
    return tok


def save_generator(
    out_dir: str | os.PathLike,
    name: str,
    model: "Gpt",
    diffusion: "DiffusionConfig",
    normalization: Normalization,
    **fields: Any,
) -> Path:
    """Write ``out_dir/{name}.safetensors`` and ``out_dir/{name}.json``; return the manifest's path.

    ``fields`` are :func:`build_manifest`'s keyword arguments (``task``, ``metric``, ``best_prompt``,
    ``corpus``, ``training``, ...). Each file is written atomically (temporary file +
    ``os.replace``), the weights first, so a manifest on disk always describes a complete weights
    file.
    """
    from safetensors.torch import save_file

    if not is_plain_name(name):
        raise ValueError(f"invalid generator name {name!r}: use letters, digits, '-', '_' and '.'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(name, model, diffusion, normalization, **fields)
    # Own, contiguous fp32 copies: safetensors refuses shared storage and non-contiguous tensors.
    tensors = {k: v.detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"refusing to save generator {name!r}: non-finite values in {bad[:5]}")
    weights_path, manifest_path = out / f"{name}.safetensors", out / f"{name}.json"
    manifest_json(manifest)  # fail on an unserialisable summary before anything is written
    manifest["weights_file"] = weights_path.name
    atomic_write_with_manifest(weights_path, lambda p: save_file(tensors, str(p), metadata={"name": name}),
                               manifest_path, lambda staged: manifest_json({**manifest, "weights_sha256": sha256_file(staged)}))
    return manifest_path
