"""A learned optimizer's weights on disk: ``{name}.safetensors`` (the MLP) beside ``{name}.json``.

The manifest says ``"kind": "learned-optimizer"`` (a generator's manifest has no ``kind``), the
MLP's architecture, the feature configuration the weights were meta-trained with, and what they
were meta-trained on, plus the weights file's sha256. Loading checks every field, the file type
and size, the hash, the safetensors header's shapes against the architecture, and finiteness
before a tensor is returned; each problem is one :class:`WeightsError`. The file helpers are the
generators' (:mod:`learned_opt.weightsfile`, :mod:`learned_opt.saving`, :mod:`learned_opt.fileio`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from ..fileio import atomic_write_with_manifest, is_plain_name
from ..jsoncheck import is_int
from ..manifest import MAX_MANIFEST_BYTES
from ..saving import sha256_bytes, sha256_file
from ..weightsfile import check_regular, read_header
from .model import FEATURE_CONFIG, theta_shapes

KIND = "learned-optimizer"
FORMAT_VERSION = 1
SHIPPED = "lopt-mnist-mlp"  # the weights LearnedOptimizer uses when given none
HAND_SET = "hand-set"  # the name of the hand-set Adam-like rule (model.hand_set_theta), never a file
MAX_HIDDEN = 4096  # bounds on what a manifest may ask for, far above any rule this package trains
MAX_LAYERS = 16
META_TRAIN_COMMAND = "learned-opt meta-train --out runs/lopt"


@dataclass
class LoadedRule:
    """The MLP weights of a learned optimizer, with their name, manifest and sha256."""

    name: str
    theta: dict[str, torch.Tensor]
    manifest: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.manifest.get("architecture", {}).get("hidden", ()))

    @cached_property
    def content_sha256(self) -> str:
        """The sha256 of the weights themselves (names and float32 values), whatever file or dict
        they came from: what an optimizer's ``state_dict`` records, so that a state loads wherever
        the same weights do. (``sha256`` is the weights file's, which the manifest checks.)"""
        return _theta_hash(self.theta)


def rule_from_theta(theta: Mapping[str, torch.Tensor], name: str = "in-memory") -> LoadedRule:
    """Wrap in-memory MLP weights (a hand-set rule, a meta-training checkpoint), checked."""
    items = dict(theta).items()
    if not all(isinstance(k, str) for k, _ in items):
        raise WeightsError(f"learned-optimizer weights {name} must map names (w0, b0, ...) to tensors")
    try:  # a copy: the caller may go on changing its tensors in place
        theta = {k: torch.as_tensor(v).detach().to(torch.float32, copy=True) for k, v in items}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"learned-optimizer weights {name} must map names to tensors ({exc})") from None
    n = sum(1 for k in theta if k.startswith("w"))
    ws = [theta[f"w{i}"] for i in range(n) if f"w{i}" in theta]
    hidden = [int(w.shape[1]) for w in ws[:-1]] if len(ws) == n and all(w.dim() == 2 for w in ws) else []
    _check_theta(theta, hidden, name)
    manifest = {"kind": KIND, "name": name, "architecture": {"hidden": hidden}, "features": dict(FEATURE_CONFIG)}
    return LoadedRule(name, theta, manifest, _theta_hash(theta))


def _theta_hash(theta: Mapping[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(theta):
        h.update(k.encode())
        h.update(theta[k].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_theta(theta: Mapping[str, torch.Tensor], hidden, where: str) -> None:
    expected = theta_shapes(hidden)
    got = {k: tuple(v.shape) for k, v in theta.items()}
    if got != expected:
        diffs = [f"{k}: expected {list(s)}, got {list(got.get(k, ())) if k in got else 'missing'}"
                 for k, s in expected.items() if got.get(k) != s]
        diffs += [f"{k}: not part of the rule" for k in got if k not in expected]
        raise WeightsError(f"learned-optimizer weights {where} do not match a per-parameter MLP with hidden "
                           f"layers {list(hidden)}: {'; '.join(diffs[:5])}")
    bad = [k for k, v in theta.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"learned-optimizer weights {where} contain NaN or Inf in {bad}; they are unusable")


def save_rule(out_dir: str | os.PathLike, name: str, theta: Mapping[str, torch.Tensor], *,
              meta_training: Mapping[str, Any]) -> Path:
    """Write ``out_dir/{name}.safetensors`` then ``out_dir/{name}.json`` (each atomically); return the
    manifest's path. ``meta_training`` says what the weights were meta-trained on and for how long."""
    from safetensors.torch import save_file

    from .. import __version__

    if not is_plain_name(name):
        raise WeightsError(f"invalid learned-optimizer name {name!r}: use letters, digits, '-', '_' and '.'")
    rule = rule_from_theta(theta, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in rule.theta.items()}
    manifest = {
        "format_version": FORMAT_VERSION, "kind": KIND, "name": name,
        "architecture": {"type": "per-parameter MLP", "hidden": list(rule.hidden) or rule.manifest["architecture"]["hidden"],
                         "inputs": FEATURE_CONFIG["num_features"], "outputs": ["direction", "log_magnitude"],
                         "activation": "relu"},
        "features": dict(FEATURE_CONFIG),
        "meta_training": dict(meta_training),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
    }
    json.dumps(manifest)  # fails on an unserialisable summary before anything is written
    weights_path, manifest_path = out / f"{name}.safetensors", out / f"{name}.json"
    manifest["weights_file"] = weights_path.name
    atomic_write_with_manifest(
        # one metadata entry: safetensors writes several in no fixed order, and the same weights would
        # then get another file sha256 at each save (the manifest says what kind of file it is)
        weights_path, lambda p: save_file(tensors, str(p), metadata={"name": name}),
        manifest_path, lambda staged: json.dumps({**manifest, "weights_sha256": sha256_file(staged)}, indent=2) + "\n")
    return manifest_path


def check_rule_manifest(text: bytes | str, where: str) -> dict:
    """The learned-optimizer manifest in ``text``, every field loading uses checked."""
    try:
        m = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"manifest {where} is not valid JSON ({str(exc)[:200]}); re-download or re-save it") from None
    if not isinstance(m, dict):
        raise WeightsError(f"manifest {where} is not a JSON object")
    if m.get("kind") != KIND:
        what = "a generator's manifest" if "diffusion_config" in m else f"of kind {m.get('kind')!r}"
        raise WeightsError(f"manifest {where} is {what}, not a learned optimizer's; a generator goes to "
                           f"GptOptimizer(generator=...), LearnedOptimizer takes weights written by learned-opt meta-train")
    if m.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"manifest {where} has format_version {m.get('format_version')!r}; this learned-opt "
                           f"reads learned-optimizer manifests of version {FORMAT_VERSION}")
    hidden = m.get("architecture", {}).get("hidden") if isinstance(m.get("architecture"), dict) else None
    if (not isinstance(hidden, list) or not 1 <= len(hidden) <= MAX_LAYERS
            or not all(is_int(h) and 1 <= h <= MAX_HIDDEN for h in hidden)):
        raise WeightsError(f"manifest {where} has architecture.hidden {hidden!r}; expected 1 to {MAX_LAYERS} widths "
                           f"between 1 and {MAX_HIDDEN}")
    feats = m.get("features")
    if not isinstance(feats, dict) or any(feats.get(k) != v for k, v in FEATURE_CONFIG.items()):
        raise WeightsError(f"manifest {where} was meta-trained with features {feats!r}, this learned-opt computes "
                           f"{FEATURE_CONFIG}; use the release that wrote it")
    for key in ("name", "weights_file", "weights_sha256"):
        if not isinstance(m.get(key), str) or not m[key]:
            raise WeightsError(f"manifest {where} lacks a string {key!r}")
    if "/" in m["weights_file"] or "\\" in m["weights_file"]:
        raise WeightsError(f"manifest {where} names weights file {m['weights_file']!r} outside its folder")
    return m


def rule_kind(text: bytes) -> bool:
    """Whether manifest bytes say ``"kind": "learned-optimizer"`` (False for anything unreadable)."""
    try:
        m = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("kind") == KIND


def rule_listing(m: dict) -> dict:
    """A checked learned-optimizer manifest as a row of :func:`learned_opt.list_pretrained`."""
    hidden = m["architecture"]["hidden"]
    shapes = theta_shapes(hidden)
    meta = m.get("meta_training", {}) if isinstance(m.get("meta_training"), dict) else {}
    return {
        "kind": KIND, "name": m["name"], "task": f"any (meta-trained on {meta.get('tasks', 'unknown tasks')})",
        "metric": None, "metric_direction": None, "best_prompt": None,
        "architecture": {"num_params": sum(math.prod(s) for s in shapes.values()), "num_tensors": len(shapes),
                         "signature": f"per-parameter MLP {'-'.join(map(str, [FEATURE_CONFIG['num_features'], *hidden, 2]))}",
                         "model_config": dict(m["architecture"])},
        "meta_training": meta, "sha256": m["weights_sha256"],
    }


def _weights_dir():
    return resources.files("learned_opt") / "weights"


def _is_rule(entry) -> bool:
    """Whether a shipped manifest is a learned optimizer's (a bounded peek at its ``kind``)."""
    try:
        return rule_kind(entry.read_bytes()[:MAX_MANIFEST_BYTES])
    except OSError:
        return False


def names_a_file(source: str | os.PathLike) -> bool:
    """Whether :func:`load_rule` reads ``source`` as a path (a manifest or weights file, or anything
    with a folder in it) rather than as a registry name."""
    return Path(source).suffix in (".json", ".safetensors") or "/" in str(source) or os.sep in str(source)


def load_rule(source=None) -> LoadedRule:
    """A :class:`LoadedRule` from ``None`` (the shipped weights), a registry name, a manifest or
    weights path, a :class:`LoadedRule`, or a dict of MLP tensors."""
    if isinstance(source, LoadedRule):
        return source
    if isinstance(source, Mapping):
        return rule_from_theta(source)
    if source is None:
        source = SHIPPED
    if source == HAND_SET:
        from .model import hand_set_theta

        return rule_from_theta(hand_set_theta(), HAND_SET)
    if not isinstance(source, (str, os.PathLike)):
        raise WeightsError(f"cannot load learned-optimizer weights from {type(source).__name__}: pass None, "
                           "a registry name, a path to a .json manifest, or a dict of MLP tensors")
    path = Path(source)
    if names_a_file(source):
        manifest_file, folder, where = path.with_suffix(".json"), path.with_suffix(".json").parent, str(path.with_suffix(".json"))
    else:
        folder = _weights_dir()
        manifest_file, where = folder / f"{source}.json", f"{source!r} (shipped)"
        if not manifest_file.is_file():
            known = sorted(e.name[:-5] for e in folder.iterdir() if e.name.endswith(".json") and _is_rule(e))
            raise WeightsError(f"no shipped learned optimizer named {source!r} (shipped: {', '.join(known) or 'none yet'}); "
                               f"meta-train one with `{META_TRAIN_COMMAND}` and pass weights='runs/lopt/lopt.json'")
    check_regular(manifest_file, "manifest", MAX_MANIFEST_BYTES)
    try:
        m = check_rule_manifest(manifest_file.read_bytes(), where)
        weights_file = folder / m["weights_file"]
        check_regular(weights_file, "weights file", 64 * 2**20)
        blob = weights_file.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read learned optimizer {where}: {exc}") from None
    digest = sha256_bytes(blob)
    if digest != m["weights_sha256"]:
        raise WeightsError(f"weights file {m['weights_file']} of {where} has sha256 {digest[:16]}..., the manifest "
                           f"expects {m['weights_sha256'][:16]}...: corrupt, truncated or swapped; re-download or re-save it")
    header = read_header(blob, where)
    expected = theta_shapes(m["architecture"]["hidden"])
    if {k: s for k, (_, s) in header.items()} != expected:
        raise WeightsError(f"weights of {where} hold {sorted(header)} with other shapes than the manifest's "
                           f"architecture {m['architecture']['hidden']}")
    from safetensors.torch import load as load_safetensors

    theta = {k: v.float() for k, v in load_safetensors(blob).items()}
    _check_theta(theta, m["architecture"]["hidden"], where)
    return LoadedRule(m["name"], theta, m, digest)
