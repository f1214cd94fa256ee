"""The auxiliary objectives of generator training, each off by default.

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
* ``--output-matching W`` and ``--label-hinge W`` (:class:`OutputObjectives`) judge the networks the
  model predicts (x̂0) by how they behave on training inputs drawn per step: the divergence of their
  outputs from the targets' (θ′), and how much higher their training loss is than the targets' (0
  where it is not higher), so that a prediction is not worse than the checkpoint it predicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learned_opt.generator import Gpt
from learned_opt.normalization import Normalization
from learned_opt.tasks import Task

from ..dataset import PairBatch, seeded_generator
from .config import TrainConfig
from .distributed import DistInfo, mean_over_ranks


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


class OutputObjectives:
    """``--output-matching`` and ``--label-hinge``: the task's training inputs (and labels, for the
    hinge) on the device, and each objective's unweighted value summed between log records."""

    def __init__(self, task: Task, config: TrainConfig, normalization: Normalization, device: torch.device):
        data = task.load_data(config.data_root)
        self.task, self.config, self.normalization = task, config, normalization
        self.labels = task.matching_labels(data).to(device) if config.label_hinge > 0 else None  # refused first
        self.inputs = task.matching_inputs(data).to(device)
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device)
                     for name, weight in (("output_divergence", config.output_matching),
                                          ("label_excess", config.label_hinge)) if weight > 0}

    def loss_fn(self, step: int, rank: int):
        """The extra loss of step ``step`` on rank ``rank``, as ``Diffusion.training_loss`` calls it:
        ``(x̂0, θ′, t) -> loss``, on ``matching_examples`` inputs drawn for that step and rank."""
        cfg, inputs = self.config, self.inputs
        draw = seeded_generator("matching", cfg.seed, step, rank, device=inputs.device)
        idx = torch.randint(0, inputs.shape[0], (cfg.matching_examples,), generator=draw, device=inputs.device)

        def loss(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            total = torch.zeros((), device=inputs.device)
            with torch.autocast(inputs.device.type, enabled=False):  # softmaxes: in fp32 under bf16 training
                predicted, target = self.normalization.unparams(pred), self.normalization.unparams(x0)
                if cfg.output_matching > 0:
                    divergence = self.task.output_divergence(predicted, target, inputs[idx]).mean()
                    self.sums["output_divergence"] += divergence.detach().double()
                    total = total + cfg.output_matching * divergence
                if cfg.label_hinge > 0:
                    excess = self.task.excess_loss(predicted, target, inputs[idx], self.labels[idx]).mean()
                    self.sums["label_excess"] += excess.detach().double()
                    total = total + cfg.label_hinge * excess
            return total

        return loss

    def log_record(self, steps: int, info: DistInfo) -> dict[str, float]:
        """Each objective's mean over the last ``steps`` steps and the ranks; the sums start again."""
        record = {name: float(mean_over_ranks(total, info)) / steps for name, total in self.sums.items()}
        for total in self.sums.values():
            total.zero_()
        return record
