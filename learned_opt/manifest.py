"""A generator's manifest (``{name}.json``): what it must hold, and its checks before anything is built.

:func:`read_manifest` parses the JSON and checks every field that loading uses — its type, its
range and the bounds below — so that a damaged or hostile manifest gives one
:class:`WeightsError` naming the field, never another exception and never a large allocation.
The sha256 in a manifest is written by whoever writes the manifest: it proves the weights file
is the one the manifest names, not that the manifest is honest, so sizes are bounded here and
every shape is compared with the weights file's header (:mod:`learned_opt.weightsfile`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from . import jsoncheck
from .errors import ConfigError, WeightsError

# Version 2 adds neuron tokens (``tokenisation.scheme``); chunk-token generators are still written
# as version 1, which releases before neuron tokens read correctly.
MANIFEST_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

# Keys every manifest must hold (the writer in pretrained.py adds all of them).
REQUIRED_KEYS = (
    "format_version",
    "name",
    "task",
    "signature",
    "num_params",
    "metric",
    "metric_direction",
    "metric_range",
    "best_prompt",
    "normalization",
    "tokenisation",
    "model_config",
    "diffusion_config",
    "weights_file",
    "weights_sha256",
)

# The sampler a generator uses when the caller names none. A manifest may carry its own
# ``"sampling"`` entry (``method``, ``steps``, ``t_min``, ``temperature`` and, for a generator
# trained with prompt dropout, ``guidance``, chosen for that generator on validation inits by
# ``learned-opt tune-sampling``), which overrides these key by key. ``guidance_taper``
# scales the guidance down for prompts short of the best (:func:`learned_opt.guidance.tapered_scale`),
# where ``tune-sampling`` measured that it aligns a generator's updates with their prompts better.
DEFAULT_SAMPLING = {"method": "ddim", "steps": 50, "t_min": 0, "guidance": 1.0, "temperature": 1.0,
                    "guidance_taper": False}
SAMPLING_KEYS = tuple(DEFAULT_SAMPLING)

# Bounds on what a manifest may ask to build: far above any generator this package trains, low
# enough that checking and building stay within memory before the weights are compared.
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_NETWORK_PARAMS = 4_000_000  # parameters of the network a generator models
INT_BOUNDS = {  # model_config / diffusion_config integers: inclusive upper bounds
    "d_model": 8192, "n_layers": 256, "n_heads": 1024, "num_frequencies": 8192, "num_steps": 100_000,
}
MAX_MLP_RATIO = 64.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(text: str | bytes, where: str) -> dict:
    """The manifest in ``text``, every field used by loading checked; :class:`WeightsError` if not."""
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise WeightsError(f"manifest {where} is not valid JSON ({str(exc)[:200]}); re-download or re-save it") from None
    if not isinstance(manifest, dict):
        raise WeightsError(f"manifest {where} is not a JSON object")
    version = manifest.get("format_version")
    if not jsoncheck.is_int(version) or version not in READABLE_FORMAT_VERSIONS:
        raise WeightsError(
            f"manifest {where} has format_version {version!r}; this learned-opt reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Use the learned-opt release that wrote it, "
            "or re-save the generator."
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise WeightsError(f"manifest {where} lacks {missing}; it is incomplete or not a generator manifest")
    try:
        check_fields(manifest)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"manifest {where} is invalid: {exc}; re-download or re-save the generator") from None
    return manifest


def check_fields(m: dict) -> None:
    """``ValueError`` describing the first field of manifest ``m`` with a wrong type or range."""
    for key in ("name", "task", "metric"):
        jsoncheck.str_field(m[key], key)
    weights = jsoncheck.str_field(m["weights_file"], "weights_file")
    if "/" in weights or "\\" in weights or weights in (".", ".."):
        raise ValueError(f"weights_file {weights!r} must be a file name in the manifest's folder")
    if not isinstance(m["weights_sha256"], str) or not _SHA256.match(m["weights_sha256"]):
        raise ValueError("weights_sha256 must be 64 lowercase hex digits")
    signature = jsoncheck.signature(m["signature"])
    total = sum(math.prod(shape) for _, shape in signature)
    num_params = jsoncheck.int_field(m["num_params"], "num_params", lo=1, hi=MAX_NETWORK_PARAMS)
    if num_params != total:
        raise ValueError(f"num_params is {num_params}, but the signature has {total} parameters")
    if m["metric_direction"] not in ("min", "max"):
        raise ValueError(f"metric_direction must be 'min' or 'max', got {m['metric_direction']!r}")
    rng = m["metric_range"]
    if not (isinstance(rng, list) and len(rng) == 2 and all(map(jsoncheck.is_number, rng)) and rng[0] < rng[1]):
        raise ValueError(f"metric_range must be [lo, hi], two finite numbers with lo < hi, got {str(rng)[:80]}")
    jsoncheck.number_field(m["best_prompt"], "best_prompt")
    _check_numbers(m["normalization"], "normalization", ("param_scale", "metric_lo", "metric_hi"))
    _check_tokenisation(m["tokenisation"])
    _check_config(m["model_config"], "model_config", ("d_model", "n_layers", "n_heads"))
    _check_config(m["diffusion_config"], "diffusion_config", ())
    mlp_ratio = m["model_config"].get("mlp_ratio", 4.0)
    if not (jsoncheck.is_number(mlp_ratio) and 0 < mlp_ratio <= MAX_MLP_RATIO):
        raise ValueError(f"model_config.mlp_ratio must be a number in (0, {MAX_MLP_RATIO:g}], got {mlp_ratio!r}")
    _check_split(m.get("corpus"))
    check_input_normalization(m.get("input_normalization"))


def check_input_normalization(value: Any) -> None:
    """``input_normalization``, where present: ``{"mean": [...], "std": [...]}``, one finite number
    per input channel, every std > 0 (the per-channel normalisation of the corpus's inputs)."""
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ValueError('input_normalization must be {"mean": [...], "std": [...]}')
    mean, std = value["mean"], value["std"]
    if not (isinstance(mean, list) and isinstance(std, list) and 0 < len(mean) == len(std) <= 4096):
        raise ValueError("input_normalization.mean and .std must be lists of one number per input channel")
    if not all(map(jsoncheck.is_number, mean + std)) or min(std) <= 0:
        raise ValueError("input_normalization holds finite numbers, every std above 0")


def _check_numbers(value: Any, name: str, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict) or set(value) != set(keys):
        raise ValueError(f"{name} must be an object with exactly {', '.join(keys)}")
    for k in keys:
        jsoncheck.number_field(value[k], f"{name}.{k}")


def _check_tokenisation(tok: Any) -> None:
    if not isinstance(tok, dict):
        raise ValueError(f"tokenisation must be an object with scheme, chunk_size and num_tokens, got {str(tok)[:80]}")
    if tok.get("scheme", "chunk") not in ("chunk", "neuron"):
        raise ValueError(f"tokenisation.scheme must be 'chunk' or 'neuron', got {tok.get('scheme')!r}")
    chunk = tok.get("chunk_size")
    if chunk is not None:
        jsoncheck.int_field(chunk, "tokenisation.chunk_size", lo=1, hi=MAX_NETWORK_PARAMS)
    if "num_tokens" in tok:
        jsoncheck.int_field(tok["num_tokens"], "tokenisation.num_tokens", lo=1, hi=MAX_NETWORK_PARAMS)


def _check_config(config: Any, name: str, required: tuple[str, ...]) -> None:
    """A model or diffusion config: an object of JSON scalars holding ``required``, integers within
    :data:`INT_BOUNDS` (the dataclass itself checks the rest when it is built)."""
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be an object, got {str(config)[:80]}")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{name} lacks {missing}")
    for key, value in config.items():
        if key in INT_BOUNDS:
            jsoncheck.int_field(value, f"{name}.{key}", lo=1, hi=INT_BOUNDS[key])
        elif not (isinstance(value, (bool, str)) or jsoncheck.is_number(value)):
            raise ValueError(f"{name}.{key} must be a finite number, a boolean or a string, got {str(value)[:80]}")


def _check_split(corpus: Any) -> None:
    """``corpus.split.train`` / ``.heldout``, where present: lists of run ids (integers >= 0)."""
    if corpus is None:
        return
    if not isinstance(corpus, dict):
        raise ValueError("corpus must be an object (the training corpus' summary)")
    split = corpus.get("split")
    if split is None:
        return
    if not isinstance(split, dict):
        raise ValueError("corpus.split must be an object of run-id lists")
    for part in ("train", "heldout"):
        ids = split.get(part, [])
        if not isinstance(ids, list) or not all(jsoncheck.is_int(r) and r >= 0 for r in ids):
            raise ValueError(f"corpus.split.{part} must be a list of run ids (integers >= 0)")


def sampling_from_manifest(manifest: Mapping[str, Any], num_steps: int) -> dict[str, Any]:
    """The generator's default sampler: :data:`DEFAULT_SAMPLING` updated by the manifest's
    ``"sampling"`` entry, checked; raises ``ValueError`` on a bad entry."""
    from .diffusion import METHODS, check_sampler

    given = manifest.get("sampling")
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ValueError(f"'sampling' must be an object with {', '.join(SAMPLING_KEYS)}, got {given!r}")
    unknown = sorted(set(given) - {*SAMPLING_KEYS, "chosen_by"})
    if unknown:
        raise ValueError(f"'sampling' has unknown keys {unknown}; it takes {', '.join(SAMPLING_KEYS)} (and chosen_by)")
    out = {**DEFAULT_SAMPLING, **{k: given[k] for k in SAMPLING_KEYS if k in given}}
    if "steps" not in given and jsoncheck.is_int(out["t_min"]):  # the default, on a short schedule: every step
        out["steps"] = max(1, min(out["steps"], num_steps - out["t_min"]))
    method, steps, t_min, guidance = out["method"], out["steps"], out["t_min"], out["guidance"]
    if not (jsoncheck.is_number(guidance) and guidance >= 0):
        raise ValueError(f"sampling guidance must be a finite number >= 0, got {guidance!r}")
    out["guidance"] = float(guidance)
    if not (jsoncheck.is_number(out["temperature"]) and out["temperature"] >= 0):
        raise ValueError(f"sampling temperature must be a finite number >= 0, got {out['temperature']!r}")
    out["temperature"] = float(out["temperature"])
    if not isinstance(out["guidance_taper"], bool):
        raise ValueError(f"sampling guidance_taper must be true or false, got {out['guidance_taper']!r}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"sampling method {method!r} is not one of {', '.join(METHODS)}")
    for name, value in (("steps", steps), ("t_min", t_min)):
        if not jsoncheck.is_int(value):
            raise ValueError(f"sampling {name} must be an integer, got {value!r}")
    try:
        check_sampler(num_steps, method, steps, t_min)
    except ConfigError as exc:
        raise ValueError(f"sampling {method}, steps={steps}, t_min={t_min} does not fit: {exc}") from None
    return out


def sampler_settings(sampling: Mapping[str, Any], num_steps: int, name: str, supports_guidance: bool,
                     **given: Any) -> dict[str, Any]:
    """A generator's ``sampling`` (from :func:`sampling_from_manifest`) with the ``given`` settings
    (``method``, ``steps``, ``t_min``, ``guidance``, ``temperature``, ``guidance_taper``; None keeps
    the generator's) on top, checked against its ``num_steps`` schedule and whether it was trained
    with prompt dropout (``supports_guidance``); :class:`ConfigError` naming generator ``name``."""
    from .diffusion import check_sampler, check_temperature
    from .guidance import check_guidance

    out = {k: sampling.get(k, DEFAULT_SAMPLING[k]) if given.get(k) is None else given[k] for k in SAMPLING_KEYS}
    out["guidance"], out["temperature"] = check_guidance(out["guidance"]), check_temperature(out["temperature"])
    if not isinstance(out["guidance_taper"], bool):
        raise ConfigError(f"guidance_taper must be True, False or None (the generator's own), got {out['guidance_taper']!r}")
    try:
        check_sampler(num_steps, out["method"], out["steps"], out["t_min"])
    except ConfigError as exc:
        raise ConfigError(f"sampling_method={out['method']!r}, sampling_steps={out['steps']}, "
                          f"sampling_t_min={out['t_min']} does not fit the generator {name!r}: {exc}") from None
    if out["guidance"] != 1.0 and not supports_guidance:
        raise ConfigError(f"guidance={out['guidance']:g} needs a generator trained with prompt dropout, and "
                          f"{name!r} was not: retrain it with `learned-opt train --prompt-dropout P` "
                          f"(e.g. 0.1), or use guidance 1")
    return out
