"""The denoising check: how well the generator predicts θ′ from a noised θ′, against returning θ."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from learned_opt.pretrained import LoadedGenerator

from ..store import Store
from .config import EvalConfig


DENOISE_TIMESTEPS = (999, 700, 400, 200, 100, 30, 5)  # on a 1000-step schedule; rescaled to the generator's
DENOISE_NOISE_SEED = 0


def denoise_timesteps(num_steps: int) -> list[int]:
    """:data:`DENOISE_TIMESTEPS` scaled to a ``num_steps`` schedule (``round(t (num_steps - 1) / 999)``),
    deduplicated, from the noisiest down."""
    out: list[int] = []
    for t in DENOISE_TIMESTEPS:
        s = round(t * (num_steps - 1) / 999)
        if s not in out:
            out.append(s)
    return out


_SPLIT_WORDS = {"heldout": "held-out", "train": "training"}


def measure_denoising(gen: LoadedGenerator, store: Store | None, config: EvalConfig, split: str = "heldout") -> dict:
    """How well the generator predicts θ′ from a noised θ′ on held-out corpus runs, against returning θ.

    Pairs: the first checkpoint (θ, the init) and the last (θ′) of up to ``config.denoise_runs``
    runs that the generator's training split held out (``split="train"``: runs it trained on, to
    tell overfitting from underfitting), conditioned on both metrics as in training.
    In generator units, at each of :func:`denoise_timesteps`: ``x_t = q_sample(θ′, t, ε)`` (one
    fixed draw of ε, shared by every t) and the model's x0 prediction, called as
    :meth:`~learned_opt.diffusion.Diffusion.sample` calls it (model in eval mode, no gradients).
    """
    ids = ((gen.manifest.get("corpus") or {}).get("split") or {}).get(split) or []
    if config.denoise_runs == 0:
        return {"skipped": "--denoise-runs 0: denoising check not run"}
    if store is None:
        return {"skipped": "no --store given: denoising check not run"}
    if not ids:
        return {"skipped": f"the generator's manifest records no {_SPLIT_WORDS[split]} runs (corpus.split.{split}): "
                           "denoising check not run"}
    runs, theta, target, metric, prompt = [], [], [], [], []
    for r in (int(r) for r in ids):
        if len(runs) == config.denoise_runs:
            break
        if not store.has_run(r):
            continue
        _, metrics = store.read_metrics(r)
        values = metrics.get(gen.metric_name)
        if values is None or len(values) < 2:
            continue
        pair = store.read_checkpoints(r, [0, len(values) - 1])  # [2, P]
        runs.append(r)
        theta.append(pair[0])
        target.append(pair[1])
        metric.append(values[0])
        prompt.append(values[-1])
    if not runs:
        return {"skipped": f"none of the {len(ids)} {_SPLIT_WORDS[split]} runs of the generator's split is in --store "
                           f"(with {gen.metric_name!r} and two checkpoints): denoising check not run"}
    norm, model, diffusion = gen.normalization, gen.model, gen.diffusion
    dev, dtype = gen.device, next(model.parameters()).dtype
    theta_n = norm.params(torch.stack(theta).to(dtype))  # [N, P] generator units
    target_n = norm.params(torch.stack(target).to(dtype))  # [N, P]
    metric_n = norm.metric(torch.stack(metric).to(dtype))  # [N]
    prompt_n = norm.metric(torch.stack(prompt).to(dtype))  # [N]
    noise = torch.randn(theta_n.shape, generator=torch.Generator().manual_seed(DENOISE_NOISE_SEED), dtype=dtype)
    timesteps = denoise_timesteps(diffusion.num_steps)
    sq_err = torch.zeros(len(timesteps), dtype=torch.float64)  # summed over pairs and parameters
    cos = torch.zeros(len(timesteps), dtype=torch.float64)  # summed over pairs
    identity = ((theta_n.double() - target_n.double()) ** 2).sum()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(runs), config.sample_batch):
                sl = slice(s, s + config.sample_batch)
                th, x0 = theta_n[sl].to(dev), target_n[sl].to(dev)
                cond = dict(theta=th, metric=metric_n[sl].to(dev), target=prompt_n[sl].to(dev))
                if callable(getattr(model, "condition", None)):  # as Diffusion.sample conditions the model
                    denoise = model.condition(**cond)
                else:
                    denoise = functools.partial(model, **cond)
                for i, t in enumerate(timesteps):
                    t_batch = torch.full((th.shape[0],), t, dtype=torch.long, device=dev)
                    pred = denoise(diffusion.q_sample(x0, t_batch, noise[sl].to(dev)), t_batch).double()
                    sq_err[i] += float(((pred - x0.double()) ** 2).sum())
                    cos[i] += float(F.cosine_similarity(pred - th.double(), x0.double() - th.double(), dim=1).sum())
    finally:
        model.train(was_training)
    count = theta_n.numel()
    x0_mse = (sq_err / count).tolist()
    identity_mse = float(identity / count)
    return {
        "runs_used": len(runs),
        "split": split,
        "run_ids": runs,
        "timesteps": timesteps,
        "num_steps": diffusion.num_steps,
        "x0_mse": x0_mse,
        "identity_mse": [identity_mse] * len(timesteps),
        "ratio": [m / identity_mse if identity_mse > 0 else None for m in x0_mse],
        "cosine": (cos / len(runs)).tolist(),
        "noise_seed": DENOISE_NOISE_SEED,
        "corpus_store": (gen.manifest.get("corpus") or {}).get("store"),
        "what_it_means": "x0 MSE of the generator's prediction of θ′ (last checkpoint) from x_t = q_sample(θ′, t) "
                         f"given θ (first checkpoint) and both metrics, on {split} corpus runs, in generator units, "
                         "over the MSE of returning θ: below 1 the generator does better than returning θ; "
                         "cosine: of (prediction - θ) with (θ′ - θ), 1 is the right direction",
    }
