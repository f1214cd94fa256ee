"""What ``learned-opt bench`` measures (:class:`BenchConfig`) and how its options are parsed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from learned_opt.baselines.supervised import BASELINES
from learned_opt.diffusion import METHODS
from learned_opt.errors import ConfigError
from learned_opt.pretrained import LoadedGenerator
from learned_opt.recipes import ADAM


MODES = ("periodic",)
# Generator metrics that are a cross-entropy, for which the held-out cross-entropy stands in.
LOSS_METRICS = ("test_loss", "train_loss")
MOMENTS = ("keep", "reset")


def applicable(recipe: dict) -> dict:
    """A recipe of :mod:`learned_opt.recipes` without the keys that do not apply to it (for ``bench.json``)."""
    skip = {"epochs"} if recipe.get("schedule") == "constant" else set()
    if recipe["optimizer"] != ADAM:
        skip |= {"adam_beta2", "adam_eps"}
    return {k: v for k, v in recipe.items() if k not in skip}


BASE_HPARAMS = {name: applicable(recipe) for name, recipe in BASELINES.items()}  # what each base trains with
BASE_LABEL = "base"  # the configuration without generative updates


@dataclass
class BenchConfig:
    """What ``learned-opt bench`` measures (one field per command-line option)."""

    generator: str  # registry name or manifest path
    out: str = "bench"
    task: str | None = None  # None: the generator's; else a name, path/to/file.py:ClassName or module:ClassName
    mode: str = "periodic"
    data_root: str | None = None
    inits: int = 10
    seed: int = 3_000_000  # init i has seed seed + i (also its minibatch order and sampler seed)
    steps: int = 3000
    bases: tuple[str, ...] = ("adam", "sgd")
    every: tuple[int, ...] = (50, 100, 200, 500)
    holdout: int = 5000  # last training examples, held out for the metric closure
    eval_every: int = 50  # test loss every this many steps (not timed)
    prompt: str | None = None  # None: the generator's best prompt; "0.3"; "frac:0.9"
    moments: str = "keep"  # keep or reset the base optimizer's state after an accepted update
    sampling_steps: int | None = None  # None: the generator's own sampler (its manifest's, else DDIM-50)
    method: str | None = None
    t_min: int | None = None
    candidates: int = 1  # samples per generative update, the best by the metric closure kept
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.bases, self.every = tuple(self.bases), tuple(self.every)
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}; choose one of {', '.join(MODES)}")
        for name in ("inits", "steps", "holdout", "eval_every", "sampling_steps", "candidates"):
            value = getattr(self, name)
            if value is None and name == "sampling_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not self.bases:
            raise ConfigError(f"--bases is empty; name at least one of {', '.join(BASELINES)} (e.g. --bases adam)")
        unknown = [b for b in self.bases if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown base optimizer {unknown[0]!r} in --bases; choose from {', '.join(BASELINES)}")
        if len(set(self.bases)) != len(self.bases):
            raise ConfigError(f"--bases lists a base twice ({','.join(self.bases)}); list each once")
        if not self.every:
            raise ConfigError("--every is empty; give one or more periods, e.g. --every 50,100")
        for k in self.every:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"--every must hold integers >= 1 (generative updates every k steps), got {k!r}")
            if k > self.steps:
                raise ConfigError(f"--every {k} is more than --steps {self.steps}: no generative update would run; "
                                  f"lower it or raise --steps")
        if len(set(self.every)) != len(self.every):
            raise ConfigError(f"--every lists a period twice ({','.join(map(str, self.every))}); list each once")
        if self.moments not in MOMENTS:
            raise ConfigError(f"unknown --moments {self.moments!r}; choose keep or reset")
        if self.t_min is not None and (isinstance(self.t_min, bool) or not isinstance(self.t_min, int) or self.t_min < 0):
            raise ConfigError(f"--t-min must be an integer >= 0, got {self.t_min!r}")
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"unknown sampling --method {self.method!r}; choose one of {', '.join(METHODS)}")
        parse_prompt(self.prompt)  # raises on a bad rule
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown --device {self.device!r}; use cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but CUDA is not available here; use --device cpu")


# ---------------------------------------------------------------------- parsing


def parse_bases(text: str) -> tuple[str, ...]:
    """``"adam,sgd"`` -> ``("adam", "sgd")`` (checked by :class:`BenchConfig`)."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_every(text: str) -> tuple[int, ...]:
    """``"50,100"`` -> ``(50, 100)``; a part that is not an integer raises :class:`ConfigError`."""
    out = []
    for part in (s.strip() for s in text.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"--every takes comma-separated integers, e.g. 50,100,200; got {part!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class FractionPrompt:
    """A prompt of ``fraction`` times the current metric (``--prompt frac:X``)."""

    fraction: float

    def __call__(self, metric: float) -> float:
        return self.fraction * metric


def parse_prompt(text: str | None) -> float | FractionPrompt | None:
    """``None`` (the generator's best prompt), a number, or ``frac:X`` -> :class:`FractionPrompt`."""
    if text is None:
        return None
    text = str(text).strip()
    if text.lower().startswith("frac:"):
        try:
            x = float(text[5:])
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and x > 0):
            raise ConfigError(f"--prompt {text!r}: frac:X needs a number X > 0, e.g. frac:0.9 "
                              f"(90% of the current loss)")
        return FractionPrompt(x)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--prompt {text!r} is neither a finite number nor frac:X; "
                          f"e.g. --prompt 0.3 or --prompt frac:0.9")
    return value


def describe_prompt(prompt: float | FractionPrompt | None, generator: LoadedGenerator) -> dict:
    """How the prompt is chosen, for ``bench.json`` (the optimizer clamps it into ``metric_range``)."""
    base = {"metric_range": list(generator.metric_range), "clamped_into_metric_range": True}
    if prompt is None:
        return {"rule": "best", "value": generator.best_prompt, **base}
    if isinstance(prompt, FractionPrompt):
        return {"rule": "fraction of the current metric", "fraction": prompt.fraction, **base}
    return {"rule": "fixed", "value": float(prompt), **base}
