"""Warm-started corpus runs: each starts from a generator's one update of its init (``--warm-start``)."""

from __future__ import annotations

import pytest
import torch

from learned_opt import cli, tasks
from learned_opt.pretrained import load_generator
from learned_opt.seeding import stream
from pretrain.corpus import CorpusConfig, WarmStart, build_corpus, plan_runs
from pretrain.corpus.warm import WARM_STREAM
from learned_opt.errors import StoreError
from pretrain.store import Store

from test_corpus import _one_line_error, corpus_cli

TINY = dict(epochs=1, train_examples=256, checkpoints=5, progress=False)


def files(root) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def mlp_generator():
    return load_generator("mnist-mlp")


def test_warm_runs_start_from_the_generators_update_of_their_init(tmp_path, mnist_data, mlp_generator):
    config = CorpusConfig(runs=3, out=str(tmp_path), batch_runs=3, warm_start="mnist-mlp", warm_from=1, **TINY)
    assert build_corpus(config, data=mnist_data).written == 3
    store, task = Store.open(tmp_path), tasks.get("mnist-mlp")
    warm = store.settings["warm_start"]
    assert warm["from_run"] == 1 and warm["sha256"] == mlp_generator.sha256 and warm["sampler"] == mlp_generator.sampling
    plans = plan_runs([0, 1, 2], base_seed=0, num_examples=256, epochs=1, num_checkpoints=5)
    inits = torch.stack([p.init(task) for p in plans])
    first = torch.stack([store.read_run(r).params[0] for r in range(3)])
    assert torch.equal(first[0], inits[0])  # below --warm-from: the init itself
    metric = task.evaluate(inits[1:2], mnist_data)["test_loss"]
    prompt = torch.tensor([warm["prompt"]])
    expected = mlp_generator.sample(inits[1:2], metric, prompt, generator=stream(plans[1].seed, WARM_STREAM))[0]
    torch.testing.assert_close(first[1], expected)
    losses = [float(store.read_run(r).metrics["test_loss"][0]) for r in range(3)]
    assert losses[0] > 2.0 and max(losses[1:]) < 0.5  # a random init against the generator's update of one


def test_warm_runs_can_record_their_init_as_the_first_checkpoint(tmp_path, mnist_data):
    common = dict(runs=2, batch_runs=2, warm_start="mnist-mlp", warm_from=1, **TINY)
    build_corpus(CorpusConfig(out=str(tmp_path / "start"), **common), data=mnist_data)
    build_corpus(CorpusConfig(out=str(tmp_path / "init"), warm_first="init", **common), data=mnist_data)
    start, init = Store.open(tmp_path / "start"), Store.open(tmp_path / "init")
    assert "first_checkpoint" not in start.settings["warm_start"]  # stores made before the option still resume
    assert init.settings["warm_start"]["first_checkpoint"] == "init"
    task = tasks.get("mnist-mlp")
    inits = torch.stack([p.init(task) for p in plan_runs([0, 1], base_seed=0, num_examples=256, epochs=1,
                                                          num_checkpoints=5)])
    for r in (0, 1):
        a, b = start.read_run(r), init.read_run(r)
        assert torch.equal(b.params[0], inits[r]) and torch.equal(a.params[1:], b.params[1:])  # the same training
    assert torch.equal(start.read_run(0).params[0], inits[0]) and not torch.equal(start.read_run(1).params[0], inits[1])
    loss = init.read_run(1).metrics["test_loss"]
    assert loss[0] > 2.0 and loss[1] < 0.5  # the jump from a random init, then training on
    with pytest.raises(StoreError, match="from run 1 --warm-first-checkpoint init, not mnist-mlp .* from run 1: use the"):
        build_corpus(CorpusConfig(out=str(tmp_path / "init"), **{**common, "runs": 3}), data=mnist_data)
    assert init.run_ids() == [0, 1]
    build_corpus(CorpusConfig(out=str(tmp_path / "start"), **{**common, "runs": 3}), data=mnist_data)  # resumes as before
    assert Store.open(tmp_path / "start").run_ids() == [0, 1, 2]


def test_a_warm_start_does_not_depend_on_the_runs_beside_it(mnist_data, mlp_generator):
    task = tasks.get("mnist-mlp")
    plans = plan_runs([4, 5, 6], base_seed=0, num_examples=256, epochs=1, num_checkpoints=5)
    inits = torch.stack([p.init(task) for p in plans])
    start = WarmStart(mlp_generator, task, from_run=5, eval_data=mnist_data)
    together = start(inits, plans)
    alone = start(inits[2:], plans[2:])
    assert torch.equal(together[0], inits[0]) and torch.equal(together[2], alone[0])
    assert not torch.equal(together[1], together[2])  # each run its own noise


def test_a_plain_store_takes_warm_runs_after_its_last_run_only(tmp_path, mnist_root, capsys):
    out = tmp_path / "store"
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "2")) == 0
    capsys.readouterr()
    before = files(out)
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "3", "--warm-start", "mnist-mlp", "--warm-from", "1")) == 2
    _one_line_error(capsys, "runs up to id 1", "--warm-from 2")
    assert files(out) == before

    assert cli.main(corpus_cli(out, mnist_root, "--runs", "3", "--warm-start", "mnist-mlp", "--warm-from", "2")) == 0
    store = Store.open(out)
    assert store.run_ids() == [0, 1, 2] and store.settings["warm_start"]["from_run"] == 2
    assert float(store.read_run(2).metrics["test_loss"][0]) < 0.5
    assert all(files(out)[p] == before[p] for p in before if p.name.startswith("run-"))  # plain runs untouched
    capsys.readouterr()
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "2")) == 0  # the plain command still resumes
    assert "2 already done" in capsys.readouterr().out
    for extra, message in ((["--runs", "4"], "--warm-start mnist-mlp (sha256"),
                           (["--runs", "4", "--warm-start", "mnist-mlp", "--warm-from", "3"], "from run 2, not mnist-mlp")):
        assert cli.main(corpus_cli(out, mnist_root, *extra)) == 2
        _one_line_error(capsys, message, "use the store's settings")
    assert Store.open(out).run_ids() == [0, 1, 2]


@pytest.mark.parametrize("task, generator, message", [
    ("mnist-mlp", "cartpole-mlp", "another shape than task 'mnist-mlp'"),
    ("mnist-mlp", "no-such-generator", "no-such-generator"),
    ("cartpole-mlp", "cartpole-mlp", "--warm-start applies to classifier corpora"),
])
def test_a_warm_start_that_cannot_apply_fails_in_one_line(tmp_path, mnist_root, capsys, task, generator, message):
    out = tmp_path / "s"
    args = corpus_cli(out, mnist_root, "--runs", "1", "--warm-start", generator, "--task", task)
    if task == "cartpole-mlp":
        args = ["corpus", "--task", task, "--out", str(out), "--runs", "1", "--env-steps", "1024",
                "--warm-start", generator, "--no-progress"]
    assert cli.main(args) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_warm_from_without_a_generator_and_a_hand_made_store_are_refused(tmp_path, mnist_root, mnist_data, capsys):
    assert cli.main(corpus_cli(tmp_path / "s", mnist_root, "--runs", "1", "--warm-from", "3")) == 2
    _one_line_error(capsys, "--warm-from 3 needs --warm-start")
    assert cli.main(corpus_cli(tmp_path / "s", mnist_root, "--runs", "1", "--warm-first-checkpoint", "init")) == 2
    _one_line_error(capsys, "--warm-first-checkpoint init needs --warm-start")
    assert not (tmp_path / "s").exists()
    Store.create(tmp_path / "hand", "mnist-mlp")  # no recorded settings: which runs are warm could not be kept
    config = CorpusConfig(runs=1, out=str(tmp_path / "hand"), warm_start="mnist-mlp", **TINY)
    with pytest.raises(StoreError, match="records no corpus settings"):
        build_corpus(config, data=mnist_data)
    assert Store.open(tmp_path / "hand").run_ids() == []


def test_a_resume_whose_warm_start_generator_changed_its_sampler_says_which_setting(tmp_path):
    from pretrain.corpus.build import check_settings

    warm = {"generator": "g", "sha256": "ab" * 32, "from_run": 0, "prompt": 0.16,
            "sampler": {"method": "ddim", "steps": 2, "t_min": 500}}
    store = type("S", (), {"root": tmp_path, "settings": {"seed": 0, "warm_start": warm}})()
    retuned = {**warm, "sampler": {"method": "ddim", "steps": 3, "t_min": 500}}  # tune-sampling --write since
    with pytest.raises(StoreError, match="whose sampler was .*'steps': 2.*, not .*'steps': 3.*give the generator its "
                                         "recorded sampler again"):
        check_settings(store, {"seed": 0, "warm_start": retuned})
    check_settings(store, {"seed": 0, "warm_start": dict(warm)})  # the same: accepted
