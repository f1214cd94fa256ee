"""Prompted updates with one generator: repeated best-prompt updates and prompt alignment."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from learned_opt.errors import ConfigError
from learned_opt.pretrained import LoadedGenerator
from learned_opt.proposal import meets
from learned_opt.selection import check_candidates, check_rank
from learned_opt.tasks import Task

from .config import EvalConfig
from .metrics import r2_score
from .property import predict


class Sampler:
    """Batched prompted updates with one generator: raw θ, metric and prompt in, raw θ′ out.

    With ``candidates`` > 1 each update draws that many samples and keeps the one ``score`` (the
    generator's metric on validation data, ``[M, P]`` -> ``[M]``) rates best, or with the config's
    ``rank="self"`` the one the generator's property head predicts best (no ``score`` needed).
    """

    def __init__(self, generator: LoadedGenerator, config: EvalConfig, seed: int,
                 score: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.gen, self.config, self.score = generator, config, score
        self.rng = torch.Generator().manual_seed(seed)  # CPU noise: same draws on any device
        self.lo, self.hi = generator.metric_range
        # the sampler actually used: the config's choices over the generator's own
        self.settings = {**generator.sampler(config.method, config.sampling_steps, config.t_min, config.guidance,
                                           config.temperature, config.guidance_taper),
                         "candidates": config.candidates, "rank": config.rank, "keep_if_met": config.keep_if_met}
        check_rank(config.rank, generator)
        check_candidates(config.candidates, self.settings["temperature"], "--temperature")
        if config.rank == "self":
            self.score = lambda flat: predict(generator, flat, config.sample_batch)
        elif config.candidates > 1 and score is None:
            raise ConfigError("--candidates needs validation data to choose among the samples")

    def clamp(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt.clamp(self.lo, self.hi)

    def __call__(self, theta: torch.Tensor, metric: torch.Tensor, prompt: torch.Tensor,
                 candidates: int | None = None, rng: torch.Generator | None = None) -> torch.Tensor:
        """``[B, P]``, ``[B]``, ``[B]`` -> ``[B, P]`` (prompts clamped into the metric range); ``candidates``
        (default: the configured number) samples per row, the best by ``score`` kept."""
        c = self.config.candidates if candidates is None else candidates
        if c > 1:
            theta, metric, prompt = (v.repeat_interleave(c, 0) for v in (theta, metric, prompt))
        dev, s = self.gen.device, self.settings
        out = []
        for i in range(0, theta.shape[0], self.config.sample_batch):
            sl = slice(i, i + self.config.sample_batch)
            out.append(self.gen.sample(
                theta[sl].to(dev), metric[sl].to(dev), self.clamp(prompt[sl]).to(dev),
                steps=s["steps"], method=s["method"], t_min=s["t_min"], guidance=s["guidance"],
                temperature=s["temperature"], guidance_taper=s["guidance_taper"], generator=rng or self.rng,
            ).cpu())
        out = torch.cat(out)
        if c == 1:
            return out
        scores = self.score(out).view(-1, c)  # [B, C]
        if self.gen.metric_direction == "min":  # a non-finite score never wins
            best = torch.nan_to_num(scores, nan=float("inf"), neginf=float("inf")).argmin(1)
        else:
            best = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("-inf")).argmax(1)
        return out.view(-1, c, out.shape[-1])[torch.arange(scores.shape[0]), best]


Measure = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def prompt_alignment(sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], theta: torch.Tensor,
                     metric: torch.Tensor, best_prompt: float, k: int,
                     measure: Callable[[torch.Tensor], torch.Tensor],
                     clamp: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """G.pt's prompt alignment: each network ``theta`` [N, P] at ``metric`` [N] updated once for
    each of ``k`` prompts evenly spaced from ``best_prompt`` to its own metric (``clamp``-ed into the
    generator's range) by ``sample(θ, metric, prompt) -> θ′``, and the achieved metric measured by
    ``measure`` ([M, P] -> [M]): ``prompts`` [N, K], the updated networks ``theta`` [N, K, P], their
    ``achieved`` metric [N, K] and ``r2`` per network [N]."""
    n = theta.shape[0]
    frac = torch.linspace(0, 1, k)  # [K]
    prompts = clamp(best_prompt + frac[None, :] * (metric[:, None] - best_prompt))  # [N, K]
    out = sample(theta.repeat_interleave(k, 0), metric.repeat_interleave(k), prompts.reshape(-1))  # [N*K, P]
    achieved = measure(out).view(n, k)
    return {"prompts": prompts, "theta": out.view(n, k, -1), "achieved": achieved, "r2": r2_score(prompts, achieved)}


def measure_metrics(task: Task, flat: torch.Tensor, data, device, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The metrics ``names`` of ``[B, P]`` networks, on the CPU: name -> ``[B]``."""
    m = task.evaluate(flat.to(device), data, list(names))
    return {k: v.float().cpu() for k, v in m.items()}


def repeated_updates(sampler: Sampler, theta: torch.Tensor, measure: Measure, n: int, metric: str) -> tuple[dict, torch.Tensor]:
    """Metrics after 0..n successive best-prompt updates, ``{name: [n+1, B]}``, and θ after the first
    update ``[B, P]``. Each update is conditioned on ``metric`` measured after the previous one; with
    the config's ``keep_if_met`` (as in ``GptOptimizer``) a network whose metric already meets the
    prompt keeps θ and draws no sample."""
    m = measure(theta)
    hist = {k: [v] for k, v in m.items()}
    prompt = torch.full((theta.shape[0],), sampler.gen.best_prompt)
    first = None
    for _ in range(n):
        todo = torch.arange(theta.shape[0])
        if sampler.config.keep_if_met:
            todo = (~meets(m[metric], sampler.clamp(prompt), sampler.gen.metric_direction)).nonzero().flatten()
        theta = theta.clone()
        if len(todo):
            theta[todo] = sampler(theta[todo], m[metric][todo], prompt[todo])
        first = theta if first is None else first
        m = measure(theta)
        for k, v in m.items():
            hist[k].append(v)
    return {k: torch.stack(v) for k, v in hist.items()}, first
