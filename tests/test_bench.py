"""``pretrain.bench`` (``learned-opt bench --mode periodic``): arguments, the held-out split, the
steps-to-target arithmetic, ``--moments``, and a tiny run end to end."""

from __future__ import annotations

import contextlib
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from gpt_helpers import FnGenerator, save_tiny_generator
from test_demo import USER_CNN, save_tiny_mnist_generator, write_user_task

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.errors import ConfigError
from learned_opt.pretrained import load_generator
from learned_opt.tasks import MnistData
from pretrain.bench import (
    BenchConfig,
    FractionPrompt,
    Run,
    eval_grid,
    holdout_closure,
    init_row,
    parse_every,
    parse_prompt,
    run_bench,
    split_holdout,
    summarise,
    target_loss,
    train_run,
)
from pretrain.evaluate import init_params

TASK = tasks.get("mnist-mlp")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return save_tiny_mnist_generator(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def small_data(mnist_data):
    """3,000 training and 1,000 test images of real MNIST."""
    d = mnist_data
    return MnistData(d.train_x[:3000], d.train_y[:3000], d.test_x[:1000], d.test_y[:1000])


def _marked_data(n_train: int = 100, n_test: int = 20) -> MnistData:
    """Every image filled with its own index: train i -> i, test j -> 10_000 + j."""
    train = torch.arange(n_train, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 28, 28).clone()
    test = (10_000 + torch.arange(n_test, dtype=torch.float32))[:, None, None, None].expand(-1, 1, 28, 28).clone()
    return MnistData(train, torch.arange(n_train) % 10, test, torch.arange(n_test) % 10)


# ---------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, match", [
    (dict(bases=()), "--bases is empty"),
    (dict(bases=("adam", "rmsprop")), "unknown base optimizer 'rmsprop'"),
    (dict(bases=("adam", "adam")), "twice"),
    (dict(every=()), "--every is empty"),
    (dict(every=(0,)), "--every must hold integers >= 1"),
    (dict(every=(50, 50)), "twice"),
    (dict(steps=100, every=(50, 200)), "no generative update would run"),
    (dict(steps=0), "--steps must be an integer >= 1"),
    (dict(inits=0), "--inits must be"),
    (dict(holdout=0), "--holdout must be"),
    (dict(eval_every=0), "--eval-every must be"),
    (dict(sampling_steps=0), "--sampling-steps must be"),
    (dict(moments="zero"), "choose keep or reset"),
    (dict(method="euler"), "unknown sampling --method"),
    (dict(mode="oneshot"), "unknown --mode"),
    (dict(prompt="frac:-0.5"), "frac:X needs a number X > 0"),
    (dict(prompt="low"), "neither a finite number nor frac:X"),
    (dict(prompt="nan"), "neither a finite number"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BenchConfig(generator="g", **kwargs)


def test_parsing_lists_and_prompts():
    assert parse_every("50, 100,200") == (50, 100, 200)
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_every("50,1e2")
    assert parse_prompt(None) is None
    assert parse_prompt("0.25") == 0.25
    rule = parse_prompt("frac:0.9")
    assert rule == FractionPrompt(0.9) and rule(2.0) == pytest.approx(1.8)


def test_cli_errors_are_one_line(manifest, tmp_path, capsys):
    code = cli_main(["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--bases", "adam,lion"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown base optimizer 'lion'" in err and "adam, sgd" in err
    with pytest.raises(SystemExit):  # argparse: --mode offers only periodic
        cli_main(["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--mode", "oneshot"])
    assert not (tmp_path / "b").exists()
    capsys.readouterr()
    code = cli_main(["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--prompt", "-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--prompt -1 is outside" in err and "range [" in err
    assert not (tmp_path / "b").exists()


def test_generator_of_another_task_is_refused(tmp_path):
    toy = save_tiny_generator(tmp_path)
    with pytest.raises(ConfigError, match="for task 'toy'"):
        run_bench(BenchConfig(generator=str(toy), out=str(tmp_path / "b"), progress=False))


def test_holdout_must_leave_training_data(manifest, tmp_path):
    data = _marked_data(100)
    with pytest.raises(ConfigError, match="--holdout 100 must be between 1 and 99"):
        split_holdout(TASK, data, 100)
    config = BenchConfig(generator=str(manifest), out=str(tmp_path / "b"), holdout=150, steps=10, every=(5,),
                         progress=False)
    with pytest.raises(ConfigError, match="--holdout 150"):
        run_bench(config, data=data)
    assert not (tmp_path / "b").exists()


def test_cli_lists_bench(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--moments" in out and "periodic" in out and "--holdout" in out


# ---------------------------------------------------------------------- the held-out slice


def test_holdout_is_disjoint_from_training_and_test_data():
    data = _marked_data(100, 20)
    split = split_holdout(TASK, data, 30)
    train = set(split.train.train_x[:, 0, 0, 0].tolist())
    held = set(split.holdout_x[:, 0, 0, 0].tolist())
    assert train == set(range(70)) and held == set(range(70, 100))  # the last 30 are held out
    assert torch.equal(split.holdout_y, data.train_y[70:]) and torch.equal(split.train.train_y, data.train_y[:70])
    assert torch.equal(split.train.test_x, data.test_x)  # the test set is read only by the reporting evaluation
    assert not (train | held) & set(data.test_x[:, 0, 0, 0].tolist())


def test_closure_measures_the_holdout_and_never_the_test_set(small_data, manifest):
    split = split_holdout(TASK, small_data, 500)
    torch.manual_seed(0)
    model = TASK.build_model()
    value = holdout_closure(TASK, model, split.holdout_x, split.holdout_y)()
    with torch.no_grad():
        assert value == pytest.approx(float(F.cross_entropy(model(split.holdout_x), split.holdout_y)))
        assert value != pytest.approx(float(F.cross_entropy(model(small_data.test_x), small_data.test_y)), abs=1e-4)

    # a test set of NaN images: the reported test losses are NaN, yet every generative update finds a
    # finite metric (a NaN one raises in GptOptimizer), so the closure never read the test set
    poisoned = MnistData(small_data.train_x, small_data.train_y, torch.full_like(small_data.test_x, math.nan),
                         small_data.test_y)
    split = split_holdout(TASK, poisoned, 500)
    gen = FnGenerator(lambda theta: theta, load_generator(manifest))  # θ′ = θ: always accepted
    captured = []
    init = init_params(TASK, [3])[0]
    run = train_run(TASK, init, split, "adam", [0, 10], seed=3, generator=gen, every=10, on_optimizer=captured.append)
    assert run.diverged_at is None and run.counters["attempted"] == 1 and run.counters["accepted"] == 1
    assert all(math.isnan(v) for v in run.test_loss)
    # the metric the generator was conditioned on is the held-out loss of the final parameters
    flat = torch.cat([p.detach().reshape(-1) for p in captured[0].params])[None]
    held = MnistData(split.train.train_x[:0], split.train.train_y[:0], split.holdout_x, split.holdout_y)
    expected = float(TASK.evaluate(flat, held, ["test_loss"])["test_loss"][0])
    assert float(gen.last_call["metric"][0]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- steps to target, ratios


def _run(losses, walls, attempted=0, accepted=0) -> Run:
    counters = {"attempted": attempted, "accepted": accepted, "rejected": attempted - accepted, "failed": 0}
    return Run(list(losses), list(walls), counters=counters if attempted else {})


def test_steps_to_target_on_known_curves():
    grid = [0, 10, 20, 30]
    walls = [0.0, 1.0, 2.0, 3.0]
    r = init_row(grid, _run([2.3, 1.0, 0.5, 0.4], walls), 0.5, seed=7)
    assert (r["steps_to_target"], r["wall_to_target_s"], r["final_test_loss"], r["seed"]) == (20, 2.0, 0.4, 7)
    never = init_row(grid, _run([2.3, 2.0, 1.9, 1.8], walls), 0.5, seed=8)
    assert never["steps_to_target"] is None and never["wall_to_target_s"] is None
    diverged = init_row(grid, _run([2.3, 1.0, math.nan, math.nan], walls), 0.5, seed=9)
    assert diverged["steps_to_target"] is None
    assert target_loss([0.4, math.nan, 0.6, 0.5]) == 0.5  # the median of the finite final losses
    assert target_loss([math.nan]) is None
    assert init_row(grid, _run([2.3] * 4, walls), None, 0)["steps_to_target"] is None  # no target: nothing reached


def test_ratios_divide_by_the_base_and_count_never_worse():
    grid = [0, 100, 200, 300]
    target = 0.5
    base_runs = [_run([2.3, 1.0, 0.6, 0.5], [0, 1.0, 2.0, 3.0]),   # reaches at 300 after 3.0 s
                 _run([2.3, 1.0, 0.5, 0.45], [0, 1.0, 2.0, 3.0]),  # reaches at 200 after 2.0 s
                 _run([2.3, 1.0, 0.8, 0.7], [0, 1.0, 2.0, 3.0])]   # never
    fast_runs = [_run([2.3, 0.5, 0.4, 0.4], [0, 1.5, 3.0, 4.5], 3, 2),    # 100 steps, 1.5 s
                 _run([2.3, 0.5, 0.45, 0.5], [0, 1.5, 3.0, 4.5], 3, 1),   # final 0.5 > base's 0.45: worse
                 _run([2.3, 0.9, 0.8, 0.7], [0, 1.5, 3.0, 4.5], 3, 0)]    # never; final equal to the base's
    base = [init_row(grid, r, target, i) for i, r in enumerate(base_runs)]
    fast = [init_row(grid, r, target, i) for i, r in enumerate(fast_runs)]
    s_base, s = summarise(base), summarise(fast, base)
    assert s_base["reached"] == 2 and s_base["median_steps_to_target"] == 250  # median over the reached inits
    assert s_base["median_wall_to_target_s"] == 2.5 and "steps_ratio" not in s_base
    assert s["reached"] == 2 and s["median_steps_to_target"] == 100
    # fewer steps than the base gives a ratio below 1 (periodic steps / base steps), and seconds likewise
    assert s["steps_ratio"] == pytest.approx(100 / 250) and s["steps_ratio"] < 1
    assert s["wall_ratio"] == pytest.approx(1.5 / 2.5)
    assert s["never_worse"] == pytest.approx(2 / 3)
    assert (s["attempted"], s["accepted"], s["rejected"]) == (9, 3, 6) and s["acceptance_rate"] == pytest.approx(1 / 3)
    assert fast[0]["acceptance_rate"] == pytest.approx(2 / 3) and base[0]["acceptance_rate"] is None
    assert s["median_final_test_loss"] == 0.5
    # nothing reached: no median, no ratio
    slow = [init_row(grid, _run([2.3, 2.2, 2.1, 2.0], [0, 1, 2, 3]), target, i) for i in range(3)]
    s_slow = summarise(slow, base)
    assert s_slow["reached"] == 0 and s_slow["steps_ratio"] is None and s_slow["wall_ratio"] is None
    assert s_slow["never_worse"] == 0.0


def test_late_acceptance_counts_only_updates_after_the_late_step():
    from pretrain.bench.summaries import LATE_STEP

    grid = [0, LATE_STEP, 2 * LATE_STEP]
    early, late = LATE_STEP // 2, LATE_STEP + 100
    a = _run([2.3, 1.0, 0.5], [0, 1, 2], attempted=4, accepted=2)
    a.attempted_at, a.accepted_at = [early, LATE_STEP, late, late + 100], [early, late]  # at LATE_STEP: not late
    b = _run([2.3, 1.0, 0.5], [0, 1, 2], attempted=3, accepted=0)
    b.attempted_at, b.kept_at = [late, late + 100, late + 200], [late + 200]  # the last drew no sample
    rows = [init_row(grid, r, 0.5, i) for i, r in enumerate((a, b))]
    assert (rows[0]["late_attempted"], rows[0]["late_accepted"], rows[1]["late_kept"]) == (2, 1, 1)
    s = summarise(rows)
    assert (s["late_attempted"], s["late_sampled"], s["late_accepted"], s["late_after_step"]) == (5, 4, 1, LATE_STEP)
    assert s["late_acceptance_rate"] == pytest.approx(1 / 4) and s["acceptance_rate"] == pytest.approx(2 / 7)
    assert summarise([init_row(grid, _run([2.3, 1.0, 0.5], [0, 1, 2]), 0.5, 0)])["late_acceptance_rate"] is None


def test_eval_grid_always_ends_at_steps():
    assert eval_grid(100, 50) == [0, 50, 100]
    assert eval_grid(120, 50) == [0, 50, 100, 120]


# ---------------------------------------------------------------------- --moments


def _adam_steps(opt) -> list[int]:
    return [int(opt.state[p]["step"]) for p in opt.params]


@pytest.mark.parametrize("moments, sample, expected", [
    ("keep", "identity", 15),   # accepted at step 10, moments kept: Adam has counted all 15 steps
    ("reset", "identity", 5),   # accepted at step 10, state cleared: Adam restarted at step 11
    ("reset", "nan", 15),       # a failed update is not accepted: nothing is cleared
])
def test_moments_reset_only_after_an_accepted_update(small_data, manifest, moments, sample, expected):
    fn = (lambda theta: theta) if sample == "identity" else (lambda theta: torch.full_like(theta, math.nan))
    gen = FnGenerator(fn, load_generator(manifest))
    split = split_holdout(TASK, small_data, 500)
    captured = []
    with pytest.warns(RuntimeWarning) if sample == "nan" else contextlib.nullcontext():
        run = train_run(TASK, init_params(TASK, [1])[0], split, "adam", [0, 15], seed=1, generator=gen, every=10,
                        moments=moments, on_optimizer=captured.append)
    opt = captured[0]
    assert run.accepted_at == ([10] if sample == "identity" else [])
    assert run.counters["attempted"] == 1 and run.counters["failed"] == (sample == "nan")
    assert _adam_steps(opt) == [expected] * 4


@pytest.mark.parametrize("keep", [True, False])
def test_a_metric_that_meets_the_prompt_keeps_theta_unless_told_otherwise(small_data, manifest, keep):
    gen = FnGenerator(lambda theta: theta, load_generator(manifest))
    top = gen.metric_range[1]  # a prompt every held-out loss of these networks meets
    assert top >= 2.5  # random inits score ~2.3
    split = split_holdout(TASK, small_data, 500)
    captured = []
    run = train_run(TASK, init_params(TASK, [1])[0], split, "adam", [0, 20], seed=1, generator=gen, every=10,
                    prompt=top, keep_if_met=keep, on_optimizer=captured.append)
    assert captured[0].keep_if_met is keep and captured[0].guidance == 1.0 and captured[0].rank == "closure"
    assert run.kept_at == ([10, 20] if keep else []) and run.counters["kept"] == (2 if keep else 0)
    assert gen.calls == (0 if keep else 2)


def test_runs_search_the_line_and_record_the_step_size_kept(small_data, manifest):
    # θ′ = 0.9 θ: every point of the line lies between θ and θ′; the run records which one was kept
    gen = FnGenerator(lambda theta: 0.9 * theta, load_generator(manifest))
    split = split_holdout(TASK, small_data, 500)
    captured = []
    run = train_run(TASK, init_params(TASK, [1])[0], split, "adam", [0, 20], seed=1, generator=gen, every=10,
                    keep_if_met=False, step_size=(1, 0.5), on_optimizer=captured.append)
    assert captured[0].step_sizes == (1.0, 0.5) and gen.calls == 2
    assert len(run.accepted_step_sizes) == len(run.accepted_at) and set(run.accepted_step_sizes) <= {1.0, 0.5}


def test_cli_parses_step_sizes_and_margins_and_refuses_bad_ones_in_one_line(tmp_path, capsys):
    from learned_opt.cli import build_parser
    from learned_opt.cli import main as cli_main
    from pretrain.bench.cli import periodic_config

    argv = ["bench", "--generator", "g", "--out", str(tmp_path / "b")]
    assert periodic_config(build_parser().parse_args(argv + ["--step-size", "1,0.5,0.25"])).step_size == (1, 0.5, 0.25)
    assert periodic_config(build_parser().parse_args(argv)).step_size == (1.0,)
    for bad in ("0", "1,-0.5", "1,x", "nan"):
        assert cli_main(argv + ["--step-size", bad]) == 2
        err = capsys.readouterr().err
        assert "--step-size" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["bench", "--mode", "lopt", "--out", str(tmp_path / "l"), "--step-size", "0.5"]) == 2
    assert "--step-size" in capsys.readouterr().err
    assert periodic_config(build_parser().parse_args(argv + ["--min-improvement", "0.01"])).min_improvement == 0.01
    assert periodic_config(build_parser().parse_args(argv)).min_improvement == 0.0
    for bad in ("-0.1", "1"):
        assert cli_main(argv + ["--min-improvement", bad]) == 2
        err = capsys.readouterr().err
        assert "--min-improvement" in err and len(err.strip().splitlines()) == 1


def test_cli_passes_guidance_rank_and_keep_to_the_config():
    from learned_opt.cli import build_parser
    from pretrain.bench.cli import periodic_config

    args = build_parser().parse_args(["bench", "--generator", "g", "--out", "o", "--guidance", "1.5", "--rank", "self",
                                      "--candidates", "4", "--no-keep-if-met"])
    config = periodic_config(args)
    assert (config.guidance, config.rank, config.candidates, config.keep_if_met) == (1.5, "self", 4, False)
    assert periodic_config(build_parser().parse_args(["bench", "--generator", "g", "--out", "o"])).keep_if_met


# ---------------------------------------------------------------------- end to end


def test_tiny_bench_end_to_end(small_data, manifest, tmp_path):
    from pretrain.bench import format_summary

    out = tmp_path / "bench"
    config = BenchConfig(generator=str(manifest), out=str(out), inits=2, steps=20, every=(10,), eval_every=5,
                         holdout=500, sampling_steps=2, prompt="frac:0.9", progress=False)
    rng = torch.random.get_rng_state()
    r = run_bench(config, data=small_data)
    assert torch.equal(torch.random.get_rng_state(), rng)
    saved = json.loads((out / "bench.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"bench.json holds {c}: not strict JSON"))
    for key in ("mode", "config", "moments", "prompt", "generator", "closure_metric", "data", "hardware", "seeds",
                "grid", "bases", "wall_seconds"):
        assert key in saved, key
    assert saved["mode"] == "periodic" and saved["moments"] == "keep"
    assert saved["prompt"]["rule"] == "fraction of the current metric" and saved["prompt"]["fraction"] == 0.9
    assert saved["generator"]["name"] == "tiny-mnist" and len(saved["generator"]["sha256"]) == 64
    assert saved["data"] == {"train_examples": 2500, "holdout_examples": 500, "test_examples": 1000}
    assert saved["seeds"] == [3_000_000, 3_000_001] and saved["grid"] == [0, 5, 10, 15, 20]
    assert set(saved["bases"]) == {"adam", "sgd"}
    for base, section in saved["bases"].items():
        configs = section["configs"]
        assert set(configs) == {"base", "every=10"}
        finals = [row["final_test_loss"] for row in configs["base"]["rows"]]
        assert section["target"] == pytest.approx(statistics.median(finals))
        alone, periodic = configs["base"], configs["every=10"]
        for i in range(2):
            # same init and same minibatches: equal until the first generative update (after step 10)
            assert periodic["test_loss"][i][:2] == alone["test_loss"][i][:2]
            row = periodic["rows"][i]
            assert row["attempted"] == 2 and row["accepted"] + row["rejected"] + row["failed"] == 2
            assert alone["rows"][i]["attempted"] == 0
            assert row["train_seconds"] == periodic["wall_s"][i][-1] > 0
            assert row["generation_seconds"] > 0
            if not row["accepted_at"]:  # no update accepted: the very same run as the base alone
                assert periodic["test_loss"][i] == alone["test_loss"][i]
        s = periodic["summary"]
        assert s["inits"] == 2 and 0 <= s["never_worse"] <= 1 and s["attempted"] == 4
        assert {k: v for k, v in s.items() if not k.startswith("curve_")} == summarise(periodic["rows"], alone["rows"])
        assert alone["summary"]["curve_steps_to_target"] == 20  # the base's median curve meets its own target last
        assert {"curve_steps_ratio", "curve_wall_ratio"} <= set(s)
    assert (out / "periodic.png").stat().st_size > 1000 and r["plots"] == [str(out / "periodic.png")]
    table = format_summary(r)
    assert "every=10" in table and "steps to target" in table and "target:" in table


def test_median_curve_counts_every_init_and_its_ratio_refers_to_the_base():
    from pretrain.bench import Run, curve_summary

    grid = [0, 10, 20, 30]
    base = [Run([2.0, 1.5, 1.2, 1.0], [0.0, 1.0, 2.0, 3.0]), Run([2.0, 1.6, 1.3, 1.2], [0.0, 1.0, 2.0, 3.0]),
            Run([2.0, 1.4, 1.1, 0.9], [0.0, 1.0, 2.0, 3.0])]
    fast = [Run([2.0, 1.0, 0.9, 0.8], [0.0, 2.0, 4.0, 6.0]), Run([2.0, 1.7, 1.6, 1.5], [0.0, 2.0, 4.0, 6.0]),
            Run([2.0, 0.9, 0.8, 0.7], [0.0, 2.0, 4.0, 6.0])]
    b = curve_summary(grid, base, target=1.0)
    assert b == {"curve_steps_to_target": 30, "curve_wall_to_target_s": 3.0}
    f = curve_summary(grid, fast, target=1.0, base=b)
    # median curve of `fast`: 2.0, 1.0, 0.9, 0.8 -> reaches 1.0 at step 10, in 2 s
    assert f["curve_steps_to_target"] == 10 and f["curve_steps_ratio"] == pytest.approx(10 / 30)
    assert f["curve_wall_ratio"] == pytest.approx(2.0 / 3.0)
    never = curve_summary(grid, [Run([2.0, 1.9, 1.8, 1.7], [0.0, 1.0, 2.0, 3.0])], target=1.0, base=b)
    assert never["curve_steps_to_target"] is None and never["curve_steps_ratio"] is None


def test_median_curve_counts_a_diverged_init_as_worse_than_any_loss():
    from pretrain.bench import Run, curve_summary, median_curve

    nan = float("nan")
    assert median_curve([[2.0, nan], [2.0, nan], [2.0, 0.5]]) == [2.0, float("inf")]
    runs = [Run([2.0, nan], [0.0, nan]), Run([2.0, nan], [0.0, nan]), Run([2.0, 0.5], [0.0, 1.0])]
    assert curve_summary([0, 10], runs, target=1.0)["curve_steps_to_target"] is None


# ---------------------------------------------------------------------- any supervised task


def test_a_control_task_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="bench measures supervised tasks.*'cartpole-mlp' is a control task"):
        run_bench(BenchConfig(generator="cartpole-mlp", out=str(tmp_path / "b"), progress=False))
    code = cli_main(["bench", "--generator", "cartpole-mlp", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bench measures supervised tasks" in err
    assert not (tmp_path / "b").exists()


def test_a_user_cnn_task_named_with_task(tmp_path, capsys):
    ref = write_user_task(tmp_path, "bench-user-cnn", USER_CNN)
    manifest = save_tiny_mnist_generator(tmp_path / "gen", task=ref, name="tiny-cnn")
    # the manifest of a task this process has never seen: bench needs --task
    moved = json.loads(manifest.read_text())
    moved["task"] = "bench-user-cnn-elsewhere"
    manifest.write_text(json.dumps(moved))
    args = ["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--inits", "1", "--steps", "10",
            "--bases", "adam", "--every", "5", "--eval-every", "5", "--holdout", "100", "--sampling-steps", "2",
            "--no-progress", "--no-plots"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--task" in err
    assert "'bench-user-cnn-elsewhere', which is not registered" in err
    assert cli_main([*args, "--task", ref]) == 0
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved["task"] == "bench-user-cnn" and saved["config"]["task"] == ref
    assert saved["data"] == {"train_examples": 400, "holdout_examples": 100, "test_examples": 200}
    assert saved["bases"]["adam"]["hparams"]["lr"] == 1e-3 and saved["grid"] == [0, 5, 10]
    assert saved["bases"]["adam"]["configs"]["every=5"]["rows"][0]["attempted"] == 2
    # a task whose network is not the generator's
    with pytest.raises(ConfigError, match="does not fit the network of task 'mnist-mlp'"):
        run_bench(BenchConfig(generator=str(manifest), out=str(tmp_path / "c"), task="mnist-mlp", progress=False))
