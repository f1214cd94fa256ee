"""Train many networks at once with randomized hyperparameters and store their checkpoints.

Each run ``r`` has the seed ``base_seed + r`` (stored with the run), from which everything about it
follows, so any run can be reproduced exactly: its hyperparameters (``random.Random(seed)``), its
initialisation (``torch.manual_seed(seed); task.build_model()``: PyTorch's default init), the order
in which it sees the training data (a fresh permutation every epoch, as a shuffling ``DataLoader``
would) and which iterations it saves.

Hyperparameter ranges (:class:`HParamRanges`, one draw per run; ``--gpt-recipe`` fixes G.pt's):

==================  ===========================================  ==================================
hyperparameter      default range                                G.pt's recipe (``--gpt-recipe``)
==================  ===========================================  ==================================
optimizer           SGD with Nesterov momentum, or Adam (1:1)    SGD Nesterov
learning rate       SGD log-uniform [0.01, 0.3];                 0.1
                    Adam log-uniform [3e-4, 1e-2]
momentum            uniform [0.8, 0.95] (Adam: beta1;            0.9
                    beta2 = 0.999, eps = 1e-8)
weight decay        0 with probability 0.1, else                 5e-4
                    log-uniform [1e-5, 1e-3] (L2, as torch.optim)
batch size          one of 64, 128, 256                          128
epochs              one of 5, 10, 15, 20, 25 (``--epochs``       25
                    overrides it for every run)
schedule            cosine, stepped per epoch (G.pt's)           cosine per epoch
==================  ===========================================  ==================================

Each run saves ``K = 200`` checkpoints: the initialisation (step 0), 198 distinct random
iterations, and the final step; a run with fewer than 200 steps saves every step. Step ``t`` means
"after ``t`` updates". Every checkpoint is evaluated with the task's batched ``evaluate`` (for
``mnist-mlp``: ``train_loss``, ``test_loss``, ``test_error``). A run whose weights become
non-finite or exceed ``|w| > 10`` (G.pt's filter) is dropped, recorded in the store so a resumed job
skips it, and counted.

How runs are trained together: runs are grouped by batch size (so that their steps align) and
trained ``--batch-runs`` at a time (:class:`BatchedTrainer`), each run with its own learning rate,
momentum, weight decay, optimizer and data order. The gradients of any model come through
``torch.func`` (``functional_call`` + ``grad``, ``vmap``-ed over the runs or called per run,
whichever measures faster on the first step); ReLU MLPs built from ``learned_opt.tasks.MLP`` take
a hand-written batched forward/backward (batched matmuls), which measures about 2x faster
(``benchmarks/test_corpus_speed.py``). Models with buffers (BatchNorm) are refused. A run that finishes
(fewer epochs) or diverges leaves the batch; the others continue.

``--train-examples N`` trains on the first ``N`` training images only (quick corpora and tests);
evaluation always uses the task's own sets. The store records these settings (seed, epochs,
recipe, training examples, checkpoints, hyperparameter ranges) when it is created; a later call
into the same store must use the same ones (only ``--runs`` may differ, to grow the corpus).
Under ``torchrun --nproc_per_node W``, rank ``r`` trains the run ids with ``run_id % W == r`` into
one shared store; rank 0 creates it.

Task families. Everything above except the training itself (run ids and seeds, resume, settings
check, sharding, evaluation of the checkpoints, the ``|w| > 10`` filter's markers, writing, the
progress bar) is shared by every task; what is particular to a family of tasks is a
:class:`TaskFamily`: its settings, its run plans, how plans are grouped, and a function that trains
one group and hands back :class:`FinishedRun` objects, chosen by the task's kind:
:class:`SupervisedFamily` trains any supervised task as above (its ``corpus_ranges`` replace the
default ranges); :class:`PPOFamily` trains control tasks' policies with batched PPO
(``--env-steps N`` instead of ``--epochs``; its ranges are documented in
:mod:`pretrain.corpus.ppo_family`).

Modules: ``plan`` (hyperparameter draws and run plans), ``gradients`` (batched gradients: the
hand-written ReLU-MLP path and ``torch.func`` for any model), ``trainer`` (the batched trainer and
its reference loop), ``warm`` (runs that start from a generator's update), ``family`` / ``supervised_family`` / ``ppo_family`` (task families),
``config`` (:class:`CorpusConfig`), ``build`` (:func:`build_corpus`), ``cli`` (the command line).
"""

from learned_opt.recipes import ADAM, GPT_RECIPE, OPTIMIZERS, SGD, cosine_lr

from .build import accept_settings, build_corpus, check_settings, corpus_settings, families, family_for
from .cli import configure, main
from .config import CorpusConfig, CorpusSummary
from .family import WEIGHT_LIMIT, FinishedRun, TaskFamily
from .gradients import FunctionalGradient, MLPGradient, batched_gradient
from .plan import HParamRanges, RunPlan, plan_runs, sample_hparams
from .supervised_family import SupervisedFamily
from .trainer import BatchedTrainer, epoch_frac, train_run_reference
from .warm import WarmStart
from .ppo_family import CORPUS_SHAPE, PPOFamily, PPORanges, PPORunPlan, sample_ppo_hparams, train_ppo_runs

__all__ = [
    "ADAM", "CORPUS_SHAPE", "GPT_RECIPE", "OPTIMIZERS", "SGD", "WEIGHT_LIMIT", "BatchedTrainer", "CorpusConfig",
    "CorpusSummary", "FinishedRun", "FunctionalGradient", "HParamRanges", "MLPGradient", "PPOFamily", "PPORanges", "PPORunPlan",
    "RunPlan", "SupervisedFamily", "TaskFamily", "WarmStart", "accept_settings", "batched_gradient", "build_corpus", "check_settings", "configure", "corpus_settings",
    "cosine_lr", "epoch_frac", "families", "family_for", "main", "plan_runs", "sample_hparams",
    "sample_ppo_hparams", "train_ppo_runs", "train_run_reference",
]
