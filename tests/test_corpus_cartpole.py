"""The cartpole-mlp corpus: batched PPO runs through the shared corpus machinery."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from learned_opt import cli, tasks
from pretrain.corpus import CorpusConfig, PPOFamily, PPORanges, PPORunPlan, build_corpus, sample_ppo_hparams
from pretrain.seeding import seeded_init
from pretrain.store import Store

TINY = ["--env-steps", "1024", "--checkpoints", "5", "--no-progress"]  # one update: 16 gradient steps


def corpus_cli(out, *extra) -> list[str]:
    return ["corpus", "--task", "cartpole-mlp", "--out", str(out), *TINY, *extra]


def file_ids(store: Store) -> dict[int, tuple[int, int]]:
    return {r: (store.run_path(r).stat().st_ino, store.run_path(r).stat().st_mtime_ns) for r in store.run_ids()}


@pytest.fixture(scope="module")
def task():
    return tasks.get("cartpole-mlp")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 3-run store, all runs trained in one batch."""
    out = tmp_path_factory.mktemp("cartpole") / "store"
    assert cli.main(corpus_cli(out, "--runs", "3", "--batch-runs", "3")) == 0
    return out


def test_hparams_are_reproducible_from_the_seed_and_within_ranges():
    r = PPORanges()
    draws = [sample_ppo_hparams(s) for s in range(200)]
    assert draws == [sample_ppo_hparams(s) for s in range(200)] and draws[0] != draws[1]
    for d in draws:
        assert r.lr[0] <= d["lr"] <= r.lr[1] and r.gamma[0] <= d["gamma"] <= r.gamma[1]
        assert r.gae_lambda[0] <= d["gae_lambda"] <= r.gae_lambda[1] and r.clip[0] <= d["clip"] <= r.clip[1]
        assert d["entropy_coef"] == 0 or r.entropy_coef[0] <= d["entropy_coef"] <= r.entropy_coef[1]
        assert d["env_steps"] in r.env_steps and (d["envs"], d["horizon"], d["ppo_epochs"], d["minibatches"]) == (8, 128, 4, 4)
        json.dumps(d)
    assert {d["env_steps"] for d in draws} == set(r.env_steps) and any(d["entropy_coef"] == 0 for d in draws)
    # the override changes nothing else
    assert {**sample_ppo_hparams(3, env_steps=2048), "env_steps": 0} == {**sample_ppo_hparams(3), "env_steps": 0}
    # runs are grouped by environment steps, so their updates align
    plans = [PPORunPlan(i, i, d) for i, d in enumerate(draws[:40])]
    groups = PPOFamily().groups(plans, 8)
    assert all(len({p.hparams["env_steps"] for p in g}) == 1 and len(g) <= 8 for g in groups)
    assert sorted(p.run_id for g in groups for p in g) == list(range(40))


def test_command_writes_a_valid_store(built, task):
    store = Store.open(built)
    store.verify()
    assert store.task_name == "cartpole-mlp" and store.run_ids() == [0, 1, 2] and store.dropped_ids() == []
    assert store.settings["env_steps"] == 1024 and store.settings["ppo_shape"]["envs"] == 8
    for r in store.run_ids():
        run = store.read_run(r)
        assert run.seed == r and run.hparams == sample_ppo_hparams(r, env_steps=1024)
        assert run.params.shape == (5, task.num_params) and run.steps[0] == 0 and run.steps[-1] == 16
        assert set(run.metrics) == {"return"} and run.metrics["return"].shape == (5,)
        assert bool(((run.metrics["return"] >= 8) & (run.metrics["return"] <= 500)).all())
        assert run.info["env_steps"] == [0, 1024, 1024, 1024, 1024] and run.info["rank"] == 0
        assert torch.equal(run.params[0], seeded_init(task, r))  # PyTorch's default init from the seed
        assert not torch.equal(run.params[-1], run.params[0])
        assert bool(torch.isfinite(run.params).all()) and float(run.params.abs().max()) <= 10
    # the metric is the task's greedy evaluation of the stored checkpoints
    run = store.read_run(1)
    torch.testing.assert_close(run.metrics["return"][[0, -1]], task.evaluate(run.params[[0, -1]])["return"])


def test_resume_skips_finished_runs(built, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(built, out)
    store = Store.open(out)
    before = file_ids(store)
    capsys.readouterr()
    assert cli.main(corpus_cli(out, "--runs", "4")) == 0
    assert "1 runs written, 0 dropped (non-finite or |w| > 10), 3 already done" in capsys.readouterr().out
    after = file_ids(store)
    assert {r: after[r] for r in before} == before and sorted(after) == [0, 1, 2, 3]
    assert cli.main(corpus_cli(out, "--runs", "3", "--env-steps", "2048")) == 2
    assert "--env-steps 1024, not 2048" in capsys.readouterr().err
    assert file_ids(store) == after


def test_the_same_seed_reproduces_the_same_run_whatever_its_batch(built, tmp_path):
    # run 2 trained alone (and last to be written) equals run 2 trained beside runs 0 and 1
    config = CorpusConfig(task="cartpole-mlp", runs=3, out=str(tmp_path), env_steps=1024, checkpoints=5,
                          batch_runs=1, progress=False)
    Store.create(tmp_path, "cartpole-mlp", settings=PPOFamily().settings(config))
    alone = Store.open(tmp_path)
    for r in (0, 1):  # pretend runs 0 and 1 are done, so only run 2 trains
        alone.mark_dropped(r, seed=r, hparams={}, reason="test")
    assert build_corpus(config).written == 1
    a, b = alone.read_run(2), Store.open(built).read_run(2)
    assert torch.equal(a.steps, b.steps) and a.hparams == b.hparams
    torch.testing.assert_close(a.params, b.params, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.metrics["return"], b.metrics["return"])


def test_exploding_runs_are_dropped_and_counted(tmp_path):
    config = CorpusConfig(task="cartpole-mlp", runs=2, out=str(tmp_path), env_steps=1024, checkpoints=4,
                          progress=False, ppo_ranges=PPORanges(lr=(20.0, 20.0)))
    summary = build_corpus(config)
    store = Store.open(tmp_path)
    assert (summary.written, summary.dropped, summary.dropped_ids) == (0, 2, [0, 1])
    assert store.dropped_ids() == [0, 1] and store.read_dropped(0)["hparams"]["lr"] == pytest.approx(20.0)
    assert 0 < store.read_dropped(0)["step"] <= 16
    assert build_corpus(config).skipped == 2


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    config = CorpusConfig(task="cartpole-mlp", runs=1, out=str(tmp_path), env_steps=1024, checkpoints=3,
                          progress=False)
    assert build_corpus(config).written == 1
    assert torch.equal(torch.get_rng_state(), before)


def test_lr_range_narrows_the_drawn_lr_and_is_part_of_the_settings(built, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli.main(corpus_cli(out, "--runs", "2", "--lr-range", "1e-3", "2e-3")) == 0
    store = Store.open(out)
    assert store.settings["ranges"]["lr"] == [1e-3, 2e-3]
    for r in (0, 1):
        run = store.read_run(r)
        assert 1e-3 <= run.hparams["lr"] <= 2e-3
        assert run.hparams == sample_ppo_hparams(r, PPORanges(lr=(1e-3, 2e-3)), env_steps=1024)
        assert run.hparams["lr"] != Store.open(built).read_run(r).hparams["lr"]
    capsys.readouterr()
    assert cli.main(corpus_cli(out, "--runs", "3")) == 2  # the default range is another corpus
    assert "hyperparameter range lr = [0.001, 0.002], not [0.0001, 0.003]" in capsys.readouterr().err
    assert store.run_ids() == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "1"], "--epochs applies to classifier corpora; use --env-steps"),
    (["--lr-range", "3e-3", "1e-3"], "--lr-range: lr must satisfy 0 < low <= high"),
    (["--lr-range", "1e-4", "inf"], "both finite"),
    (["--task", "mnist-mlp", "--lr-range", "1e-3", "3e-3"], "--lr-range applies to control tasks"),
    (["--env-steps", "100"], "--env-steps must be >= 1024"),
    (["--device", "cuda"], "train on the CPU"),
    (["--task", "mnist-mlp", "--env-steps", "2048"], "--env-steps applies to control tasks"),
    (["--init-scale", "0.5", "2"], "--init-scale applies to classifier corpora"),
])
def test_options_that_do_not_apply_fail_in_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "s"
    assert cli.main(["corpus", "--task", "cartpole-mlp", "--runs", "1", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("learned-opt corpus: error:") and message in err, err
    assert not out.exists()
