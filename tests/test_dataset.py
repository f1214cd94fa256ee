"""Training pairs from a store: split, indexing, values, normalisation, augmentation, bad input."""

from __future__ import annotations

import pytest
import torch
from train_helpers import make_store

from learned_opt import tasks
from learned_opt.errors import ConfigError, LearnedOptError, StoreError
from learned_opt.normalization import GPT_TARGET_STD
from pretrain.dataset import (
    PairConfig,
    PairSampler,
    num_pairs_in_run,
    open_pairs,
    open_store,
    split_runs,
)
from pretrain.store import Store


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs") / "store"
    make_store(root, runs=5, checkpoints=6)
    return root


# ------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_stable_when_runs_are_added():
    ids = list(range(40))
    a, b = split_runs(ids, 0.25, seed=3), split_runs(list(reversed(ids)), 0.25, seed=3)
    assert a == b
    assert set(a.train).isdisjoint(a.heldout) and set(a.train) | set(a.heldout) == set(ids)
    assert 1 <= len(a.heldout) < len(ids)
    assert split_runs(ids, 0.25, seed=4) != a  # the seed matters
    grown = split_runs(ids + list(range(40, 80)), 0.25, seed=3)
    assert set(a.heldout) <= set(grown.heldout) and set(a.train) <= set(grown.train)


def test_split_holds_out_one_run_of_a_small_store_and_never_all():
    assert len(split_runs([7, 8], 0.1).heldout) == 1
    assert split_runs([7], 0.5).train == (7,)
    assert split_runs([1, 2, 3], 0.0).heldout == ()
    assert len(split_runs(range(5), 0.99).train) == 1


# ------------------------------------------------------------------------------ indexing and values


def test_every_pair_within_the_gap_is_indexed_exactly_once(store_dir):
    corpus = open_pairs(store_dir, PairConfig(max_gap=3, heldout_fraction=0.2))
    ds = corpus.train
    expected = {(r, i, j) for r in ds.run_ids for i in range(6) for j in range(i + 1, min(i + 3, 5) + 1)}
    got = [ds.pair(k) for k in range(len(ds))]
    assert len(got) == len(set(got)) == len(expected) == len(ds.run_ids) * num_pairs_in_run(6, 3)
    assert set(got) == expected
    with pytest.raises(IndexError):
        ds.pair(len(ds))
    assert num_pairs_in_run(200, 199) == 19900  # G.pt: every ordered pair of a 200-checkpoint run


def test_batch_holds_the_normalised_checkpoints_and_metrics_of_its_pairs(store_dir):
    corpus = open_pairs(store_dir, PairConfig(heldout_fraction=0.2))
    ds, norm, store = corpus.train, corpus.normalization, corpus.store
    indices = [0, len(ds) - 1, 7, 7]
    batch = ds.batch(indices)
    assert batch.theta.shape == batch.theta_next.shape == (4, store.num_params)
    for pos, k in enumerate(indices):
        run, i, j = ds.pair(k)
        rows = store.read_checkpoints(run, [i, j])
        torch.testing.assert_close(batch.theta[pos], norm.params(rows[0]), rtol=0, atol=0)
        torch.testing.assert_close(batch.theta_next[pos], norm.params(rows[1]), rtol=0, atol=0)
        metric = store.read_metrics(run)[1]["test_loss"]
        assert batch.raw_metric[pos] == metric[i] and batch.raw_target[pos] == metric[j]
        torch.testing.assert_close(batch.target[pos], norm.metric(metric[j]))
    assert (batch.raw_target < batch.raw_metric).all()  # synthetic metrics decrease along a run
    item = ds[3]
    assert set(item) == {"theta", "theta_next", "metric", "target", "raw_metric", "raw_target"}
    assert item["theta"].shape == (store.num_params,) and item["metric"].dim() == 0


def test_batch_reads_only_the_rows_it_needs_once_per_run(store_dir, monkeypatch):
    corpus = open_pairs(store_dir, PairConfig(heldout_fraction=0.2))
    calls = []
    original = Store.read_checkpoints

    def spy(self, run_id, index):
        calls.append((run_id, sorted(torch.as_tensor(index).tolist())))
        return original(self, run_id, index)

    monkeypatch.setattr(Store, "read_checkpoints", spy)
    indices = list(range(0, len(corpus.train), 5))
    corpus.train.batch(indices)
    triples = [corpus.train.pair(k) for k in indices]
    needed = {}
    for r, i, j in triples:
        needed.setdefault(r, set()).update((i, j))
    assert sorted(r for r, _ in calls) == sorted(needed)  # one read per run
    assert {r: set(rows) for r, rows in calls} == needed


def test_permutation_is_the_same_for_both_checkpoints_of_a_pair(store_dir):
    corpus = open_pairs(store_dir, PairConfig(heldout_fraction=0.2))
    task = tasks.get("mnist-mlp")
    indices, perms = PairSampler(len(corpus.train), 6, seed=1, task=task).global_batch(0)
    plain, permuted = corpus.train.batch(indices), corpus.train.batch(indices, perms)
    assert not torch.equal(plain.theta, permuted.theta)
    torch.testing.assert_close(permuted.theta, task.permute(plain.theta, perms), rtol=0, atol=0)
    torch.testing.assert_close(permuted.theta_next, task.permute(plain.theta_next, perms), rtol=0, atol=0)
    assert torch.equal(plain.metric, permuted.metric)  # a permutation leaves the function, so the metric


# ------------------------------------------------------------------------------ normalisation


def test_normalisation_comes_from_the_training_runs_only(store_dir):
    corpus = open_pairs(store_dir, PairConfig(heldout_fraction=0.2, std_sample_runs=100, std_sample_rows=100))
    store, norm = corpus.store, corpus.normalization
    train_metrics = torch.cat([store.read_metrics(r)[1]["test_loss"] for r in corpus.split.train])
    assert (norm.metric_lo, norm.metric_hi) == (float(train_metrics.min()), float(train_metrics.max()))
    everything = torch.cat([store.read_run(r).params for r in corpus.split.train]).double()
    assert corpus.param_std == pytest.approx(float(everything.std(unbiased=False)), rel=1e-6)
    assert norm.param_scale == pytest.approx(GPT_TARGET_STD / corpus.param_std)
    assert corpus.split.heldout and not set(corpus.split.heldout) & set(corpus.train.run_ids)
    summary = corpus.summary()
    assert summary["runs_train"] + summary["runs_heldout"] == 5 and summary["metric"] == "test_loss"


def test_sampled_param_std_is_close_to_the_exact_one(store_dir):
    exact = open_pairs(store_dir, PairConfig(std_sample_runs=100, std_sample_rows=100)).param_std
    sampled = open_pairs(store_dir, PairConfig(std_sample_runs=2, std_sample_rows=2)).param_std
    assert sampled == pytest.approx(exact, rel=0.2) and sampled != exact


def test_another_metric_conditions_when_asked(store_dir):
    corpus = open_pairs(store_dir, PairConfig(metric="train_loss"))
    assert corpus.metric == "train_loss" and corpus.train.metric_values
    with pytest.raises(LearnedOptError, match="no metric 'accuracy'"):
        open_pairs(store_dir, PairConfig(metric="accuracy"))


# ------------------------------------------------------------------------------ sampling


def test_sampler_is_a_function_of_seed_and_step_and_shards_without_overlap():
    task = tasks.get("mnist-mlp")
    s = PairSampler(1000, 8, seed=5, task=task)
    i0, p0 = s.global_batch(3)
    i1, p1 = PairSampler(1000, 8, seed=5, task=task).global_batch(3)
    assert torch.equal(i0, i1) and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert not torch.equal(i0, s.global_batch(4)[0])
    a, pa = PairSampler.shard(i0, p0, 0, 2)
    b, pb = PairSampler.shard(i0, p0, 1, 2)
    assert torch.equal(torch.sort(torch.cat([a, b])).values, torch.sort(i0).values)
    assert pa[0].shape == (4, 10) and torch.equal(torch.cat([pa[0], pb[0]]).sort(0).values, p0[0].sort(0).values)
    assert PairSampler(1000, 8, seed=5, task=task, augment=False).global_batch(3)[1] is None


def test_start_pairs_are_every_pair_from_one_checkpoint(store_dir):
    ds = open_pairs(store_dir, PairConfig(max_gap=3, heldout_fraction=0.2)).train
    for start in (0, 2):
        got = [ds.pair(int(k)) for k in ds.start_pairs(start)]
        expected = [(r, start, j) for r in ds.run_ids for j in range(start + 1, min(start + 3, 5) + 1)]
        assert got == expected
    assert ds.start_pairs(5).numel() == 0  # the last checkpoint starts nothing


def test_late_pairs_are_every_pair_that_starts_in_the_second_half_of_its_run(store_dir):
    ds = open_pairs(store_dir, PairConfig(max_gap=3, heldout_fraction=0.2)).train
    got = sorted(ds.pair(int(k)) for k in ds.late_pairs())
    everything = [ds.pair(k) for k in range(len(ds))]
    k = {r: len(ds.metric_values[r]) for r in ds.run_ids}
    assert got == sorted(p for p in everything if p[1] >= k[p[0]] // 2)
    assert got and len(got) < len(everything)
    short = sorted(ds.pair(int(k)) for k in ds.late_pairs(max_gap=1))  # the next checkpoint only
    assert short == [p for p in got if p[2] - p[1] == 1] and short
    assert sorted(ds.pair(int(k)) for k in ds.late_pairs(max_gap=3)) == got  # the store's own largest gap


def test_focus_puts_each_share_of_every_batch_on_its_pairs():
    focus, late = torch.tensor([3, 17, 40]), torch.tensor([500, 501])
    s = PairSampler(1000, 20, seed=2, task=None, focus=[(focus, 0.25)])
    for step in range(5):
        indices, _ = s.global_batch(step)
        assert indices.shape == (20,) and torch.isin(indices[:5], focus).all()
    assert not torch.isin(indices[5:], focus).all()  # the rest is drawn from every pair
    both = PairSampler(1000, 20, seed=2, task=None, focus=[(focus, 0.25), (late, 0.5)])
    indices, _ = both.global_batch(3)
    assert torch.isin(indices[:5], focus).all() and torch.isin(indices[5:15], late).all()
    assert not torch.isin(indices[15:], late).all()
    plain = PairSampler(1000, 20, seed=2, task=None)
    for unfocused in ([(focus, 0.0)], [(focus, 0.0), (torch.zeros(0, dtype=torch.long), 0.5)]):
        # no share (or no pairs): G.pt's uniform draw, unchanged
        assert torch.equal(PairSampler(1000, 20, seed=2, task=None, focus=unfocused).global_batch(1)[0],
                           plain.global_batch(1)[0])
    for bad in ([(focus, 1.5)], [(focus, 0.6), (late, 0.6)]):
        with pytest.raises(ConfigError, match="focus fractions"):
            PairSampler(1000, 20, seed=2, task=None, focus=bad)
    with pytest.raises(ConfigError, match="init_fraction"):
        PairConfig(init_fraction=-0.1)
    with pytest.raises(ConfigError, match="late_fraction"):
        PairConfig(init_fraction=0.75, late_fraction=0.5)
    PairConfig(init_fraction=0.9, late_fraction=0.1)  # adds up to 1 in floating point, give or take
    with pytest.raises(ConfigError, match="late_max_gap"):
        PairConfig(late_fraction=0.5, late_max_gap=0)
    odd = PairSampler(1000, 3, seed=2, task=None, focus=[(focus, 0.5), (late, 0.5)])
    assert [count for _, count in odd.focus] == [2, 1]  # the running total is rounded: the batch, exactly


# ------------------------------------------------------------------------------ bad input


def test_store_of_another_task_is_refused(tmp_path):
    make_store(tmp_path / "cp", task="cartpole-mlp", runs=2, checkpoints=3)
    with pytest.raises(StoreError, match="holds runs of task 'cartpole-mlp', not 'mnist-mlp'"):
        open_store(tmp_path / "cp", task="mnist-mlp")
    assert open_pairs(tmp_path / "cp").metric == "return"  # without --task it trains on what it holds


def test_empty_and_missing_stores_are_refused(tmp_path):
    Store.create(tmp_path / "empty", "mnist-mlp")
    with pytest.raises(StoreError, match="holds no runs"):
        open_pairs(tmp_path / "empty")
    with pytest.raises(StoreError, match="no checkpoint store"):
        open_pairs(tmp_path / "nowhere")


def test_corrupt_run_file_is_refused_with_its_name(tmp_path):
    store = make_store(tmp_path / "s", runs=3, checkpoints=3)
    path = store.run_path(1)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(StoreError, match="run-00000001.safetensors is truncated"):
        open_pairs(tmp_path / "s")


def test_runs_too_short_for_a_pair_are_skipped_and_constant_metrics_refused(tmp_path):
    make_store(tmp_path / "s", runs=2, checkpoints=1)
    with pytest.raises(StoreError, match="hold no pairs"):  # one checkpoint per run
        open_pairs(tmp_path / "s", PairConfig(heldout_fraction=0.0))
    make_store(tmp_path / "s", runs=2, checkpoints=4, first_run=10)
    corpus = open_pairs(tmp_path / "s", PairConfig(heldout_fraction=0.0))
    assert corpus.train.run_ids == (10, 11) and corpus.train.skipped_runs == (0, 1)


def test_non_finite_parameters_are_refused_naming_the_run(tmp_path):
    from pretrain.store import RunRecord

    store = make_store(tmp_path / "s", runs=2, checkpoints=4)
    params = torch.zeros(4, store.num_params)
    params[2, 5] = float("nan")
    metrics = {name: torch.linspace(2.0, 1.0, 4) for name in store.metric_names}
    store.write_run(7, RunRecord(params, torch.arange(4), metrics, {}, seed=7))
    corpus = open_pairs(tmp_path / "s", PairConfig(heldout_fraction=0.0, std_sample_rows=2))  # rows 0 and 3
    bad = [k for k in range(len(corpus.train)) if corpus.train.pair(k) == (7, 1, 2)]
    with pytest.raises(StoreError, match="run 7 .* non-finite parameters"):
        corpus.train.batch(bad + [0])
