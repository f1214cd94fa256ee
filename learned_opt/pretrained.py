"""Generator weights on disk: the manifest, the sha256 check, safetensors loading, the registry.

A generator is two files side by side:

* ``{name}.safetensors`` — the transformer's ``state_dict`` (fp32, contiguous); never pickle;
* ``{name}.json`` — the manifest: format version, task, architecture signature, metric and its
  range, normalisation, tokenisation, model and diffusion config, corpus and training summary,
  and the sha256 of the weights file.

``load_generator`` reads the manifest and checks every field (:mod:`learned_opt.manifest`),
compares the weights file's header with what the manifest implies, hashes the weights file and
only then parses it (:mod:`learned_opt.weightsfile`), so a corrupt, truncated, swapped or hostile
file raises :class:`WeightsError` before any large tensor is built. Generators shipped with the package live in ``learned_opt/weights/`` and are
found through ``importlib.resources``, so they load from an installed wheel as from a checkout.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import ConfigError, WeightsError
from .guidance import tapered_scale
from .layout import Layout, signature_from_json
from .lopt.weights import check_rule_manifest, rule_kind, rule_listing
from .manifest import (
    DEFAULT_SAMPLING,
    MANIFEST_FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
    READABLE_FORMAT_VERSIONS,
    REQUIRED_KEYS,
    SAMPLING_KEYS,
    read_manifest,
    sampler_settings,
    sampling_from_manifest,
)
from .normalization import Normalization
from .saving import build_manifest, save_generator, sha256_bytes, sha256_file
from .symmetry import Symmetry
from .weightsfile import MAX_WEIGHTS_BYTES, check_header, check_regular, compare_shapes, read_header

__all__ = [  # the manifest's constants and the writers are re-exported: they were defined here before
    "DEFAULT_SAMPLING", "MANIFEST_FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "REQUIRED_KEYS", "SAMPLING_KEYS",
    "LoadedGenerator", "build_manifest", "list_pretrained", "load_generator", "sampling_from_manifest",
    "save_generator", "sha256_bytes", "sha256_file",
]

if TYPE_CHECKING:  # imported lazily at run time: keeps this module importable on its own
    from .diffusion import Diffusion, DiffusionConfig
    from .generator import Gpt


def _weights_dir():
    """The shipped weights folder inside the installed package (a Traversable)."""
    return resources.files("learned_opt") / "weights"


# ---------------------------------------------------------------------- the loaded generator


class LoadedGenerator:
    """A generator ready to sample: the model, its diffusion, its units and its manifest.

    ``sample`` takes and returns raw units (the model's own parameter values and metric values);
    the normalisation to the generator's units happens inside.
    """

    def __init__(
        self,
        name: str,
        manifest: Mapping[str, Any],
        model: "Gpt",
        diffusion: "Diffusion",
        normalization: Normalization,
        sha256: str,
    ):
        self.name = name
        self.manifest = dict(manifest)
        self.model = model
        self.layout: Layout = model.layout
        self.diffusion = diffusion
        self.normalization = normalization
        self.sha256 = sha256
        self.task: str = self.manifest.get("task", "")
        self.metric_name: str = self.manifest["metric"]
        self.metric_direction: str = self.manifest.get("metric_direction", "min")
        self.best_prompt = float(self.manifest["best_prompt"])
        # {"mean": [...], "std": [...]} per input channel, or None (a control task, an older manifest)
        self.input_normalization: dict | None = self.manifest.get("input_normalization")
        self.sampling: dict[str, Any] = sampling_from_manifest(self.manifest, diffusion.num_steps)
        lo, hi = self.manifest.get("metric_range", (normalization.metric_lo, normalization.metric_hi))
        self.metric_range: tuple[float, float] = (float(lo), float(hi))

    @classmethod
    def from_model(
        cls,
        model: "Gpt",
        diffusion: "DiffusionConfig",
        normalization: Normalization,
        *,
        name: str = "in-memory",
        task: str,
        metric: str,
        best_prompt: float,
        metric_direction: str | None = None,
    ) -> "LoadedGenerator":
        """Wrap an in-memory model (a generator being trained, a test's tiny one) without files.

        Its ``sha256`` is the hash of its current weights, so optimizer states can still tell
        generators apart.
        """
        from .diffusion import Diffusion

        manifest = build_manifest(
            name, model, diffusion, normalization,
            task=task, metric=metric, best_prompt=best_prompt, metric_direction=metric_direction,
        )
        h = hashlib.sha256()
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return cls(name, manifest, model, Diffusion(diffusion), normalization, h.hexdigest())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "LoadedGenerator":
        """Move the model to ``device`` (in place) and return ``self``."""
        self.model.to(device)
        return self

    @property
    def supports_guidance(self) -> bool:
        """Whether the model was trained with prompt dropout (``GptConfig.null_prompt``), so that
        it can sample with classifier-free guidance other than 1."""
        return bool(self.model.config.null_prompt)

    @property
    def has_property_head(self) -> bool:
        """Whether the model predicts the metric of a network (``GptConfig.property_head``)."""
        return bool(self.model.config.property_head)

    def sampler(self, method: str | None = None, steps: int | None = None, t_min: int | None = None,
                guidance: float | None = None, temperature: float | None = None,
                guidance_taper: bool | None = None) -> dict[str, Any]:
        """This generator's :attr:`sampling` with the given settings on top, key by key (None keeps
        the generator's); :class:`ConfigError` if they cannot run on its noise schedule, if a
        guidance other than 1 is asked of a generator trained without prompt dropout, if a
        temperature is not a number >= 0, or if ``guidance_taper`` is not True, False or None."""
        return sampler_settings(self.sampling, self.diffusion.num_steps, self.name, self.supports_guidance,
                                method=method, steps=steps, t_min=t_min, guidance=guidance, temperature=temperature,
                                guidance_taper=guidance_taper)

    @torch.no_grad()
    def sample(
        self,
        theta: torch.Tensor,
        metric: torch.Tensor,
        prompt: torch.Tensor,
        *,
        steps: int | None = None,
        method: str | None = None,
        t_min: int | None = None,
        guidance: float | None = None,
        temperature: float | None = None,
        guidance_taper: bool | None = None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """θ′ for parameters ``theta`` [B, P] at ``metric`` [B], prompted with ``prompt`` [B].

        ``steps``, ``method``, ``t_min``, ``guidance`` and ``temperature`` (see
        :meth:`~learned_opt.diffusion.Diffusion.sample`) and ``guidance_taper`` (the guidance scaled
        down for prompts short of the best, :func:`~learned_opt.guidance.tapered_scale`) default to
        this generator's :attr:`sampling`.
        """
        s = self.sampler(method, steps, t_min, guidance, temperature, guidance_taper)
        norm = self.normalization
        dtype = next(self.model.parameters()).dtype
        w = s["guidance"]
        if s["guidance_taper"] and w != 1.0:  # the best prompt as callers clamp it, in the prompts' precision
            best = float(torch.tensor(min(max(self.best_prompt, self.metric_range[0]), self.metric_range[1]), dtype=prompt.dtype))
            rows = tapered_scale(w, metric.detach().cpu().double(), prompt.detach().cpu().double(), best,
                                 self.metric_direction)  # on the CPU: float64 everywhere (not on MPS)
            # all at the best: the constant sampler, bit for bit; else the rows, placed as the model is
            w = w if bool((rows == w).all()) else rows.to(device=self.device, dtype=dtype)
        x = norm.params(theta.to(dtype))  # [B, P] generator units
        cond = dict(theta=x, metric=norm.metric(metric.to(dtype)), target=norm.metric(prompt.to(dtype)))
        out = self.diffusion.sample(
            self.model, cond, tuple(x.shape),
            method=s["method"], steps=s["steps"], t_min=s["t_min"], guidance=w,
            temperature=s["temperature"], generator=generator,
        )  # [B, P]
        return norm.unparams(out).to(theta.dtype)

    @torch.no_grad()
    def predict_metric(self, theta: torch.Tensor) -> torch.Tensor:
        """The property head's estimate of the metric of networks ``theta`` [B, P] (raw units in and
        out) -> ``[B]``; :class:`ConfigError` for a generator trained without ``--property-head``."""
        if not self.has_property_head:
            raise ConfigError(f"generator {self.name!r} has no property head to predict metrics with: retrain it "
                              f"with `learned-opt train --property-head W` (e.g. 1.0), or rank candidates by a closure")
        norm = self.normalization
        dtype = next(self.model.parameters()).dtype
        modes = [(m, m.training) for m in self.model.modules()]  # eval mode: no dropout, no global RNG draw
        self.model.eval()
        try:
            predicted = self.model.predict_metric(norm.params(theta.to(self.device, dtype)))  # [B] generator units
        finally:
            for m, training in modes:
                m.training = training
        return norm.unmetric(predicted).to(theta.dtype)

    def __repr__(self) -> str:
        return (
            f"LoadedGenerator({self.name!r}, task={self.task!r}, metric={self.metric_name!r}, "
            f"params={self.layout.num_params}, sha256={self.sha256[:12]})"
        )


# ---------------------------------------------------------------------- reading


def _resolve(source) -> tuple[str, Any, Any]:
    """``(where, manifest Traversable/Path, folder)`` for a registry name or a path."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix in (".json", ".safetensors") or os.sep in str(source) or "/" in str(source):
            manifest_path = path.with_suffix(".json")
            if not manifest_path.is_file():
                raise WeightsError(
                    f"no generator manifest at {manifest_path}: pass a path to a .json manifest or its "
                    f".safetensors weights (the two files must sit side by side), or a registry name"
                )
            return str(manifest_path), manifest_path, manifest_path.parent
        folder = _weights_dir()
        candidate = folder / f"{source}.json"
        if not candidate.is_file():
            known = [g["name"] for g in list_pretrained() if g["kind"] == "generator"]
            raise WeightsError(
                f"unknown generator {source!r}; shipped generators: {', '.join(known) or 'none yet'}. "
                f"Pass one of these names, or a path to a generator's .json manifest."
            )
        return f"{source!r} (shipped)", candidate, folder
    raise WeightsError(
        f"cannot load a generator from {type(source).__name__}: pass a registry name, a path or a LoadedGenerator"
    )


def load_generator(source, *, device: torch.device | str | None = None) -> LoadedGenerator:
    """A :class:`LoadedGenerator` from a registry name, a manifest/weights path, or a loaded one.

    The weights file's sha256 is checked before it is parsed; any problem raises
    :class:`WeightsError` and builds nothing. Loading does not draw from the global RNG.

    A :class:`LoadedGenerator` is returned as it is, not copied: with ``device`` it is moved to
    that device *in place*, so the caller's object moves too.
    """
    if isinstance(source, LoadedGenerator):
        return source.to(device) if device is not None else source
    where, manifest_file, folder = _resolve(source)
    check_regular(manifest_file, "manifest", MAX_MANIFEST_BYTES)
    try:
        text = manifest_file.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read manifest {where}: {exc}") from None
    if rule_kind(text):
        raise WeightsError(f"{where} holds a learned optimizer's weights, not a generator: pass it to "
                           f"LearnedOptimizer(params, weights=...)")
    manifest = read_manifest(text, where)  # every field checked and bounded
    weights_name = manifest["weights_file"]
    weights_file = folder / weights_name
    check_regular(weights_file, "weights file", MAX_WEIGHTS_BYTES)  # not /dev/zero, a FIFO, a folder
    try:
        blob = weights_file.read_bytes()
    except OSError as exc:
        raise WeightsError(
            f"weights file {weights_name} of manifest {where} is missing or unreadable ({exc}); "
            f"keep the .safetensors file beside its .json manifest"
        ) from None
    digest = sha256_bytes(blob)
    if digest != manifest["weights_sha256"]:
        raise WeightsError(
            f"weights file {weights_name} of {where} has sha256 {digest[:16]}..., the manifest expects "
            f"{str(manifest['weights_sha256'])[:16]}...: the file is corrupt, truncated or from another "
            f"generator. Re-download or re-save it."
        )
    header = read_header(blob, where)  # shapes only, bounded
    layout = _layout(manifest, where)
    check_header(header, manifest["model_config"], layout, where)  # before anything large is built
    return _build(manifest, layout, header, blob, where, digest, device)


def _layout(manifest: dict, where: str) -> Layout:
    """The manifest's layout, its token count checked against ``tokenisation.num_tokens``."""
    tok = manifest["tokenisation"]
    try:
        symmetry = Symmetry.from_json(tok["symmetry"]) if tok.get("symmetry") is not None else None
        layout = Layout(signature_from_json(manifest["signature"]), tok.get("chunk_size"), tok.get("scheme", "chunk"),
                        symmetry)
        num_tokens = layout.num_tokens
    except (TypeError, ValueError) as exc:  # ArchitectureMismatchError is a ValueError
        raise WeightsError(f"generator {where} has an unusable signature or tokenisation: {exc}") from None
    if tok.get("num_tokens", num_tokens) != num_tokens:
        raise WeightsError(
            f"manifest {where} says tokenisation.num_tokens = {tok['num_tokens']}, its signature and scheme "
            f"give {num_tokens}; re-save the generator"
        )
    return layout


def _build(manifest: dict, layout: Layout, header: dict, blob: bytes, where: str, digest: str, device) -> LoadedGenerator:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from .diffusion import Diffusion, DiffusionConfig
    from .generator import GptConfig, build_generator

    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"weights of {where} are not a valid safetensors file ({exc})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"weights of {where} contain NaN or Inf in {bad[:5]}; the generator is unusable")
    try:
        # The initial weights are overwritten below: build on a forked RNG so that loading a
        # generator never advances the caller's global random stream.
        with torch.random.fork_rng(devices=[]):
            diffusion_config = DiffusionConfig(**manifest["diffusion_config"])
            model = build_generator(layout, GptConfig(**manifest["model_config"]), diffusion_config)
        compare_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, header, where)
        model.load_state_dict(tensors, strict=True)
        diffusion = Diffusion(diffusion_config)
        sampling = sampling_from_manifest(manifest, diffusion.num_steps)  # a bad "sampling" entry fails here
        if sampling["guidance"] != 1.0 and not model.config.null_prompt:
            raise ValueError(f"its sampling guidance {sampling['guidance']:g} needs a null prompt (model_config.null_prompt)")
        normalization = Normalization(**manifest["normalization"])
    except (TypeError, ValueError, KeyError, RuntimeError, ArithmeticError) as exc:  # e.g. an overflowing setting
        raise WeightsError(f"generator {where} does not match its manifest: {type(exc).__name__}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedGenerator(manifest["name"], manifest, model, diffusion, normalization, digest)
    return loaded.to(device) if device is not None else loaded


def list_pretrained() -> list[dict]:
    """The weights shipped with the package, both kinds: ``kind`` ("generator" or
    "learned-optimizer"), name, task, metric, architecture, the input normalisation a generator's
    networks expect (``None`` where the task has none), sha256 (a learned optimizer's ``task`` says
    what it was meta-trained on; it has no metric).

    Reads manifests only (weights are not hashed or parsed); an unreadable manifest is skipped
    with a warning.
    """
    folder = _weights_dir()
    out: list[dict] = []
    if not folder.is_dir():
        return out
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            check_regular(entry, "manifest", MAX_MANIFEST_BYTES)
            text = entry.read_bytes()
            if rule_kind(text):
                out.append(rule_listing(check_rule_manifest(text, entry.name)))
                continue
            m = read_manifest(text, entry.name)
        except (WeightsError, OSError, UnicodeDecodeError) as exc:
            warnings.warn(f"skipping shipped generator manifest {entry.name}: {exc}", stacklevel=2)
            continue
        sig = signature_from_json(m["signature"])
        out.append(
            {
                "kind": "generator",
                "name": m["name"],
                "task": m["task"],
                "metric": m["metric"],
                "metric_direction": m["metric_direction"],
                "best_prompt": m["best_prompt"],
                "architecture": {
                    "num_params": m["num_params"],
                    "num_tensors": len(sig),
                    "signature": ", ".join(f"{n}{list(s)}" for n, s in sig),
                    "model_config": m["model_config"],
                },
                "input_normalization": m.get("input_normalization"),
                "sha256": m["weights_sha256"],
            }
        )
    return out
