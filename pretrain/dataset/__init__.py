"""Training pairs for the generator: ``(θ_i, l_i) -> (θ_j, l_j)`` from one run of a corpus store.

What a pair is (G.pt's recipe):

* two checkpoints of the **same run**, ``i < j`` with gap ``j - i`` in ``1..max_gap`` checkpoint
  indices (G.pt: ``1..199``). Every such ordered pair of a run is one dataset item, so a run of
  ``K`` checkpoints holds ``sum_i min(max_gap, K-1-i)`` pairs (19,900 for ``K = 200``), and drawing
  items uniformly draws G.pt's "``s`` uniform in 1..199" weighted by how many starts allow it;
* conditioned on the metric of both checkpoints (``metric`` = ``l_i``, ``target`` = ``l_j``);
* in the generator's units (:class:`~learned_opt.normalization.Normalization`): parameters times
  ``0.538 / std(θ)``, metrics mapped so the corpus's range becomes ``[0, 1]``;
* augmented with **one** random permutation of hidden units applied to both ``θ_i`` and ``θ_j``
  (the task's ``random_permutations`` / ``permute``), drawn per pair from a seeded generator.

Two departures are optional (default 0 = G.pt): ``PairConfig.init_fraction``, a fixed share of
every batch drawn from the pairs that start at the initialisation (checkpoint 0) — uniform
drawing gives them about 1 % of the batches, while a random initialisation is where the one-step
use of the generator starts —; and ``PairConfig.late_fraction``, a share drawn from the pairs that
start in the second half of their run: the small, precise updates of networks already well
trained, which periodic use late in training asks for.

Runs are split into a training and a held-out part **by run id**, deterministically: a run is
held out when a hash of ``(split_seed, run_id)`` falls below ``heldout_fraction`` (at least one run
is held out when the store has two or more and the fraction is positive). A hash, rather than a
shuffle, keeps every run on its side when more runs are added to the store later.

The normalisation comes from the **training split only**: the metric range is the exact minimum
and maximum over all training checkpoints (metrics are small and read in full), the parameter std
is pooled over a seeded sample of training checkpoints (``std_sample_runs`` runs, up to
``std_sample_rows`` evenly spaced checkpoints each), so that computing it costs a few megabytes
whatever the corpus size.

Only the rows a batch needs are read (``Store.read_checkpoints``), so a corpus larger than memory
trains. Sampling is with replacement from a generator seeded by ``(seed, step)``: the position in
the data is the step number alone, which makes resuming exact and lets every rank of a
distributed job draw the same global batch and take its own stride of it.

Modules: ``config`` (:class:`PairConfig`), ``split`` (derived seeds, the run split), ``pairs``
(store reads, :class:`PairDataset`), ``sampling`` (:class:`PairSampler`, :class:`StepBatches`),
``corpus`` (:func:`open_pairs`).
"""

from .config import GPT_MAX_GAP, PairConfig
from .corpus import PairCorpus, open_pairs, open_store, param_std_estimate
from .pairs import PairBatch, PairDataset, num_pairs_in_run, read_run_metrics
from .sampling import PairSampler, StepBatches
from .split import Split, derive_seed, seeded_generator, split_runs

__all__ = [
    "GPT_MAX_GAP",
    "PairBatch",
    "PairConfig",
    "PairCorpus",
    "PairDataset",
    "PairSampler",
    "Split",
    "StepBatches",
    "derive_seed",
    "num_pairs_in_run",
    "open_pairs",
    "open_store",
    "param_std_estimate",
    "read_run_metrics",
    "seeded_generator",
    "split_runs",
]
