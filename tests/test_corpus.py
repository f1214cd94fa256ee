"""The corpus builder: hyperparameters, batched training against a plain loop, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from learned_opt import cli, tasks
from learned_opt.errors import StoreError
from pretrain.corpus import (
    ADAM, GPT_RECIPE, SGD, BatchedTrainer, CorpusConfig, HParamRanges, RunPlan, SupervisedFamily, build_corpus,
    sample_hparams, train_run_reference,
)
from learned_opt.seeding import checkpoint_steps
from pretrain.store import RunRecord, Store
from test_store import OtherTask

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--train-examples", "256", "--checkpoints", "5", "--no-progress"]


def corpus_cli(out, root, *extra) -> list[str]:
    return ["corpus", "--task", "mnist-mlp", "--out", str(out), "--data-root", str(root), *TINY, *extra]


def file_ids(store: Store) -> dict[int, tuple[int, int]]:
    """run id -> (inode, mtime_ns): unchanged means the run was not rewritten."""
    return {r: (store.run_path(r).stat().st_ino, store.run_path(r).stat().st_mtime_ns) for r in store.run_ids()}


# ---------------------------------------------------------------------- hyperparameters


def test_hparams_are_reproducible_from_the_seed_and_within_ranges():
    ranges = HParamRanges()
    draws = [sample_hparams(s) for s in range(200)]
    assert draws == [sample_hparams(s) for s in range(200)]
    assert draws[0] != draws[1]
    assert {d["optimizer"] for d in draws} == {SGD, ADAM}
    for d in draws:
        lo, hi = ranges.sgd_lr if d["optimizer"] == SGD else ranges.adam_lr
        assert lo <= d["lr"] <= hi
        assert ranges.momentum[0] <= d["momentum"] <= ranges.momentum[1]
        assert d["weight_decay"] == 0 or ranges.weight_decay[0] <= d["weight_decay"] <= ranges.weight_decay[1]
        assert d["batch_size"] in ranges.batch_sizes and d["epochs"] in ranges.epochs
        assert d["schedule"] == "cosine-per-epoch"
        json.dumps(d)  # stored as JSON


def test_ranges_contain_the_gpt_recipe_and_the_flag_fixes_it():
    r = HParamRanges()
    assert SGD in r.optimizers and r.sgd_lr[0] <= 0.1 <= r.sgd_lr[1]
    assert r.momentum[0] <= 0.9 <= r.momentum[1] and r.weight_decay[0] <= 5e-4 <= r.weight_decay[1]
    assert 128 in r.batch_sizes and 25 in r.epochs
    for seed in range(20):
        hp = sample_hparams(seed, gpt_recipe=True)
        assert {k: hp[k] for k in GPT_RECIPE} == GPT_RECIPE
        assert sample_hparams(seed, gpt_recipe=True, epochs=2)["epochs"] == 2
        # the override changes nothing else
        assert {**sample_hparams(seed, epochs=3), "epochs": 0} == {**sample_hparams(seed), "epochs": 0}
    with pytest.raises(ValueError, match="optimizers"):
        HParamRanges(optimizers=("rmsprop",))


def test_checkpoint_steps_are_init_random_distinct_and_final():
    g = torch.Generator().manual_seed(0)
    steps = checkpoint_steps(11725, 200, g)
    assert steps.shape == (200,) and steps[0] == 0 and steps[-1] == 11725
    assert bool((steps[1:] > steps[:-1]).all())
    assert not torch.equal(steps, checkpoint_steps(11725, 200, torch.Generator().manual_seed(1)))
    assert torch.equal(checkpoint_steps(150, 200, g), torch.arange(151))  # short runs save every step
    assert torch.equal(checkpoint_steps(199, 200, g), torch.arange(200))


# ---------------------------------------------------------------------- training


def test_batched_training_equals_the_plain_pytorch_loop(mnist_data):
    task = tasks.get("mnist-mlp")
    x, y = mnist_data.train_x[:300], mnist_data.train_y[:300]  # batch 64 -> a partial last batch of 44
    settings = [(SGD, 0.1, 2), (ADAM, 3e-3, 2), (SGD, 0.03, 3), (ADAM, 1e-3, 3)]  # mixed epochs: runs leave early
    plans = []
    for i, (opt, lr, epochs) in enumerate(settings):
        hp = {**sample_hparams(i), "optimizer": opt, "lr": lr, "epochs": epochs, "batch_size": 64, "weight_decay": 1e-3}
        plans.append(RunPlan(i, 100 + i, hp, len(x), num_checkpoints=7))
    finished = []
    BatchedTrainer(task, x, y).train(plans, finished.extend)
    assert sorted(r.plan.run_id for r in finished) == [0, 1, 2, 3]
    assert [r.plan.hparams["epochs"] for r in finished] == [2, 2, 3, 3]  # handed over as they end
    for run in finished:
        assert run.dropped is None and run.params.shape == (7, task.num_params)
        assert run.steps[0] == 0 and run.steps[-1] == run.plan.total_steps
        expected = train_run_reference(task, run.plan, x, y)
        torch.testing.assert_close(run.params, expected, rtol=1e-4, atol=2e-5)
        assert torch.equal(run.params[0], run.plan.init(task))  # PyTorch's default init from the seed


def test_diverging_runs_are_dropped(mnist_data):
    task = tasks.get("mnist-mlp")
    x, y = mnist_data.train_x[:256], mnist_data.train_y[:256]
    base = {**sample_hparams(0), "optimizer": SGD, "batch_size": 64, "epochs": 2}
    plans = [RunPlan(0, 0, {**base, "lr": 0.05}, 256, 5), RunPlan(1, 1, {**base, "lr": 1e5}, 256, 5)]
    finished = []
    BatchedTrainer(task, x, y).train(plans, finished.extend)
    by_id = {r.plan.run_id: r for r in finished}
    assert by_id[0].dropped is None and torch.isfinite(by_id[0].params).all()
    assert by_id[1].dropped and by_id[1].params is None and by_id[1].dropped_at == 4  # found after epoch 1


def test_dropped_runs_are_recorded_counted_and_not_redone(tmp_path, mnist_data):
    config = CorpusConfig(runs=3, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=4, progress=False,
                          ranges=HParamRanges(optimizers=(SGD,), sgd_lr=(1e5, 1e5)))
    summary = build_corpus(config, data=mnist_data)
    store = Store.open(tmp_path)
    assert (summary.written, summary.dropped, summary.dropped_ids) == (0, 3, [0, 1, 2])
    assert store.dropped_ids() == [0, 1, 2] and store.run_ids() == []
    assert store.read_dropped(1)["hparams"]["lr"] == pytest.approx(1e5) and store.stats()["dropped"] == 3
    again = build_corpus(config, data=mnist_data)
    assert (again.written, again.dropped, again.skipped) == (0, 0, 3)


# ---------------------------------------------------------------------- the command, resume, kill


def test_corpus_command_writes_a_valid_store_and_resumes(tmp_path, mnist_root, capsys):
    out = tmp_path / "store"
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "3", "--batch-runs", "2")) == 0
    assert "3 runs written, 0 dropped" in capsys.readouterr().out
    store = Store.open(out)
    assert store.run_ids() == [0, 1, 2] and store.task_name == "mnist-mlp"
    run = store.read_run(1)
    assert run.seed == 1 and run.hparams == sample_hparams(1, epochs=1) and run.info["rank"] == 0
    assert run.steps[0] == 0 and run.steps[-1] == run.hparams["epochs"] * -(-256 // run.hparams["batch_size"])
    assert set(run.metrics) == {"train_loss", "test_loss", "test_error"}
    assert bool(torch.isfinite(run.params).all()) and float(run.params.abs().max()) <= 10
    # the metrics are the task's evaluation of the stored checkpoints
    fresh = tasks.get("mnist-mlp").evaluate(run.params[[0, -1]], tasks.get("mnist-mlp").load_data(mnist_root))
    torch.testing.assert_close(run.metrics["test_loss"][[0, -1]], fresh["test_loss"])
    assert run.metrics["test_loss"][-1] < run.metrics["test_loss"][0]  # it learned something
    before = file_ids(store)

    assert cli.main(corpus_cli(out, mnist_root, "--runs", "4")) == 0  # resume and extend
    assert "1 runs written, 0 dropped (non-finite or |w| > 10), 3 already done" in capsys.readouterr().out
    after = file_ids(store)
    assert {r: after[r] for r in before} == before and sorted(after) == [0, 1, 2, 3]
    assert store.stats()["runs"] == 4


def test_an_interrupted_job_leaves_no_partial_run_and_resumes(tmp_path, mnist_data, monkeypatch):
    config = CorpusConfig(runs=4, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=4,
                          batch_runs=4, progress=False, gpt_recipe=True)
    real_link, calls = os.link, []

    def link_then_die(src, dst, *a, **k):  # the job dies while writing its second run
        if ".safetensors" in str(dst):
            calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(config, data=mnist_data)
    monkeypatch.setattr(os, "link", real_link)
    store = Store.open(tmp_path)
    assert len(store.run_ids()) == 1
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("run-")]  # no temp file left
    # a writer killed outright leaves a hidden temp file: ignored on resume
    (tmp_path / "runs" / ".run-00000003.safetensors.host.9.dead.tmp").write_bytes(b"partial")
    before = file_ids(store)
    summary = build_corpus(config, data=mnist_data)
    assert (summary.written, summary.skipped) == (3, 1)
    assert store.run_ids() == [0, 1, 2, 3] and {r: file_ids(store)[r] for r in before} == before
    store.verify()


@pytest.mark.slow
def test_a_killed_corpus_process_resumes_without_redoing_runs(tmp_path, mnist_root):
    out = tmp_path / "store"
    args = [sys.executable, "-m", "learned_opt.cli", *corpus_cli(out, mnist_root, "--runs", "12", "--batch-runs", "1")]
    args[args.index("256")] = "1024"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "runs").glob("run-*"))) < 2:
            assert proc.poll() is None, "the corpus job ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    store = Store.open(out)
    done = store.run_ids()
    assert 2 <= len(done) < 12
    store.verify()  # every listed run reads back: no partial run
    before = file_ids(store)
    resume = [a if a != "256" else "1024" for a in corpus_cli(out, mnist_root, "--runs", "12")]
    assert cli.main(resume) == 0
    assert store.run_ids() == list(range(12)) and {r: file_ids(store)[r] for r in before} == before


# ---------------------------------------------------------------------- bad input


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("learned-opt corpus: error:"), err
    for needle in needles:
        assert needle in err, err


def test_unknown_task_fails_in_one_line(tmp_path, mnist_root, capsys):
    out = tmp_path / "s"
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "1", "--task", "nope")) == 2
    _one_line_error(capsys, "unknown task 'nope'", "mnist-mlp")
    assert not out.exists()


def test_data_root_without_mnist_fails_in_one_line(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(corpus_cli(out, tmp_path / "empty", "--runs", "1")) == 2
    _one_line_error(capsys, "MNIST not found", "--data-root")
    assert not out.exists()


def test_unwritable_output_folder_fails_in_one_line(tmp_path, mnist_root, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    assert cli.main(corpus_cli(blocker / "store", mnist_root, "--runs", "1")) == 2
    _one_line_error(capsys, "choose a writable --out")
    assert blocker.read_text() == "keep"


def test_store_of_another_task_fails_and_is_left_alone(tmp_path, mnist_root, capsys):
    other = Store.create(tmp_path, OtherTask())
    rec = RunRecord(torch.zeros(2, 8), torch.tensor([0, 1]), {"test_loss": torch.zeros(2)}, {}, 0)
    other.write_run(0, rec)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main(corpus_cli(tmp_path, mnist_root, "--runs", "2")) == 2
    _one_line_error(capsys, "store of task 'other-test-task', not 'mnist-mlp'")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_truncated_run_file_fails_and_nothing_is_lost(tmp_path, mnist_data, mnist_root, capsys):
    config = CorpusConfig(runs=2, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=5, progress=False)
    build_corpus(config, data=mnist_data)  # the settings of TINY, which the command resumes with
    store = Store.open(tmp_path)
    bad = store.run_path(1)
    bad.write_bytes(bad.read_bytes()[:-100])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main(corpus_cli(tmp_path, mnist_root, "--runs", "3")) == 2
    _one_line_error(capsys, "run-00000001.safetensors is truncated", "delete it")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("change, message", [
    (["--seed", "3"], "--seed 0, not 3"),
    (["--checkpoints", "6"], "--checkpoints 5, not 6"),
    (["--epochs", "2"], "--epochs 1, not 2"),
    (["--train-examples", "300"], "--train-examples 256, not 300"),
    (["--gpt-recipe"], "--gpt-recipe False, not True"),
])
def test_resuming_with_other_settings_fails_and_writes_nothing(tmp_path, mnist_root, capsys, change, message):
    out = tmp_path / "store"
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "1")) == 0
    assert Store.open(out).settings["seed"] == 0
    capsys.readouterr()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "2", *change)) == 2
    _one_line_error(capsys, message, "use the store's settings", "new --out")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_a_store_without_recorded_settings_and_other_hparam_ranges(tmp_path, mnist_data):
    config = CorpusConfig(runs=0, out=str(tmp_path / "plain"), epochs=1, train_examples=256, checkpoints=4,
                          progress=False)
    Store.create(config.out, "mnist-mlp")  # made by hand: nothing to compare, accepted
    assert build_corpus(config, data=mnist_data).written == 0 and Store.open(config.out).settings is None
    config.out, config.runs = str(tmp_path / "built"), 1
    build_corpus(config, data=mnist_data)
    config.ranges = HParamRanges(sgd_lr=(0.01, 0.2))
    with pytest.raises(StoreError, match=r"hyperparameter range sgd_lr = \[0.01, 0.3\], not \[0.01, 0.2\]"):
        build_corpus(config, data=mnist_data)


def test_a_store_in_which_nothing_was_built_takes_new_settings(tmp_path, mnist_data):
    """A first call that failed before any run (e.g. out of memory on a huge option) left only
    store.json: the corrected command must not be refused for the settings of nothing."""
    config = CorpusConfig(runs=1, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=4, progress=False)
    Store.create(config.out, "mnist-mlp", settings={"seed": 123, "epochs": 10 ** 12})
    assert build_corpus(config, data=mnist_data).written == 1
    assert Store.open(config.out).settings["seed"] == 0


def test_building_a_corpus_leaves_the_global_rng_alone(tmp_path, mnist_data):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    config = CorpusConfig(runs=1, out=str(tmp_path), epochs=1, train_examples=256, checkpoints=4, progress=False)
    assert build_corpus(config, data=mnist_data).written == 1
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------- torchrun


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_shards_runs_across_ranks_into_one_store(tmp_path, mnist_root):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found beside the Python interpreter"
    out = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "pretrain.corpus", "--runs", "5",
           "--out", str(out), "--data-root", str(mnist_root), "--batch-runs", "2", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Store.open(out)
    assert store.run_ids() == [0, 1, 2, 3, 4]
    for r in store.run_ids():
        _, _, info = store.read_info(r)
        assert info["world_size"] == 2 and info["rank"] == r % 2  # each run written by its owner only
    assert "[rank 0]" in proc.stdout and "[rank 1]" in proc.stdout
    assert not list((out / "runs").glob(".*.tmp"))


def test_a_process_group_the_caller_initialised_outlives_the_corpus_command(tmp_path, mnist_root, monkeypatch):
    """The corpus command ends only a process group it started; the caller's is the caller's to end."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's environment; the caller's group below has this one rank
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        code = cli.main(["corpus", "--runs", "2", "--out", str(tmp_path / "s"), "--data-root", str(mnist_root), *TINY])
        assert code == 0
        assert dist.is_initialized()
        assert Store.open(tmp_path / "s").run_ids() == [0]  # rank 0's share of two runs over two ranks
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_eval_on_validation_measures_held_out_training_images_that_runs_never_train_on(tmp_path, mnist_data, mnist_root,
                                                                                       capsys):
    task = tasks.get("mnist-mlp")
    config = CorpusConfig(runs=1, out=str(tmp_path / "s"), eval_on="validation", epochs=1, train_examples=256,
                          checkpoints=4, progress=False)
    assert build_corpus(config, data=mnist_data).written == 1
    store = Store.open(tmp_path / "s")
    assert store.settings["eval_on"] == "validation"
    run = store.read_run(0)
    val = task.validation_data(mnist_data)
    torch.testing.assert_close(run.metrics["test_loss"], task.evaluate(run.params, val)["test_loss"])
    assert not torch.allclose(run.metrics["test_loss"], task.evaluate(run.params, mnist_data)["test_loss"])
    whole = CorpusConfig(runs=1, out="unused", eval_on="validation")
    assert SupervisedFamily().plan([0], whole, mnist_data)[0].num_examples == 55_000  # the held-out 5,000 are not trained on
    assert SupervisedFamily().plan([0], CorpusConfig(runs=1, out="unused"), mnist_data)[0].num_examples == 60_000
    # the test set's store is another corpus: resuming without the option is refused
    assert cli.main(corpus_cli(tmp_path / "s", mnist_root, "--runs", "2", "--checkpoints", "4")) == 2
    _one_line_error(capsys, "--eval-on validation, not unset")


# ---------------------------------------------------------------------- wider and narrower inits


def test_an_init_scale_range_scales_each_run_s_init_and_draws_nothing_else_differently(mnist_data):
    wide = HParamRanges(init_scale=(0.5, 2.5))
    for seed in range(50):
        plain, scaled = sample_hparams(seed), sample_hparams(seed, wide)
        assert "init_scale" not in plain and 0.5 <= scaled.pop("init_scale") <= 2.5 and scaled == plain
    assert len({sample_hparams(s, wide)["init_scale"] for s in range(50)}) == 50
    for bad in ((0.0, 2.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="init_scale"):
            HParamRanges(init_scale=bad)
    task = tasks.get("mnist-mlp")
    x, y = mnist_data.train_x[:128], mnist_data.train_y[:128]
    plans = [RunPlan(i, 100 + i, {**sample_hparams(i, wide), "batch_size": 64, "epochs": 1}, len(x), num_checkpoints=3)
             for i in range(2)]
    finished = []
    BatchedTrainer(task, x, y).train(plans, finished.extend)
    for run in finished:  # the first checkpoint is the seeded init times the run's scale, and the oracle agrees
        scale = run.plan.hparams["init_scale"]
        torch.testing.assert_close(run.params[0], RunPlan(0, run.plan.seed, {}, 1).init(task) * scale)
        torch.testing.assert_close(run.params, train_run_reference(task, run.plan, x, y), rtol=1e-4, atol=2e-5)


def test_the_store_records_an_init_scale_only_where_one_is_drawn(tmp_path, mnist_root, capsys):
    out = tmp_path / "store"
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "1")) == 0
    assert "init_scale" not in Store.open(out).settings["ranges"]  # stores built before it resume as they were
    capsys.readouterr()
    assert cli.main(corpus_cli(out, mnist_root, "--runs", "2", "--init-scale", "0.5", "2")) == 2
    assert "init_scale" in capsys.readouterr().err and Store.open(out).run_ids() == [0]
    wide = tmp_path / "wide"
    assert cli.main(corpus_cli(wide, mnist_root, "--runs", "1", "--init-scale", "0.5", "2")) == 0
    store = Store.open(wide)
    assert store.settings["ranges"]["init_scale"] == [0.5, 2.0] and 0.5 <= store.read_run(0).hparams["init_scale"] <= 2
    capsys.readouterr()
    assert cli.main(corpus_cli(tmp_path / "bad", mnist_root, "--runs", "1", "--init-scale", "2", "1")) == 2
    assert "--init-scale takes LOW HIGH" in capsys.readouterr().err and not (tmp_path / "bad").exists()
