"""The property head check: how well the generator's own metric prediction ranks networks.

A generator trained with ``--property-head`` predicts the metric of a parameter vector
(:meth:`~learned_opt.pretrained.LoadedGenerator.predict_metric`), which is what
``GptOptimizer(candidates=N, rank="self")`` keeps the best sample by. Ranking needs the order
right, not the values, so the measure is Spearman's rank correlation between predicted and true
metric:

* on **held-out corpus checkpoints**: up to ``PER_RUN`` evenly spaced checkpoints of each of up to
  ``--denoise-runs`` runs that the generator's training split held out (the denoising check's
  runs), against the metric the corpus recorded for them (needs ``--store``);
* on **generated samples**: the one-step updates of the fresh inits and the prompt-alignment
  samples (many prompts per init, so a wide range of metrics), against their measured metric; for
  the latter also the mean of the correlations within each init's samples.
"""

from __future__ import annotations

import torch

from learned_opt.pretrained import LoadedGenerator

from ..store import Store
from .config import EvalConfig
from .metrics import spearman

PER_RUN = 8  # checkpoints per held-out run, evenly spaced from the first to the last


def predict(gen: LoadedGenerator, theta: torch.Tensor, batch: int) -> torch.Tensor:
    """The property head's metric for networks ``theta`` [N, P] (raw units) -> ``[N]`` on the CPU."""
    return torch.cat([gen.predict_metric(t.to(gen.device)).float().cpu() for t in theta.split(batch)])


def heldout_checkpoints(gen: LoadedGenerator, store: Store | None, config: EvalConfig) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Checkpoints ``[M, P]`` of the generator's held-out runs in ``store`` and their recorded
    metric ``[M]``, or why there are none."""
    ids = ((gen.manifest.get("corpus") or {}).get("split") or {}).get("heldout") or []
    if store is None or config.denoise_runs == 0 or not ids:
        return "no --store, --denoise-runs 0 or no held-out runs recorded in the manifest"
    theta, truth, runs = [], [], 0
    for r in (int(r) for r in ids):
        if runs == config.denoise_runs:
            break
        if not store.has_run(r):
            continue
        values = store.read_metrics(r)[1].get(gen.metric_name)
        if values is None or len(values) < 1:
            continue
        k = len(values)
        rows = sorted({round(i * (k - 1) / max(PER_RUN - 1, 1)) for i in range(PER_RUN)})
        theta.append(store.read_checkpoints(r, rows))
        truth.append(values[rows].float())
        runs += 1
    if not runs:
        return f"none of the {len(ids)} held-out runs of the generator's split is in --store"
    return torch.cat(theta), torch.cat(truth)


def measure_property_head(gen: LoadedGenerator, store: Store | None, config: EvalConfig,
                          one_step: tuple[torch.Tensor, torch.Tensor],
                          prompted: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Spearman's correlation of the head's predictions with the true metric: on held-out corpus
    checkpoints, the one-step samples ``(θ′ [N, P], metric [N])`` and the prompt-alignment samples
    ``(θ′ [N, K, P], metric [N, K])``."""
    if not gen.has_property_head:
        return {"skipped": "the generator has no property head (train with --property-head)"}
    out: dict = {"metric": gen.metric_name}
    corpus = heldout_checkpoints(gen, store, config)
    if isinstance(corpus, str):
        out["heldout_checkpoints"] = {"skipped": corpus}
    else:
        theta, truth = corpus
        pred = predict(gen, theta, config.sample_batch)
        out["heldout_checkpoints"] = {"spearman": spearman(pred, truth), "count": len(truth),
                                      "mean_abs_error": float((pred - truth).abs().mean())}
    theta, truth = one_step
    pred = predict(gen, theta, config.sample_batch)
    out["generated_one_step"] = {"spearman": spearman(pred, truth), "count": len(truth),
                                 "mean_abs_error": float((pred - truth).abs().mean())}
    theta, truth = prompted
    n, k = truth.shape
    pred = predict(gen, theta.reshape(n * k, -1), config.sample_batch).view(n, k)
    within = [c for c in (spearman(pred[i], truth[i]) for i in range(n)) if c is not None]
    out["generated_prompt_alignment"] = {
        "spearman": spearman(pred, truth), "count": n * k,
        "mean_abs_error": float((pred - truth).abs().mean()),
        "within_init_spearman_mean": sum(within) / len(within) if within else None,
    }
    out["what_it_means"] = ("Spearman's rank correlation between the property head's predicted "
                            f"{gen.metric_name} and the true one (1: it orders networks perfectly, which is what "
                            "rank='self' needs); held-out checkpoints: the corpus's recorded metric; generated: "
                            "measured as in the sections above")
    return out
