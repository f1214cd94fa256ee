"""Speed of the training-pair pipeline, side by side with a naive reader, and its share of a step.

Run::

    .venv/bin/python -m pytest benchmarks/test_train_speed.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds -s

A synthetic ``mnist-mlp`` store (``LEARNED_OPT_BENCH_RUNS`` runs, default 16, of 200 checkpoints)
and batches of ``LEARNED_OPT_BENCH_BATCH`` pairs (default 256), one torch thread
(``LEARNED_OPT_BENCH_THREADS``). Groups:

* ``pairs`` — one batch of pairs: ``PairDataset.batch`` (rows grouped by run: one memory-mapped
  read per run) against a naive reader (one ``read_checkpoints`` per pair and checkpoint, the
  permutation applied pair by pair), both without and with augmentation. The ratio naive / grouped
  is printed.
* ``step`` — the data of one step against one ``tiny`` training step on that batch (the model's
  forward, backward and AdamW step), to show how much of a CPU step the data costs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from train_helpers import make_store  # noqa: E402

from learned_opt.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from learned_opt.generator import build_generator  # noqa: E402
from learned_opt.layout import Layout  # noqa: E402
from pretrain.dataset import PairBatch, PairConfig, PairSampler, open_pairs  # noqa: E402

RUNS = int(os.environ.get("LEARNED_OPT_BENCH_RUNS", "16"))
BATCH = int(os.environ.get("LEARNED_OPT_BENCH_BATCH", "256"))
THREADS = int(os.environ.get("LEARNED_OPT_BENCH_THREADS", "1"))
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("bench") / "store"
    make_store(root, runs=RUNS, checkpoints=200)
    return open_pairs(root, PairConfig(heldout_fraction=0.0))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(THREADS)


def naive_batch(corpus, indices, perms) -> PairBatch:
    """The baseline: every pair read and permuted on its own."""
    ds, norm, thetas, nexts, m, t = corpus.train, corpus.normalization, [], [], [], []
    for pos, k in enumerate(indices.tolist()):
        run, i, j = ds.pair(k)
        a, b = ds.store.read_checkpoints(run, [i]), ds.store.read_checkpoints(run, [j])  # [1, P] each
        if perms is not None:
            own = [q[pos : pos + 1] for q in perms]
            a, b = ds.task.permute(a, own), ds.task.permute(b, own)
        thetas.append(a)
        nexts.append(b)
        m.append(ds.metric_values[run][i])
        t.append(ds.metric_values[run][j])
    raw_m, raw_t = torch.stack(m), torch.stack(t)
    return PairBatch(norm.params(torch.cat(thetas)), norm.params(torch.cat(nexts)), norm.metric(raw_m),
                     norm.metric(raw_t), raw_m, raw_t)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("reader", ["grouped", "naive"])
def test_pair_batch(benchmark, corpus, reader, augment):
    benchmark.group = f"pairs ({'augmented' if augment else 'plain'})"
    sampler = PairSampler(len(corpus.train), BATCH, seed=0, task=corpus.task, augment=augment)
    indices, perms = sampler.global_batch(0)
    fn = corpus.train.batch if reader == "grouped" else (lambda i, p: naive_batch(corpus, i, p))
    out = benchmark(fn, indices, perms)
    reference = corpus.train.batch(indices, perms)
    assert torch.equal(out.theta, reference.theta) and torch.equal(out.theta_next, reference.theta_next)
    RESULTS[f"{reader}-{augment}"] = benchmark.stats.stats.median
    other = RESULTS.get(f"{'naive' if reader == 'grouped' else 'grouped'}-{augment}")
    if other is not None:
        naive, grouped = (other, RESULTS[f"{reader}-{augment}"]) if reader == "grouped" else (RESULTS[f"{reader}-{augment}"], other)
        print(f"\n[pairs {'augmented' if augment else 'plain'}, B={BATCH}] naive / grouped = {naive / grouped:.1f}x "
              f"({BATCH / grouped:.0f} pairs/s grouped)")


@pytest.mark.parametrize("part", ["data", "train-step"])
def test_step_share(benchmark, corpus, part):
    benchmark.group = "step (tiny preset, CPU)"
    sampler = PairSampler(len(corpus.train), BATCH, seed=0, task=corpus.task)
    model = build_generator(Layout(corpus.store.signature, 1000), "tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = Diffusion(DiffusionConfig())
    batch = corpus.train.batch(*sampler.global_batch(0))

    def step():
        loss = diffusion.training_loss(model, batch.theta_next, batch.cond(), generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    benchmark(step if part == "train-step" else (lambda: corpus.train.batch(*sampler.global_batch(1))))
    RESULTS[part] = benchmark.stats.stats.median
    if "data" in RESULTS and "train-step" in RESULTS:
        print(f"\n[step, B={BATCH}] data / model step = {RESULTS['data'] / RESULTS['train-step']:.2f}")
