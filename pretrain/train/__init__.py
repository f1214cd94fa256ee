"""Train a generator on a checkpoint corpus (``learned-opt train``).

G.pt's recipe: the diffusion transformer learns to predict θ′ from noised θ′, θ and the metrics
of both (:mod:`pretrain.dataset` makes the pairs), with AdamW (decay on matrices only), a cosine
learning rate after a linear warmup, gradient clipping and an EMA copy of the weights, which is
what gets exported. bf16 autocast on CUDA.

Everything a job writes lives in ``--out``:

* ``checkpoint.pt`` — model, EMA, optimizer, scheduler, step, RNG states, config, split and
  normalisation; tensors and plain containers only (``torch.load(weights_only=True)``), written
  atomically. ``--resume`` continues it exactly: N steps in one go equal N/2 + resume + N/2, bit
  for bit on CPU. The data position is the step number (pairs are drawn from a generator seeded
  by ``(seed, step)``), so nothing about the data needs replaying;
* ``log.jsonl`` — one record per ``--log-every`` steps (loss, lr, grad norm, samples/s, held-out
  loss of the model and of its EMA every ``--eval-every`` steps) and ``loss.png`` drawn from it;
* ``{name}.safetensors`` + ``{name}.json`` — the exported EMA generator
  (:func:`learned_opt.pretrained.save_generator`), written when training reaches ``--steps``, or
  from the checkpoint with ``--export-only``.

``--output-matching W`` adds W × :meth:`~learned_opt.tasks.Task.output_divergence` of the predicted
networks (x̂0) from the targets (θ′) on task inputs drawn per step, so that the model is also
judged by how its networks behave, not only by how close their weights are. ``--label-hinge W``
adds W × how much higher their training loss is than the targets' (0 where it is not).

``--prompt-dropout P`` and ``--property-head W`` (:mod:`pretrain.train.auxiliary`) train a null
prompt for classifier-free guidance and a head that predicts a network's metric, for
``GptOptimizer(guidance=...)`` and ``GptOptimizer(candidates=N, rank="self")``.

``--init-from GENERATOR`` fine-tunes a trained generator instead of starting fresh: the model is
built from its manifest and starts at its weights (σ_p and PCA buffers included), pairs are in its
units (normalisation), the runs it held out stay held out, and the export records the source
under ``training.init_from`` (name, sha256, and the source's own ``training`` and ``corpus``
summaries), so the history of the weights stays readable.
Typical use: a short run with a new objective on the pairs the optimizer starts from
(``--output-matching``, ``--init-fraction``), as the shipped ``mnist-mlp`` generator was made.

Under ``torchrun --nproc_per_node N`` the job runs DistributedDataParallel (gloo on CPU, NCCL on
GPU): every rank draws the same global batch of ``--batch-size`` pairs and trains on its own
stride of it; only rank 0 writes files. Batches are built ahead by ``--workers`` DataLoader
processes; each is a pure function of its step, so the worker count never changes the result.

Modules: ``config`` (:class:`TrainConfig`, what a resume may change), ``finetune``
(``--init-from``), ``distributed`` (ranks, devices, RNG states), ``optim`` (AdamW, schedule, EMA,
loss weights), ``outputs`` (checkpoint, log, loss plot), ``trainer`` (:func:`train`), ``export``
(:func:`export_checkpoint`), ``cli``.
"""

from .cli import config_from_args, configure, main
from .config import CHECKPOINT_NAME, LOG_NAME, PLOT_NAME, TrainConfig, check_resumable
from .export import export_checkpoint
from .optim import Ema, lr_factor
from .outputs import load_checkpoint, read_jsonl
from .trainer import Trainer, TrainResult, train

__all__ = [
    "CHECKPOINT_NAME", "LOG_NAME", "PLOT_NAME", "Ema", "TrainConfig", "TrainResult", "Trainer", "check_resumable",
    "config_from_args", "configure", "export_checkpoint", "load_checkpoint", "lr_factor", "main", "read_jsonl", "train",
]
