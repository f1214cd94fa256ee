"""The diffusion process: noise schedules, the x0-prediction loss, DDPM, DDIM and DPM-Solver++ sampling.

A Gaussian diffusion over plain tensors (Ho et al. 2020, arXiv:2006.11239): the forward process
noises a clean ``x0`` to ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``; the model predicts ``x0`` from
``x_t`` (G.pt's parameterisation) and is trained with an MSE loss. Sampling runs one of

* ``"ddpm"``: ancestral sampling through all ``num_steps`` steps (what G.pt does per update);
* ``"ddim"``: DDIM (Song et al. 2021, arXiv:2010.02502) on ``steps`` evenly strided timesteps,
  deterministic for ``eta=0``; ``eta=1`` with ``steps == num_steps`` is the same law as DDPM;
* ``"dpm++2m"``: DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), a deterministic second-order
  multistep solver of the same ODE as DDIM, on ``steps`` timesteps evenly spaced in log-SNR. Same
  cost per step as DDIM; on Gaussian data with the exact denoiser it keeps the spread within a
  few percent at 25 steps, where DDIM shrinks it by 5-10%.

Every sampler takes a ``temperature`` that scales its noise draws (x_T and any fresh noise along
the way): 1 is the model's distribution; below 1 samples nearer its modes, and 0 with a
deterministic sampler is one path from x_T = 0 (low-temperature sampling, as in Kingma &
Dhariwal 2018, arXiv:1807.03039).

The model is any callable ``model(x_t, t, **cond) -> x0_hat``; this module knows nothing about
parameters or tokens. All sampling noise comes from a caller's ``torch.Generator``; the global RNG
is never touched.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable, Mapping, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .guidance import check_guidance, guided_denoiser

SCHEDULES = ("linear", "cosine")
METHODS = ("ddim", "ddpm", "dpm++2m")
LOGSNR_FLOOR = -10.0  # where log-SNR-spaced samplers start spacing their steps


@dataclass
class DiffusionConfig:
    """Noise schedule of a :class:`Diffusion`; JSON-able via ``dataclasses.asdict``."""

    num_steps: int = 1000  # G.pt: 1000
    schedule: str = "linear"  # "linear" (G.pt, DDPM) or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    cosine_offset: float = 0.008  # cosine schedule only: the small offset s of ᾱ(t) = cos²((t/T + s)/(1 + s) π/2)

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ConfigError(f"DiffusionConfig.num_steps must be a positive integer, got {self.num_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown noise schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if not self.cosine_offset >= 0.0:
            raise ConfigError(f"DiffusionConfig.cosine_offset must be >= 0, got {self.cosine_offset}")


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    """``[num_steps]`` float64 betas of the configured schedule."""
    n = config.num_steps
    if config.schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    # cosine: betas from ratios of ᾱ(t), clipped below 1 so the last step stays invertible
    s = config.cosine_offset
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=1e-8, max=0.999)


def _check_steps(num_steps: int, steps: int, t_min: int, who: str) -> None:
    if isinstance(t_min, bool) or not isinstance(t_min, int) or not 0 <= t_min < num_steps:
        raise ConfigError(f"t_min must be an integer timestep in [0, {num_steps - 1}], got t_min={t_min!r}")
    if not 1 <= steps <= num_steps - t_min:
        raise ConfigError(f"{who} needs 1 <= steps <= num_steps - t_min ({num_steps - t_min}), got steps={steps}")
    if steps == 1 and 0 < t_min < num_steps - 1:
        raise ConfigError(f"{who} with one step calls the model at the last timestep only, so t_min={t_min} would "
                          f"not apply; use steps >= 2 with t_min, or t_min=0")


def check_temperature(value, where: str = "temperature") -> float:
    """``value`` as a float; :class:`ConfigError` unless it is a finite number >= 0."""
    # cast: any Real orders against numbers; typeshed's numbers.Real declares only __lt__ and __le__
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and cast(float, value) >= 0):
        raise ConfigError(f"Invalid {where}: {value!r} (the scale of the sampling noise: a finite number >= 0; "
                          f"1 samples the model's distribution, 0 its deterministic path from x_T = 0)")
    return float(value)


def _row_scales(scales: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Per-row guidance scales ``[B]``, checked: finite, >= 0, one per row of ``shape``."""
    if scales.dim() != 1 or scales.shape[0] != int(shape[0]):
        raise ConfigError(f"per-row guidance needs one scale per row ({int(shape[0])}), got shape {list(scales.shape)}")
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise ConfigError("per-row guidance scales must be finite numbers >= 0")
    return scales


def check_sampler(num_steps: int, method: str, steps: int, t_min: int) -> None:
    """Raise :class:`ConfigError` unless ``method`` with ``steps`` and ``t_min`` can run on a
    ``num_steps`` schedule (DDPM ignores ``steps``)."""
    if method not in METHODS:
        raise ConfigError(f"unknown sampling method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "ddpm":
        steps = num_steps - t_min if isinstance(t_min, int) and 0 <= t_min < num_steps else 1
    _check_steps(num_steps, steps, t_min, method)


def ddim_timesteps(num_steps: int, steps: int, t_min: int = 0) -> list[int]:
    """``steps`` distinct timesteps evenly strided from ``num_steps - 1`` down to ``t_min`` (one step: the last)."""
    _check_steps(num_steps, steps, t_min, "DDIM")
    if steps == 1:
        return [num_steps - 1]
    span = num_steps - 1 - t_min
    return [t_min + round(i * span / (steps - 1)) for i in range(steps - 1, -1, -1)]


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int, t_min: int = 0) -> list[int]:
    """``steps`` distinct timesteps from the last down to ``t_min``, evenly spaced in log-SNR ``log(ᾱ / (1 - ᾱ))``."""
    n = alphas_cumprod.numel()
    _check_steps(n, steps, t_min, "the sampler")
    if steps == 1:
        return [n - 1]
    logsnr = torch.log(alphas_cumprod / (1.0 - alphas_cumprod))  # [N], decreasing in t
    # Below a log-SNR of -10 (ᾱ < 5e-5) x_t is noise for any data of unit scale: do not spend steps there.
    low = max(logsnr[-1].item(), LOGSNR_FLOOR)
    grid = torch.linspace(low, logsnr[t_min].item(), steps, dtype=torch.float64)
    nearest = torch.searchsorted(-logsnr, -grid).clamp(max=n - 1).tolist()  # first t with logsnr <= g
    out = [n - 1]
    for i in range(1, steps):
        # strictly decreasing, not below t_min, and leave room for the steps still to come
        out.append(max(min(nearest[i], out[-1] - 1), t_min + steps - 1 - i))
    return out


class Diffusion:
    """Forward noising, training loss and samplers for one noise schedule."""

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        self.config = config if config is not None else DiffusionConfig()
        self.betas = make_betas(self.config)  # [N] float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # [N] float64, ᾱ_t
        self._abar = self.alphas_cumprod.tolist()  # Python floats for the samplers' scalar maths
        self._coef_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def __repr__(self) -> str:
        return f"Diffusion({self.config})"

    # ------------------------------------------------------------------ forward process

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) at ``t`` [B], shaped ``[B, 1, ...]`` to broadcast over ``like``."""
        key = (like.device, like.dtype)
        if key not in self._coef_cache:
            ab = self.alphas_cumprod
            self._coef_cache[key] = (
                ab.sqrt().to(device=like.device, dtype=like.dtype),
                (1.0 - ab).sqrt().to(device=like.device, dtype=like.dtype),
            )
        signal, noise = self._coef_cache[key]
        shape = (-1,) + (1,) * (like.dim() - 1)
        t = t.to(like.device)
        return signal[t].view(shape), noise[t].view(shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``; ``t`` is ``[B]``, x0 ``[B, ...]``."""
        signal, sigma = self._coefs(t, x0)
        return signal * x0 + sigma * noise

    def training_loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        *,
        generator: torch.Generator | None = None,
        weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
        t_probs: torch.Tensor | None = None,
        extra: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """MSE between ``model(x_t, t, **cond)`` and ``x0`` at drawn t (uniformly by default); a scalar.

        ``t`` and the noise come from ``generator`` (or the global RNG when it is None).
        ``weight(t)``, when given, weights each squared error: a tensor that broadcasts against
        ``x0`` (``[B, 1]`` per sample, ``[B, P]`` per entry; e.g.
        :meth:`~learned_opt.generator.Gpt.loss_weight`). ``t_probs`` ``[num_steps]``, when given,
        draws t from those probabilities instead of uniformly (see :meth:`snr_window_probs`).
        ``extra(pred, x0, t)``, when given, returns a scalar added to the loss (e.g. how differently
        the predicted networks behave from the targets).
        """
        b = x0.shape[0]
        device = generator.device if generator is not None else x0.device
        if t_probs is None:
            t = torch.randint(0, self.num_steps, (b,), generator=generator, device=device)
        else:
            t = torch.multinomial(t_probs.to(device), b, replacement=True, generator=generator)
        t = t.to(x0.device)  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x_t = self.q_sample(x0, t, noise)
        pred, x0 = model(x_t, t, **cond).float(), x0.float()
        if weight is None:
            loss = F.mse_loss(pred, x0)
        else:
            loss = (weight(t).float() * (pred - x0).square()).mean()
        return loss if extra is None else loss + extra(pred, x0, t)

    def snr_window_probs(self, lo: float, hi: float, scale: float = 1.0, uniform_share: float = 0.1) -> torch.Tensor:
        """Probabilities ``[num_steps]`` of drawing each t in training: ``1 - uniform_share`` spread
        evenly over the steps where the log signal-to-noise ratio of data of std ``scale``,
        ``log(ᾱ_t scale² / (1 - ᾱ_t))``, lies in ``[lo, hi]``, the rest over all steps. Where the
        ratio is far below ``lo`` x_t is noise and the model can only learn a mean; far above
        ``hi`` x_t is the answer."""
        if not (lo < hi and scale > 0 and 0.0 <= uniform_share <= 1.0):
            raise ConfigError(f"need lo < hi, scale > 0 and 0 <= uniform_share <= 1, got {lo}, {hi}, {scale}, {uniform_share}")
        ab = self.alphas_cumprod
        logsnr = torch.log(ab / (1.0 - ab)) + 2.0 * math.log(scale)
        inside = ((logsnr >= lo) & (logsnr <= hi)).double()
        if inside.sum() == 0:
            raise ConfigError(f"no diffusion step has a log-SNR in [{lo}, {hi}] for data of std {scale}")
        n = self.num_steps
        return ((1.0 - uniform_share) * inside / inside.sum() + uniform_share / n).float()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        cond: Mapping[str, torch.Tensor],
        shape: Sequence[int],
        *,
        method: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator,
        x_T: torch.Tensor | None = None,
        t_min: int = 0,
        progress: bool = False,
        guidance: float | torch.Tensor = 1.0,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw ``x0`` of ``shape`` (``[B, ...]``) by reverse diffusion.

        ``method="ddim"`` uses ``steps`` evenly strided timesteps and DDIM's ``eta`` (0: deterministic
        given x_T); ``method="ddpm"`` is ancestral sampling through all ``num_steps`` steps (``steps``
        and ``eta`` are ignored); ``method="dpm++2m"`` is DPM-Solver++(2M) on ``steps`` log-SNR-spaced
        timesteps (deterministic given x_T; ``eta`` is ignored). Each step is one model call; a
        model with a ``condition(**cond)`` method (like :class:`~learned_opt.generator.Gpt`) is
        conditioned once and its result called as ``(x_t, t)``.

        ``t_min`` > 0 stops the trajectory early: the last model call is at timestep ``t_min`` and
        its x0 prediction is returned (DDIM and DPM-Solver++ spread their ``steps`` over
        ``[t_min, num_steps - 1]``; DDPM runs from ``num_steps - 1`` down to ``t_min``). A model
        whose predictions at low noise are less accurate than its estimate at ``t_min`` is better
        off stopping there; 0 (the default) is the full trajectory.

        ``guidance`` w != 1 is classifier-free guidance (:mod:`learned_opt.guidance`): each step's
        prediction is ``uncond + w (cond - uncond)``, both from one model call on a doubled batch
        (the model must take ``drop_prompt``); w = 1 (the default) calls the model as without it.
        A tensor ``[B]`` gives each row its own scale (tapered guidance, :func:`~learned_opt.guidance.tapered_scale`).

        ``temperature`` scales every noise draw (x_T when it is not given, and the fresh noise of
        DDPM and of DDIM with ``eta`` > 0); the draws are made all the same, so at 1 (the default)
        the result is bit for bit that of an unscaled sampler, and a given seed's noise shrinks
        towards 0 as the temperature does.

        Tensors live on the device of ``x_T`` or of the first tensor in ``cond`` (else the
        generator's); noise is drawn on the generator's device and moved there, so a CPU generator
        gives the same draws for a model on any device. A module ``model`` is put in eval mode for
        the duration and restored after.
        """
        check_sampler(self.num_steps, method, steps, t_min)
        guidance = check_guidance(guidance) if not isinstance(guidance, torch.Tensor) else _row_scales(guidance, shape)
        temperature = check_temperature(temperature)
        if method == "ddim" and not eta >= 0.0:
            raise ConfigError(f"DDIM needs eta >= 0, got {eta}")
        shape = tuple(int(s) for s in shape)
        device, dtype = _placement(cond, x_T, generator)

        def randn() -> torch.Tensor:
            noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
            return noise if temperature == 1.0 else noise * temperature

        x = randn() if x_T is None else x_T.to(device=device, dtype=dtype)
        if tuple(x.shape) != shape:
            raise ConfigError(f"x_T has shape {list(x.shape)}, expected {list(shape)}")
        if method == "ddpm":
            timesteps = list(range(self.num_steps - 1, t_min - 1, -1))
        elif method == "dpm++2m":
            timesteps = logsnr_timesteps(self.alphas_cumprod, steps, t_min)
        else:
            timesteps = ddim_timesteps(self.num_steps, steps, t_min)
        t_batch = torch.tensor(timesteps, dtype=torch.long, device=device)[:, None].expand(-1, shape[0])

        history = None  # DPM-Solver++(2M): the previous x0 prediction and step size
        training = model if isinstance(model, nn.Module) and model.training else None  # back to training after
        if training is not None:
            training.eval()
        try:
            # A model may precompute what does not change between steps: model.condition(**cond)
            # returns an equivalent ``(x_t, t) -> x0`` (see Gpt.condition).
            if bool((torch.as_tensor(guidance) != 1.0).any()):
                denoise = guided_denoiser(model, cond, guidance)
            elif callable(condition := getattr(model, "condition", None)):
                denoise = condition(**cond)
            else:
                denoise = functools.partial(model, **cond)
            for i, t in enumerate(tqdm(timesteps, desc=f"{method} sampling", disable=not progress, leave=False)):
                x0_hat = denoise(x, t_batch[i])
                if i == len(timesteps) - 1:
                    x = x0_hat  # the clean prediction itself (with t_min = 0 the last step lands on ᾱ = 1)
                    break
                if method == "ddpm":
                    x = self._ddpm_step(x, x0_hat, t, randn)
                elif method == "dpm++2m":
                    x, history = self._dpm_step(x, x0_hat, t, timesteps[i + 1], history)
                else:
                    x = self._ddim_step(x, x0_hat, t, timesteps[i + 1], eta, randn)
        finally:
            if training is not None:
                training.train()
        return x

    def _ddpm_step(self, x: torch.Tensor, x0_hat: torch.Tensor, t: int, randn) -> torch.Tensor:
        """One ancestral step t -> t-1: a draw from the posterior q(x_{t-1} | x_t, x0_hat)."""
        abar_t, abar_prev = self._abar[t], self._abar[t - 1]
        beta_t = 1.0 - abar_t / abar_prev
        c_x0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        c_xt = math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        var = beta_t * (1.0 - abar_prev) / (1.0 - abar_t)
        return c_x0 * x0_hat + c_xt * x + math.sqrt(var) * randn()

    def _dpm_step(
        self, x: torch.Tensor, x0_hat: torch.Tensor, t: int, t_next: int, history
    ) -> tuple[torch.Tensor, tuple]:
        """One DPM-Solver++(2M) step t -> t_next: DDIM's update with a second-order x0 estimate."""
        abar_t, abar_next = self._abar[t], self._abar[t_next]
        h = 0.5 * (math.log(abar_next / (1.0 - abar_next)) - math.log(abar_t / (1.0 - abar_t)))  # Δ log(α/σ)
        d = x0_hat
        if history is not None:  # extrapolate x0 linearly in log-SNR from the previous step
            x0_prev, h_prev = history
            c = 0.5 * h / h_prev  # 1 / (2r), r = h_prev / h
            d = (1.0 + c) * x0_hat - c * x0_prev
        x = math.sqrt((1.0 - abar_next) / (1.0 - abar_t)) * x - math.sqrt(abar_next) * math.expm1(-h) * d
        return x, (x0_hat, h)

    def _ddim_step(
        self, x: torch.Tensor, x0_hat: torch.Tensor, t: int, t_prev: int, eta: float, randn
    ) -> torch.Tensor:
        """One DDIM step t -> t_prev (t_prev < t)."""
        abar_t, abar_prev = self._abar[t], self._abar[t_prev]
        eps = (x - math.sqrt(abar_t) * x0_hat) / math.sqrt(1.0 - abar_t)
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * randn()
        return x


def _placement(
    cond: Mapping[str, torch.Tensor], x_T: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype for sampling: from x_T, else the conditioning, else the generator."""
    tensors = ([x_T] if x_T is not None else []) + [v for v in cond.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else generator.device
    dtype = next((v.dtype for v in tensors if v.is_floating_point()), torch.float32)
    return device, dtype
