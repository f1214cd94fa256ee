"""``GptOptimizer``: a drop-in ``torch.optim.Optimizer`` with generative parameter updates.

A base optimizer (Adam by default) takes the ordinary steps; a pretrained generator of checkpoints
(G.pt, Peebles et al. 2022, https://arxiv.org/abs/2209.12892) proposes whole new parameter vectors
θ′ on demand (``generate``) or every ``k`` steps (``every=k``, periodic "nowcasting" in the spirit
of NiNo, Knyazev et al. 2025, https://arxiv.org/abs/2409.04434).
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import ConfigError, GenerationError
from .optimizer_checks import (
    check_architecture,
    check_base_kwargs,
    check_args,
    check_chooser,
    check_prompt,
    check_sampling,
    check_step_size,
    check_updatable,
    flat_params,
    materialize,
)
from .optimizer_state import COUNTERS, OUTCOMES, PICKLED_BEFORE, gpt_entry, load_state
from .proposal import GenerationReport, MetricValue, call_metric, metric_value, resolve_prompt, unhooked_step
from .pretrained import LoadedGenerator, load_generator
from .selection import check_candidates, check_rank
from .transaction import attempt

__all__ = ["GenerationReport", "GptOptimizer"]



class GptOptimizer(torch.optim.Optimizer):
    """A base optimizer plus generative updates from a pretrained checkpoint generator.

    Usage::

        opt = GptOptimizer(model.parameters(), generator="mnist-mlp", lr=1e-3)
        report = opt.generate(lambda: test_loss(model))   # one prompted generative update
        loss = opt.step(closure)                          # an ordinary base step

    **A true optimizer.** ``param_groups`` and ``state`` are the *same objects* as the base
    optimizer's (``opt.param_groups is opt.base.param_groups``), so LR schedulers, ``GradScaler``,
    hooks and ``zero_grad`` work unchanged, and with no generative update the result equals the
    base optimizer's bit for bit. ``step(closure)`` is the base step (the closure is the usual loss
    closure, passed to the base); a step that ``GradScaler`` skips for inf/NaN gradients never
    reaches ``step`` and changes nothing. ``base_kwargs`` (``lr``, ``betas``, ...) go to ``base``.
    Step hooks (global ones and this optimizer's) run once per step: the base's step is called
    without torch's hook wrapper (unless something patched ``opt.base.step``), so register step
    hooks on the ``GptOptimizer``, not on ``opt.base``.

    **Parameters.** All of the model's parameters, in ``named_parameters()`` order (several groups
    are concatenated in order), on one device; ``model.named_parameters()`` works alike. Their
    shapes, in order, must be the generator's (names are labels), else
    :class:`ArchitectureMismatchError` lists the differences, by the user's own names, before
    anything is built, with the two commands that make a generator for the model. The generator runs on the parameters' device: a
    :class:`LoadedGenerator` passed in is moved there *in place* (not copied), so the caller's
    object moves too.

    **Metrics.** A metric closure returns the metric the generator is conditioned on
    (``generator.metric_name``, e.g. MNIST test loss) as a number or a one-element tensor (a
    tensor with grad is fine), or a mapping that contains that name. Metric closures run under
    ``torch.no_grad()``; torch's usual loss closure (one that calls ``backward()``) is accepted too:
    it is run with gradients and its loss detached, and ``.grad`` is restored afterwards (a metric
    closure is cheaper). ``generate(closure)`` calls it before and after the update;
    ``generate(metric=m)`` takes the current value directly (no guard then); with both, ``m`` is
    the value before and the closure guards after. Periodic mode (``every=k``) evaluates
    ``metric_closure`` (required with ``every``) every k base steps.

    **Sampling.** ``sampling_steps``, ``sampling_method``, ``sampling_t_min`` (see
    :meth:`~learned_opt.diffusion.Diffusion.sample`) and the three below default to the generator's own sampler
    (``generator.sampling``: the manifest's, chosen for that generator, else DDIM-50), overridden
    key by key: on a generator whose sampler stops at ``t_min`` 300, ``sampling_steps=50`` still
    stops there unless ``sampling_t_min=0`` is given too.
    ``guidance`` is the classifier-free guidance scale (:mod:`learned_opt.guidance`; a generator
    trained with ``--prompt-dropout`` only; 1 is plain conditional sampling); ``guidance_taper=True``
    applies it in full at the best prompt only, tapering to 1 for prompts that ask less.
    ``sampling_temperature`` scales the sampler's noise: below 1 samples nearer the generator's modes, 0 is its deterministic path
    (:meth:`~learned_opt.diffusion.Diffusion.sample`; with 0 and a deterministic sampler, N
    candidates are one sample N times). ``candidates=N`` draws N samples in one batched call and keeps the best:
    with ``rank="closure"`` the one the closure (needed; measure it on held-out training data, not
    the test set) scores best, N closure calls per update (N·S with S step sizes) besides the
    first (if no candidate gives a finite metric, the update is rejected); with ``rank="self"`` the one whose metric the
    generator's property head predicts best (a generator trained with ``--property-head``), with
    no closure call, so it works with ``generate(metric=m)`` alone (the guard, if on and given a
    closure, measures the chosen sample only). ``report.predicted_metrics`` holds the predictions.

    **Step size.** ``step_size=α`` moves to θ + α(θ′ − θ) instead of θ′ (1: θ′ itself). A
    sequence, e.g. ``(1, 0.5, 0.25)``, is a line search: each candidate is tried at each step size
    and chosen among as candidates are (by the closure, or by the property head with
    ``rank="self"``); ``report.step_size`` is the α kept. Late in training a full step to θ′ is
    often worse than θ while a shorter step toward it is better, though on MNIST the base steps
    after such updates gain less, so training ends no better (``docs/results-mnist-mlp.md``).

    **Prompts.** ``prompt=None`` uses the generator's recommended ``best_prompt``; a number is used
    as is; a callable maps the current metric to a prompt. A prompt outside the generator's metric
    range (as seen in its corpus) is clamped into it with a warning. ``keep_if_met=True`` (default):
    a metric that already meets the prompt keeps θ, unsampled (``report.kept``, ``counters["kept"]``).

    **Transactions.** An update samples θ′ with the private RNG, then validates it: the right shape,
    all finite, and ``‖θ′−θ‖ <= max_update_ratio * max(‖θ‖, ‖θ_corpus‖)`` where ``‖θ_corpus‖ =
    sqrt(P) * GPT_TARGET_STD / param_scale`` (``normalization.GPT_TARGET_STD`` = 0.538) is the
    typical norm of a corpus checkpoint (so an update from a near-zero init is not refused). With
    a closure and ``guard=True`` θ′ is copied in, the metric re-measured, and θ restored unless
    the metric is not worse (``<=`` for minimised metrics, ``>=`` for maximised ones), or with
    ``min_improvement=m`` unless it improves by at least ``m·|metric|``. Any refusal
    leaves parameters, gradients and the base optimizer's state exactly unchanged; only the
    counters ``attempted`` and ``rejected`` / ``failed`` move (an exception that escapes before θ′
    is in, e.g. ``KeyboardInterrupt`` while sampling, counts as failed). Buffers are not restored: those the
    closure changed while measuring θ′ (e.g. BatchNorm running statistics updated in train mode)
    stay changed after a rejection, so a metric closure should evaluate in eval mode and under
    ``torch.no_grad()`` (the shipped MLP tasks have no buffers). A broken sample does not raise:
    it returns a report with ``failed=True`` and warns. Bad input (no metric, a NaN metric, a
    metric beyond float32's range, a prompt that is not one finite number) raises
    :class:`GenerationError` before anything happens. θ is restored on *every* exit from an
    update. An ``Exception`` the closure raises while θ′ is in is taken as θ′ breaking it: θ is
    restored and the update rejected, the exception named in ``report.reason``. One that is not an
    ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) restores θ, counts the update as rejected
    and propagates. Closures run under ``torch.no_grad()``, and θ is restored under it even if a
    closure switched grad mode on.

    **Threads.** ``step`` and ``generate`` hold a per-optimizer lock (re-entrant), so two threads
    calling them at once run one update after the other, never interleaved. The lock guards only
    this optimizer's own calls: another thread changing the parameters directly is not serialised.

    **After an accepted update** θ′ replaces every parameter given (frozen ones included: the
    generator models the whole network), the base optimizer's state (Adam's moments and step
    count) is kept as it was, as NiNo does, and gradients are left as they were (zero them as usual).

    **state_dict** is the base optimizer's, plus a ``"gpt"`` entry: the counters, the generator's
    name and sha256 and the private RNG's state (a uint8 tensor), so it round-trips through
    ``torch.load(weights_only=True)`` and a resumed run repeats an uninterrupted one, generative
    updates included. It never holds the generator's weights. ``load_state_dict`` does not mutate
    its input and refuses (:class:`OptimizerStateError`) a state saved with another generator
    (different sha256). A plain base-optimizer state (no ``"gpt"`` entry) loads with zero counters
    and the private RNG reseeded with ``seed``. Load-state-dict hooks registered on the
    GptOptimizer run as for any optimizer (pre-hooks see the whole state, ``"gpt"`` included).

    **Randomness.** Sampling draws only from a private ``torch.Generator`` on the parameters'
    device seeded with ``seed``; the global RNG is never touched.

    **Distributed.** When ``torch.distributed`` is initialised, rank 0's θ′ and its accept
    decision are broadcast, so every rank ends with identical parameters (all ranks must call
    ``generate`` / ``step`` together, as with any collective).

    ``copy.deepcopy`` and pickling keep a working optimizer (a lambda closure or prompt cannot be pickled).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | Iterable[tuple[str, torch.Tensor]],
        generator: str | LoadedGenerator | Any,
        *,
        base: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        every: int | None = None,
        prompt: float | Callable[[float], float] | None = None,
        sampling_steps: int | None = None,
        sampling_method: str | None = None,
        sampling_t_min: int | None = None,
        candidates: int = 1,
        guidance: float | None = None,
        guidance_taper: bool | None = None,
        sampling_temperature: float | None = None,
        rank: str = "closure",
        step_size: float | Sequence[float] = 1.0,
        seed: int = 0,
        metric_closure: Callable[[], MetricValue] | None = None,
        guard: bool = True,
        keep_if_met: bool = True,
        max_update_ratio: float = 10.0,
        min_improvement: float = 0.0,
        **base_kwargs: Any,
    ) -> None:
        check_args(params, every, seed, metric_closure, prompt, max_update_ratio, min_improvement, guard, keep_if_met)
        check_sampling(sampling_steps, sampling_method, sampling_t_min, candidates, sampling_temperature)
        self.step_sizes = check_step_size(step_size)
        own = [n for n, p in inspect.signature(GptOptimizer.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY]
        check_base_kwargs(base, base_kwargs, own)
        params = materialize(params)
        self.generator = load_generator(generator)  # WeightsError for unknown names / bad files
        # ConfigError if unfit
        sampler = self.generator.sampler(sampling_method, sampling_steps, sampling_t_min, guidance, sampling_temperature,
                                         guidance_taper)
        check_rank(rank, self.generator)
        check_candidates(candidates, sampler["temperature"])
        tensors, names = flat_params(params)
        device = tensors[0].device
        if any(t.device != device for t in tensors):
            raise ConfigError("all parameters must be on one device for GptOptimizer; move the model first")
        check_updatable(tensors, names)
        if device.type == "meta":  # before the generator is moved there, which would empty it
            raise ConfigError("the parameters are on the meta device and hold no values to update: materialise "
                              "the model first (e.g. model.to_empty(device='cpu'), then initialise it)")
        check_architecture(self.generator, tensors, names)
        self.generator.to(device)
        self._shapes = [t.shape for t in tensors]  # what the generator models; checked before each update

        try:
            self.base = base(params, **base_kwargs)
        except (TypeError, ValueError) as exc:  # e.g. lr="x": torch's own message names no option
            given = ", ".join(f"{k}={v!r}" for k, v in base_kwargs.items()) or "no options"
            name = getattr(base, "__name__", type(base).__name__)
            raise ConfigError(f"the base optimizer {name} could not be built with these parameters and {given}: "
                              f"{exc}") from exc
        # Optimizer.__init__ sets up hooks and profiling; then share the base's groups and state.
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

        self.every = every
        self.prompt = prompt
        self.sampling_steps = sampler["steps"]
        self.sampling_method = sampler["method"]
        self.sampling_t_min = sampler["t_min"]
        self.guidance, self.guidance_taper = sampler["guidance"], sampler["guidance_taper"]
        self.sampling_temperature = sampler["temperature"]
        self.candidates, self.rank = candidates, rank
        self.seed = seed
        self.metric_closure = metric_closure
        self.guard = guard
        self.keep_if_met = keep_if_met
        self.max_update_ratio = float(max_update_ratio)
        self.min_improvement = float(min_improvement)
        self.counters = {k: 0 for k in COUNTERS}
        self.last_report: GenerationReport | None = None
        self._rng = torch.Generator(device=device)
        self._rng.manual_seed(seed)
        self._lock = threading.RLock()  # serialises step/generate across threads (not pickled)

    # ------------------------------------------------------------------ the base step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One base step (the closure is the usual loss closure); with ``every=k`` also a
        generative update after every k-th step (its report is in ``last_report``).

        In periodic mode a broken sample is skipped with a warning, but a ``metric_closure`` that
        returns NaN/Inf raises :class:`GenerationError` after the base step (training diverged).
        """
        with self._lock:
            # torch wraps every Optimizer subclass's step with the step hooks and a profiler range.
            # This optimizer's own wrapper has just run them, so the base's step is called unwrapped:
            # global hooks run once per step, not twice, and the step costs no second wrapper. The
            # base step sets its own grad mode (and enables grad around the closure).
            base_step = unhooked_step(self.base)
            if base_step is None:
                loss = self.base.step() if closure is None else self.base.step(closure)
            else:
                loss = base_step(self.base) if closure is None else base_step(self.base, closure)
            counters = self.counters
            counters["steps"] += 1
            if self.every is not None and counters["steps"] % self.every == 0:
                self.last_report = self.generate(self.metric_closure)
            return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ generative updates

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters in generator signature order (the groups' parameters concatenated)."""
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def generate(
        self,
        closure: Callable[[], MetricValue] | None = None,
        *,
        metric: MetricValue | None = None,
        prompt: float | Callable[[float], float] | None = None,
    ) -> GenerationReport:
        """One prompted generative update; see the class docstring for what is checked.

        ``closure`` returns the generator's metric for the current parameters (measured before
        and, with ``guard``, after the update); ``metric`` gives the current value directly.
        ``prompt`` overrides the optimizer's prompt for this update.
        """
        with self._lock:  # one update at a time: see "Threads" in the class docstring
            return self._generate(closure, metric, prompt)

    def _generate(self, closure, metric, prompt) -> GenerationReport:
        start = time.perf_counter()
        device = self.params[0].device
        if device.type != self._rng.device.type:  # the generator and the sampler's RNG stayed where θ was
            raise GenerationError(f"the parameters are on {device}, but this GptOptimizer was built for them on "
                                  f"{self._rng.device}: build the optimizer after moving the model (model.to(...))")
        if [p.shape for p in self.params] != self._shapes:  # e.g. a group added through opt.base
            raise GenerationError("the optimizer's parameters changed after it was built (a group added to its "
                                  "base?): build a new GptOptimizer over all the parameters")
        if prompt is not None:
            check_prompt(prompt, "generate(prompt=...)", GenerationError)
        if metric is not None:
            before = metric_value(self, metric, "metric=")
        elif closure is not None:
            before = metric_value(self, call_metric(closure, self.params), "the closure")
        else:
            raise GenerationError(
                f"a generative update needs the current {self.generator.metric_name!r}: pass a closure that "
                f"returns it, or metric=<value>"
            )
        check_chooser(closure, self.candidates, self.step_sizes, self.rank)
        target = resolve_prompt(self, self.prompt if prompt is None else prompt, before)
        self.counters["attempted"] += 1
        counted = sum(self.counters[k] for k in OUTCOMES)
        try:
            return attempt(self, closure, before, target, start)
        finally:
            if sum(self.counters[k] for k in OUTCOMES) == counted:  # an exception escaped before any outcome
                self.counters["failed"] += 1

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (with any keys of its own, such as a learned optimizer's
        ``rule_sha256``) plus ``"gpt"``: counters, generator name + sha256, RNG state."""
        extra = {k: v for k, v in self.base.state_dict().items() if k not in ("state", "param_groups")}
        return {**extra, **super().state_dict(), "gpt": gpt_entry(self)}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once the optimizer is built: its generator models the fixed set of parameters it
        was given (:class:`ConfigError`)."""
        if getattr(self, "base", None) is not None and self.param_groups is self.base.param_groups:
            raise ConfigError("GptOptimizer's generator models the parameters it was built with; build a new "
                              "GptOptimizer over all the parameters instead of adding a group")
        super().add_param_group(param_group)  # Optimizer.__init__, sharing the base's groups

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the input is copied, never mutated).

        Everything is checked before anything is loaded (the generator's sha256, the counters, the
        RNG state, the groups and every base-state tensor's shape against its parameter): a bad
        state raises :class:`OptimizerStateError` and leaves the optimizer exactly as it was.
        Runs this optimizer's load-state-dict pre-hooks (on the copy; one may return a new state
        dict) before anything is checked, and its post-hooks after loading, as the base class does.
        """
        load_state(self, state_dict)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; a GptOptimizer needs all
        # but its lock (locks cannot be pickled or copied: a copy gets its own)
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # restores hooks and the profiled step
        for name, value in PICKLED_BEFORE.items():  # attributes an older release did not pickle
            self.__dict__.setdefault(name, value)
        self.counters.setdefault("kept", 0)
        self._lock = threading.RLock()
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.__dict__.setdefault("_shapes", [p.shape for p in self.params])  # not pickled before it was checked

    def __repr__(self) -> str:
        c = self.counters
        return (
            f"GptOptimizer(base={type(self.base).__name__}, generator={self.generator.name!r}, "
            f"metric={self.generator.metric_name!r}, every={self.every}, prompt={self.prompt!r}, "
            f"sampler={self.sampling_method}-{self.sampling_steps} t_min={self.sampling_t_min}, "
            f"guidance={self.guidance:g}{' tapered' if self.guidance_taper and self.guidance != 1 else ''}, "
            f"temperature={self.sampling_temperature:g}, candidates={self.candidates}, "
            f"step_size={','.join(f'{a:g}' for a in self.step_sizes)}, "
            f"rank={self.rank!r}, seed={self.seed}, groups={len(self.param_groups)}, "
            f"steps={c['steps']}, generative updates accepted/rejected/failed/kept="
            f"{c['accepted']}/{c['rejected']}/{c['failed']}/{c['kept']})"
        )
