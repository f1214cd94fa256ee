"""What ``learned-opt bench`` measures (:class:`BenchConfig` for ``--mode periodic``,
:class:`LoptBenchConfig` for ``--mode lopt``) and how its options are parsed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from learned_opt.baselines.supervised import NAMED_RECIPES
from learned_opt.diffusion import METHODS, check_temperature
from learned_opt.errors import ConfigError
from learned_opt.lopt import LoadedRule
from learned_opt.optimizer_checks import check_min_improvement, check_step_size
from learned_opt.pretrained import LoadedGenerator
from learned_opt.recipes import ADAM, LOPT


MODES = ("periodic", "lopt")
# Generator metrics that are a cross-entropy, for which the held-out cross-entropy stands in.
LOSS_METRICS = ("test_loss", "train_loss")
MOMENTS = ("keep", "reset")


def applicable(recipe: dict) -> dict:
    """A recipe of :mod:`learned_opt.recipes` without the keys that do not apply to it, learned
    optimizer weights given as a :class:`LoadedRule` written as their name and sha256 (for ``bench.json``)."""
    skip = {"epochs"} if recipe.get("schedule") == "constant" else set()
    if recipe["optimizer"] != ADAM:
        skip |= {"adam_beta2", "adam_eps"}
    out = {k: v for k, v in recipe.items() if k not in skip}
    rule = out.get("weights")
    if isinstance(rule, LoadedRule):
        out["weights"], out["weights_sha256"] = rule.name, rule.sha256
    return out


def named_recipe(name: str, rule: LoadedRule | None = None) -> dict:
    """The recipe a base or optimizer name stands for; the learned optimizer's with ``rule`` as its weights."""
    recipe = dict(NAMED_RECIPES[name])
    if recipe["optimizer"] == LOPT and rule is not None:
        recipe["weights"] = rule
    return recipe


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
    bases: tuple[str, ...] = ("adam", "sgd")  # of NAMED_RECIPES: adam, sgd, lopt (the learned optimizer)
    every: tuple[int, ...] = (50, 100, 200, 500)
    holdout: int = 5000  # last training examples, held out for the metric closure
    eval_every: int = 50  # test loss every this many steps (not timed)
    prompt: str | None = None  # None: the generator's best prompt; "0.3"; "frac:0.9"
    moments: str = "keep"  # keep or reset the base optimizer's state after an accepted update
    sampling_steps: int | None = None  # None: the generator's own sampler (its manifest's, else DDIM-50)
    method: str | None = None
    t_min: int | None = None
    candidates: int = 1  # samples per generative update, the best by the metric closure kept
    guidance: float | None = None  # classifier-free guidance scale; None: the generator's own (else 1)
    temperature: float | None = None  # scale of the sampling noise; None: the generator's own (else 1)
    rank: str = "closure"  # who chooses among the candidates: the metric closure, or the generator's head
    step_size: tuple[float, ...] = (1.0,)  # θ + α(θ′ − θ) for each α, the best by the metric closure kept
    min_improvement: float = 0.0  # the share of the held-out loss an update must take off to be kept
    keep_if_met: bool = True  # GptOptimizer's keep_if_met: no sample while the metric meets the prompt
    weights: str | None = None  # the lopt base's learned-optimizer weights (None: the shipped ones)
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.bases, self.every = tuple(self.bases), tuple(self.every)
        if self.mode != "periodic":
            raise ConfigError(f"unknown --mode {self.mode!r} for BenchConfig, which is --mode periodic's; "
                              f"choose one of {', '.join(MODES)} (LoptBenchConfig for --mode lopt)")
        check_positive(self, ("inits", "steps", "holdout", "eval_every", "sampling_steps", "candidates"))
        if self.temperature is not None:
            check_temperature(self.temperature, "--temperature")
        self.step_size = check_step_size(self.step_size, "--step-size")
        check_min_improvement(self.min_improvement, "--min-improvement")
        check_names(self.bases, "--bases", tuple(NAMED_RECIPES), "base optimizer")
        if self.weights is not None and "lopt" not in self.bases:
            raise ConfigError("--weights sets the learned optimizer's weights, which only the lopt base uses; "
                              "add lopt to --bases or leave --weights out")
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
        check_device(self.device)


LOPT_OPTIMIZERS = ("adam", "adam-tuned", "sgd", "lopt")  # what --mode lopt trains, side by side
TARGET_OPTIMIZER = "adam"  # Adam(1e-3): its median test loss at --grid-steps is the target
TUNED_OPTIMIZER = "adam-tuned"  # Adam with the lr of --lr-grid chosen on the held-out split
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


@dataclass
class LoptBenchConfig:
    """What ``learned-opt bench --mode lopt`` measures (one field per command-line option)."""

    tasks: tuple[str, ...] = ("mnist-mlp",)  # names, path/to/file.py:ClassName or module:ClassName
    out: str = "bench"
    weights: str | None = None  # the learned optimizer's: None (the shipped ones), a name, "hand-set" or a manifest
    mode: str = "lopt"
    data_root: str | None = None
    inits: int = 3
    seed: int = 4_000_000  # init i has seed seed + i (also its minibatch order)
    steps: int = 10_000
    grid_steps: int = 2000  # the target is Adam(1e-3)'s loss here; the lr grid is trained to here and chosen
    lr_grid: tuple[float, ...] = LR_GRID  # Adam's learning rates for adam-tuned
    optimizers: tuple[str, ...] = LOPT_OPTIMIZERS
    holdout: int = 5000  # last training examples, held out for choosing the lr (never trained on)
    eval_every: int = 100  # test loss every this many steps (not timed)
    device: str = "cpu"
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        self.tasks, self.lr_grid, self.optimizers = tuple(self.tasks), tuple(self.lr_grid), tuple(self.optimizers)
        if self.mode != "lopt":
            raise ConfigError(f"LoptBenchConfig is --mode lopt's, not {self.mode!r}")
        check_positive(self, ("inits", "steps", "grid_steps", "holdout", "eval_every"))
        if self.grid_steps > self.steps:
            raise ConfigError(f"--grid-steps {self.grid_steps} is more than --steps {self.steps}; the target and "
                              f"the lr choice are read at --grid-steps, within the run")
        if not self.tasks:
            raise ConfigError("no --task given; name one or more, e.g. --task mnist-mlp --task path/to/file.py:Class")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--task names a task twice ({','.join(self.tasks)}); name each once")
        check_names(self.optimizers, "--optimizers", LOPT_OPTIMIZERS, "optimizer")
        if TARGET_OPTIMIZER not in self.optimizers:
            raise ConfigError(f"--optimizers must include {TARGET_OPTIMIZER}: Adam(1e-3)'s median test loss at "
                              f"--grid-steps is every optimizer's target")
        if TUNED_OPTIMIZER in self.optimizers:
            if not self.lr_grid:
                raise ConfigError("--lr-grid is empty; give Adam's learning rates, e.g. 3e-4,1e-3,3e-3,1e-2,3e-2")
            bad = [lr for lr in self.lr_grid if isinstance(lr, bool) or not isinstance(lr, (int, float))
                   or not math.isfinite(lr) or lr <= 0]
            if bad:
                raise ConfigError(f"--lr-grid must hold finite learning rates > 0, got {bad[0]!r}")
            if len(set(self.lr_grid)) != len(self.lr_grid):
                raise ConfigError(f"--lr-grid lists a learning rate twice ({','.join(map(str, self.lr_grid))})")
        check_device(self.device)


def check_positive(config, names: tuple[str, ...]) -> None:
    """Each of ``names`` (None allowed for ``sampling_steps``) is an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if value is None and name == "sampling_steps":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


def check_names(names: tuple[str, ...], option: str, known: tuple[str, ...], what: str) -> None:
    """``names`` is a non-empty list of ``known`` names without repeats."""
    if not names:
        raise ConfigError(f"{option} is empty; name at least one of {', '.join(known)} (e.g. {option} {known[0]})")
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown[0]!r} in {option}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{option} lists {'an' if what[0] in 'aeiou' else 'a'} {what} twice ({','.join(names)}); "
                          f"list each once")


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown --device {device!r}; use cpu or cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but CUDA is not available here; use --device cpu")


# ---------------------------------------------------------------------- parsing


def parse_bases(text: str) -> tuple[str, ...]:
    """``"adam,sgd"`` -> ``("adam", "sgd")``: any comma-separated names (bases, optimizers, tasks),
    checked by the config."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``"3e-4,1e-3"`` -> ``(0.0003, 0.001)``; a part that is not a number raises :class:`ConfigError`."""
    out = []
    for part in parse_bases(text):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(f"{option} takes comma-separated numbers, e.g. 3e-4,1e-3,3e-3; got {part!r}") from None
    return tuple(out)


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
