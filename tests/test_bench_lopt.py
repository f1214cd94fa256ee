"""``learned-opt bench --mode lopt`` (the learned optimizer against Adam(1e-3), grid-tuned Adam and
G.pt's SGD recipe) and ``--mode periodic --bases lopt``: options, errors, the lr choice on held-out
data, and tiny runs end to end."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import torch
from test_demo import USER_MLP, save_tiny_mnist_generator, write_user_task

import pretrain.bench.lopt as lopt_module
from learned_opt import LearnedOptimizer, tasks
from learned_opt.baselines.supervised import BaselineCurve, train_baseline
from learned_opt.cli import main as cli_main
from learned_opt.errors import ConfigError
from learned_opt.pretrained import load_generator
from learned_opt.recipes import ADAM_BASELINE
from learned_opt.tasks import MnistData
from pretrain.bench import (
    LOPT_OPTIMIZERS,
    BenchConfig,
    LoptBenchConfig,
    choose_lr,
    format_lopt_summary,
    parse_floats,
    run_bench,
    split_holdout,
    train_run,
)
from pretrain.bench.lopt import optimizer_section
from pretrain.evaluate import init_params

HELD_OUT = "benchmarks/tasks.py"


@pytest.fixture(scope="module")
def small_data(mnist_data):
    """2,000 training and 500 test images of real MNIST."""
    d = mnist_data
    return MnistData(d.train_x[:2000], d.train_y[:2000], d.test_x[:500], d.test_y[:500])


def _tiny(tmp_path, **kwargs) -> LoptBenchConfig:
    settings = dict(out=str(tmp_path / "b"), inits=2, steps=6, grid_steps=4, eval_every=2, lr_grid=(1e-3, 1e-2),
                    holdout=500, progress=False)
    return LoptBenchConfig(**{**settings, **kwargs})


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "--steps must be an integer >= 1"),
    (dict(grid_steps=0), "--grid-steps must be"),
    (dict(steps=100, grid_steps=200), "--grid-steps 200 is more than --steps 100"),
    (dict(inits=0), "--inits must be"),
    (dict(eval_every=0), "--eval-every must be"),
    (dict(holdout=0), "--holdout must be"),
    (dict(tasks=()), "no --task given"),
    (dict(tasks=("mnist-mlp", "mnist-mlp")), "names a task twice"),
    (dict(optimizers=()), "--optimizers is empty"),
    (dict(optimizers=("adam", "lion")), "unknown optimizer 'lion' in --optimizers"),
    (dict(optimizers=("adam", "lopt", "lopt")), "--optimizers lists an optimizer twice"),
    (dict(optimizers=("sgd", "lopt")), "--optimizers must include adam"),
    (dict(lr_grid=()), "--lr-grid is empty"),
    (dict(lr_grid=(1e-3, -1.0)), "finite learning rates > 0"),
    (dict(lr_grid=(1e-3, math.inf)), "finite learning rates > 0"),
    (dict(lr_grid=(1e-3, 1e-3)), "--lr-grid lists a learning rate twice"),
    (dict(mode="periodic"), "LoptBenchConfig is --mode lopt's"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoptBenchConfig(**kwargs)


def test_defaults_and_list_parsing():
    c = LoptBenchConfig()
    assert (c.steps, c.grid_steps, c.inits, c.lr_grid) == (10_000, 2000, 3, (3e-4, 1e-3, 3e-3, 1e-2, 3e-2))
    assert c.optimizers == LOPT_OPTIMIZERS == ("adam", "adam-tuned", "sgd", "lopt")
    assert LoptBenchConfig(optimizers=("adam", "lopt"), lr_grid=()).lr_grid == ()  # no grid without adam-tuned
    assert parse_floats(" 3e-4, 1e-3,", "--lr-grid") == (3e-4, 1e-3)
    with pytest.raises(ConfigError, match="--lr-grid takes comma-separated numbers"):
        parse_floats("3e-4,fast", "--lr-grid")


@pytest.mark.parametrize("args, match", [
    (["--mode", "periodic"], "--mode periodic needs --generator"),
    (["--mode", "lopt", "--generator", "mnist-mlp"], "--generator is an option of --mode periodic"),
    (["--mode", "lopt", "--every", "50", "--moments", "reset"], "--every, --moments are options of --mode periodic"),
    (["--mode", "lopt", "--candidates", "4"], "--candidates and --rank are options of --mode periodic"),
    (["--mode", "lopt", "--rank", "self"], "--candidates and --rank are options of --mode periodic"),
    (["--mode", "periodic", "--generator", "mnist-mlp", "--grid-steps", "5"], "--grid-steps is an option of --mode lopt"),
    (["--mode", "periodic", "--generator", "mnist-mlp", "--task", "a,b"], "measures one task"),
    (["--mode", "periodic", "--generator", "mnist-mlp", "--weights", "hand-set"], "only the lopt base uses"),
    (["--mode", "lopt", "--lr-grid", "1e-3,x"], "--lr-grid takes comma-separated numbers"),
    (["--mode", "lopt", "--optimizers", "sgd,lopt"], "--optimizers must include adam"),
    (["--mode", "lopt", "--weights", "no-such-weights"], "no-such-weights"),
    (["--mode", "lopt", "--task", "cartpole-mlp"], "bench --mode lopt measures supervised tasks; 'cartpole-mlp' is a control"),
    (["--mode", "lopt", "--task", "mnist-mlp", "--task", "no-such-task"], "unknown task 'no-such-task'"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, match):
    code = cli_main(["bench", "--out", str(tmp_path / "b"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "b").exists()


def test_choose_lr_by_the_median_and_a_diverged_init_counts_as_worst():
    c = choose_lr({1e-3: [0.5, 0.4, 0.6], 1e-2: [0.3, math.nan, 0.35], 3e-2: [math.nan, math.nan, 0.1]})
    assert c["chosen_lr"] == 1e-2 and c["median_validation_loss"] == [0.5, 0.35, math.inf]
    assert choose_lr({1e-3: [0.5], 1e-2: [0.5]})["chosen_lr"] == 1e-3  # a tie: the first in grid order


def test_divergences_are_counted_per_optimizer():
    grid = [0, 2, 4]
    fine = BaselineCurve("adam", grid, [2.0, 1.0, 0.5], [0.0] * 3, 1e-3, [0.0, 1.0, 2.0])
    gone = BaselineCurve("adam", grid, [2.0, math.nan, math.nan], [0.0] * 3, 1e-3, [0.0, 1.0, math.nan], diverged_at=2)
    s = optimizer_section(dict(ADAM_BASELINE), [fine, gone, fine], [1, 2, 3], grid, 1, 1.0, None)
    assert s["summary"]["diverged"] == 1 and s["summary"]["reached"] == 2
    assert [r["steps_to_target"] for r in s["rows"]] == [2, None, 2] and s["rows"][1]["diverged_at"] == 2
    assert s["median_test_loss"][1] == 1.0 and s["summary"]["median_final_test_loss"] == 0.5


# ---------------------------------------------------------------------- end to end


def test_tiny_run_end_to_end_on_real_mnist(small_data, tmp_path):
    out = tmp_path / "b"
    ref = f"{HELD_OUT}:Mlp48x24"
    rng = torch.random.get_rng_state()
    r = run_bench(_tiny(tmp_path, tasks=("mnist-mlp", ref), weights="hand-set"), data=small_data)
    assert torch.equal(torch.random.get_rng_state(), rng)
    saved = json.loads((out / "bench.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"bench.json holds {c}: not strict JSON"))
    for key in ("mode", "config", "weights", "optimizers", "target", "lr_choice", "hardware", "seeds", "grid", "tasks",
                "wall_seconds"):
        assert key in saved, key
    assert saved["mode"] == "lopt" and saved["weights"]["name"] == "hand-set"
    assert saved["seeds"] == [4_000_000, 4_000_001] and saved["grid"] == [0, 2, 4, 6]
    assert list(saved["tasks"]) == ["mnist-mlp", "mnist-mlp-48x24"]
    for name, section in saved["tasks"].items():
        assert section["data"] == {"train_examples": 1500, "holdout_examples": 500, "test_examples": 500}
        assert list(section["optimizers"]) == ["adam", "adam-tuned", "sgd", "lopt"]
        adam = section["optimizers"]["adam"]
        assert section["target"] == pytest.approx(statistics.median(row["test_loss_at_grid_steps"] for row in adam["rows"]))
        assert adam["summary"]["curve_steps_to_target"] <= 4  # Adam's median curve meets its own target by then
        for o in section["optimizers"].values():
            s = o["summary"]
            for key in ("curve_steps_to_target", "median_test_loss_at_grid_steps", "median_final_test_loss",
                        "diverged", "median_seconds_per_step", "reached"):
                assert key in s, key
            assert s["median_seconds_per_step"] > 0 and s["diverged"] == 0
            assert all(set(row) == {"seed", "steps_to_target", "test_loss_at_grid_steps", "final_test_loss",
                                    "seconds_per_step", "diverged_at"} for row in o["rows"])
            # the same init for every optimizer
            assert [c[0] for c in o["test_loss"]] == [c[0] for c in adam["test_loss"]]
            assert len(o["median_test_loss"]) == len(saved["grid"])
        for name_ in ("adam-tuned", "sgd", "lopt"):
            assert "curve_steps_ratio" in section["optimizers"][name_]["summary"]
        assert section["optimizers"]["lopt"]["hparams"]["weights"] == "hand-set"
        assert section["lr_grid"]["lrs"] == [1e-3, 1e-2] and section["lr_grid"]["chosen_lr"] in (1e-3, 1e-2)
        assert section["optimizers"]["adam-tuned"]["hparams"]["lr"] == section["lr_grid"]["chosen_lr"]
        assert isinstance(section["lopt_beats_tuned_adam"], bool) and section["wall_seconds"] > 0
    assert saved["tasks"]["mnist-mlp-48x24"]["num_params"] == 39_106
    assert r["plots"] == [str(out / "mnist-mlp.png"), str(out / "mnist-mlp-48x24.png")]
    assert all((out / p).stat().st_size > 1000 for p in ("mnist-mlp.png", "mnist-mlp-48x24.png"))
    table = format_lopt_summary(r)
    assert "Adam(1e-3)" in table and "grid-tuned" in table and "learned (hand-set)" in table
    assert "beat grid-tuned Adam" in table


def test_cli_runs_without_a_generator(tmp_path, capsys):
    ref = write_user_task(tmp_path, "bench-lopt-user-mlp", USER_MLP)
    args = ["bench", "--mode", "lopt", "--task", ref, "--out", str(tmp_path / "b"), "--seeds", "1", "--steps", "4",
            "--grid-steps", "2", "--eval-every", "2", "--lr-grid", "1e-3,3e-2", "--optimizers", "adam,adam-tuned,lopt",
            "--holdout", "100", "--no-progress", "--no-plots"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "bench-lopt-user-mlp" in out and "bench.json" in out
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    section = saved["tasks"]["bench-lopt-user-mlp"]
    assert list(section["optimizers"]) == ["adam", "adam-tuned", "lopt"] and section["source"].endswith(":UserTask")
    assert saved["config"]["steps"] == 4 and saved["config"]["seed"] == 4_000_000 and saved["weights"]["name"]
    assert not list((tmp_path / "b").glob("*.png"))


def test_the_lr_is_chosen_on_held_out_data_and_continued_without_retraining(small_data, tmp_path, monkeypatch):
    seen = []

    def favour_the_largest_lr(task, model, split):
        seen.append((split.holdout_x.data_ptr(), split.train.test_x.data_ptr()))
        lr = model_lr[id(model)]
        return -lr  # a held-out loss that prefers the largest lr, whatever the test set says

    model_lr = {}
    real_start = lopt_module.BaselineRun

    class Recording(real_start):
        def __init__(self, task, init, data, recipe, **kw):
            super().__init__(task, init, data, recipe, **kw)
            model_lr[id(self.model)] = recipe["lr"]

    monkeypatch.setattr(lopt_module, "BaselineRun", Recording)
    monkeypatch.setattr(lopt_module, "validation_loss", favour_the_largest_lr)
    config = _tiny(tmp_path, lr_grid=(3e-4, 1e-3, 3e-2), optimizers=("adam", "adam-tuned"))
    r = run_bench(config, data=small_data)
    section = r["tasks"]["mnist-mlp"]
    assert section["lr_grid"]["chosen_lr"] == 3e-2
    assert section["lr_grid"]["median_validation_loss"] == [-3e-4, -1e-3, -3e-2]
    # the grid's 1e-3 is Adam(1e-3) itself: 2 new runs per init for the grid, one for Adam
    assert len(seen) == 2 * 3 and len(model_lr) == 2 * 3
    split = split_holdout(tasks.get("mnist-mlp"), small_data, 500)
    assert {s[0] for s in seen} == {split.holdout_x.data_ptr()} and split.holdout_x.data_ptr() != small_data.test_x.data_ptr()
    # continued from --grid-steps to --steps, it is the very run one would get in one go
    task, inits = tasks.get("mnist-mlp"), init_params(tasks.get("mnist-mlp"), r["seeds"])
    for i, seed in enumerate(r["seeds"]):
        whole = train_baseline(task, inits[i], split.train, {**ADAM_BASELINE, "lr": 3e-2}, 6, r["grid"], seed=seed)
        assert section["optimizers"]["adam-tuned"]["test_loss"][i] == whole.test_loss


def test_the_lr_choice_never_reads_the_test_set(small_data, tmp_path):
    # a test set of NaN images: every test loss is NaN, and still the lr is chosen, on the held-out slice
    poisoned = MnistData(small_data.train_x, small_data.train_y, torch.full_like(small_data.test_x, math.nan),
                         small_data.test_y)
    r = run_bench(_tiny(tmp_path, optimizers=("adam", "adam-tuned"), plots=False), data=poisoned)
    choice = r["tasks"]["mnist-mlp"]["lr_grid"]
    assert all(math.isfinite(v) for v in choice["median_validation_loss"])
    assert choice["chosen_lr"] == choice["lrs"][choice["median_validation_loss"].index(min(choice["median_validation_loss"]))]
    assert not any(math.isfinite(v) for v in choice["median_test_loss_at_grid_steps"])
    assert r["tasks"]["mnist-mlp"]["target"] is None


def test_a_control_task_is_refused_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="bench --mode lopt measures supervised tasks; 'cartpole-mlp' is a control task"):
        run_bench(_tiny(tmp_path, tasks=("mnist-mlp", "cartpole-mlp")))
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- periodic mode with the lopt base


def test_periodic_with_the_learned_optimizer_as_base(small_data, tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    task = tasks.get("mnist-mlp")
    split = split_holdout(task, small_data, 500)
    captured = []
    run = train_run(task, init_params(task, [1])[0], split, "lopt", [0, 5, 10], seed=1,
                    generator=load_generator(manifest), every=5, sampling_steps=2,
                    on_optimizer=captured.append)
    assert isinstance(captured[0].base, LearnedOptimizer) and run.counters["attempted"] == 2
    assert captured[0].base.param_groups[0]["step"] == 10 and all(math.isfinite(v) for v in run.test_loss)

    config = BenchConfig(generator=str(manifest), out=str(tmp_path / "p"), inits=1, steps=10, every=(5,), eval_every=5,
                         holdout=500, sampling_steps=2, bases=("lopt",), weights="hand-set", progress=False, plots=False)
    r = run_bench(config, data=small_data)
    saved = json.loads((tmp_path / "p" / "bench.json").read_text())
    hp = saved["bases"]["lopt"]["hparams"]
    assert hp["optimizer"] == "learned" and hp["lr"] == 1.0 and hp["weights"] == "hand-set" and len(hp["weights_sha256"]) == 64
    assert set(saved["bases"]["lopt"]["configs"]) == {"base", "every=5"}
    assert saved["bases"]["lopt"]["configs"]["every=5"]["rows"][0]["attempted"] == 2
    assert r["bases"]["lopt"]["configs"]["base"]["summary"]["inits"] == 1
