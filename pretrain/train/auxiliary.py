"""The two auxiliary objectives of generator training, each off by default.

* ``--prompt-dropout P`` (classifier-free guidance, Ho & Salimans 2022): in a share P of the
  training pairs, drawn per step and rank from a stream of their own, the prompt's tokens (l′ and
  l′ − l) are replaced by the model's learned null prompt, so that one network learns both the
  prompted prediction and the one without a prompt (given θ and l) that guidance extrapolates
  away from (:mod:`learned_opt.guidance`).
* ``--property-head W`` (self-ranking, as STGG+'s property predictor): the model's property head
  predicts the metric of both clean checkpoints of every pair (θ with l, θ′ with l′, in generator
  units) and W × the mean squared error of those predictions, on the normalised metric, is added
  to the diffusion loss. The head reads the θ encoder's tokens, which it shares with the diffusion
  model. ``GptOptimizer(candidates=N, rank="self")`` then keeps the sample it predicts best.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learned_opt.generator import Gpt

from ..dataset import PairBatch, seeded_generator
from .config import TrainConfig


def training_cond(batch: PairBatch, config: TrainConfig, step: int, rank: int) -> dict[str, torch.Tensor]:
    """The model's conditioning for one training step: the batch's, and with ``prompt_dropout`` > 0
    the rows whose prompt is dropped (``drop_prompt``, ``[B]`` bool)."""
    cond = batch.cond()
    if config.prompt_dropout > 0:
        device = batch.theta.device
        draw = seeded_generator("prompt-dropout", config.seed, step, rank, device=device)
        cond["drop_prompt"] = torch.rand(len(batch), generator=draw, device=device) < config.prompt_dropout
    return cond


def property_loss(model: Gpt, batch: PairBatch) -> torch.Tensor:
    """Mean squared error of the property head's normalised metric on both checkpoints of each pair."""
    predicted = model.predict_metric(torch.cat([batch.theta, batch.theta_next]))  # [2B]
    return F.mse_loss(predicted.float(), torch.cat([batch.metric, batch.target]).float())
