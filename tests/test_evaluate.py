"""``pretrain.evaluate``: its helpers on known data, and ``learned-opt eval`` end to end on a tiny setup."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from test_demo import save_tiny_mnist_generator
from train_helpers import make_store

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator, get_config
from learned_opt.normalization import Normalization
from learned_opt.pretrained import LoadedGenerator
from pretrain.evaluate import (
    EvalConfig,
    aligned_distance,
    denoise_timesteps,
    hungarian,
    init_params,
    log_grid,
    nearest_aligned,
    r2_score,
    steps_to_reach,
    summary,
)
from pretrain.evaluate.denoising import measure_denoising
from pretrain.evaluate.plots import plot_denoising
from pretrain.evaluate.report import denoising_lines

TASK = tasks.get("mnist-mlp")


def test_r2_on_known_data():
    prompted = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    achieved = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.5, 1.0, 2.5]])
    # 1 - SS_res / SS_tot with SS_tot = 2 for each row
    expected = torch.tensor([1.0, 1.0 - 2.0 / 2.0, 1.0 - 0.5 / 2.0])
    torch.testing.assert_close(r2_score(prompted, achieved), expected)
    # achieved = prompted + 1 everywhere: well correlated but off the identity, so R² < 0
    assert float(r2_score(prompted[0], prompted[0] + 1)) == pytest.approx(1 - 3 / 2)


def test_log_grid_and_summary():
    assert log_grid(3000) == [0, 10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 3000]
    assert log_grid(11700)[-3:] == [5000, 10000, 11700]
    assert log_grid(7) == [0, 7]
    s = summary([1.0, 2.0, None, 3.0, float("nan"), 4.0, 5.0])
    assert (s["n"], s["median"], s["q1"], s["q3"], s["min"], s["max"]) == (5, 3.0, 2.0, 4.0, 1.0, 5.0)
    assert summary([None])["median"] is None


def test_steps_to_reach_on_known_curves():
    grid = [0, 10, 20, 50]
    curves = torch.tensor([[2.3, 1.0, 0.5, 0.4], [2.3, 2.0, 1.9, 1.8], [2.3, 1.0, 0.5, 0.4]])
    assert steps_to_reach(grid, curves, torch.tensor([0.5, 0.5, 2.5])) == [20, None, 0]


def test_hungarian_is_exact():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        cost = torch.rand(5, 5, generator=g, dtype=torch.float64)
        col = hungarian(cost)
        best = min(sum(float(cost[i, p[i]]) for i in range(5)) for p in itertools.permutations(range(5)))
        assert sorted(col.tolist()) == list(range(5))
        assert float(cost[torch.arange(5), col].sum()) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name", ["mnist-mlp", "cartpole-mlp", "mnist-cnn"])  # one hidden layer, two, two convolutions
def test_aligned_distance_sees_through_permutations(name):
    task = tasks.get(name)
    theta = init_params(task, [5, 6])  # [2, P]
    perm = task.random_permutations(1, torch.Generator().manual_seed(1))
    permuted = task.permute(theta[:1], perm)[0]
    d, p = aligned_distance(task, theta[0], permuted)
    assert d < 1e-5 and len(p) == len(task.hidden_sizes())
    assert torch.equal(task.permute(permuted[None], [q[None] for q in p])[0], theta[0])
    assert float((theta[0] - permuted).norm()) > 1.0  # unaligned, the copy looks far away
    # among candidates, the permuted copy is found (and excluded when masked)
    cands = torch.stack([theta[1], permuted, theta[1] * 0.5])
    dist, idx = nearest_aligned(task, theta[:1], cands, refine=2)
    assert idx.tolist() == [1] and float(dist[0]) < 1e-4
    dist, idx = nearest_aligned(task, theta[:1], cands, exclude=torch.tensor([[False, True, False]]))
    assert idx.tolist() != [1] and float(dist[0]) > 1.0


def test_init_kinds_and_seeds():
    a, b = init_params(TASK, [1, 2]), init_params(TASK, [1, 2])
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    x3 = init_params(TASK, [1, 2], "uniform-x3")
    torch.testing.assert_close(x3, 3 * a)
    k = TASK.layout().unflatten(init_params(TASK, [1], "kaiming-normal"))
    assert float(k["fc1.bias"].abs().sum()) == 0.0
    assert float(k["fc1.weight"].std()) == pytest.approx(math.sqrt(2 / 784), rel=0.1)


def _finite(x) -> bool:
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return x is None or math.isfinite(x)


@pytest.mark.slow
def test_eval_end_to_end(mnist_root, tmp_path, capsys):
    manifest = record_split(save_tiny_mnist_generator(tmp_path / "gen"), [1, 3], [0, 2])
    store = make_store(tmp_path / "store", runs=4, checkpoints=6)
    out = tmp_path / "eval"
    code = cli_main(["eval", "--generator", str(manifest), "--store", str(store.root), "--out", str(out),
                     "--data-root", str(mnist_root), "--inits", "3", "--prompts", "4", "--max-steps", "50",
                     "--sampling-steps", "2", "--repeats", "5", "--memo-checkpoints", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "prompt alignment" in printed and "Adam steps to reach" in printed
    assert "denoising, 2 held-out runs" in printed
    r = json.loads((out / "eval.json").read_text())
    n = 3
    assert r["seeds"] == [1_000_000, 1_000_001, 1_000_002]
    assert len(r["generator"]["sha256"]) == 64 and r["hardware"]["cpu_count"] >= 1
    for when in ("before", "after"):
        for m in ("test_loss", "test_error"):
            assert len(r["one_step"][when][m]) == n and _finite(r["one_step"][when][m])
    grid = r["baselines"]["grid"]
    assert grid == [0, 10, 20, 30, 50]
    for o in ("adam", "sgd"):
        curve = torch.tensor(r["baselines"][o]["test_loss"])
        assert curve.shape == (n, len(grid)) and torch.isfinite(curve).all()
        # the same inits: every baseline starts where the one-step section measured them
        torch.testing.assert_close(curve[:, 0], torch.tensor(r["one_step"]["before"]["test_loss"]), rtol=1e-4, atol=1e-5)
        assert (curve[:, -1] < curve[:, 0]).all()
        reach = r["baselines"][o]["steps_to_reach"]
        assert reach == steps_to_reach(grid, curve, torch.tensor(r["one_step"]["after"]["test_loss"]))
    t = r["timing"]
    assert t["update_seconds"] == pytest.approx(t["sample_seconds"] + t["metric_seconds"]) and t["adam_seconds_per_step"] > 0
    pa = r["prompt_alignment"]
    assert torch.tensor(pa["prompts"]).shape == (n, 4) == torch.tensor(pa["achieved"]).shape
    torch.testing.assert_close(r2_score(torch.tensor(pa["prompts"]), torch.tensor(pa["achieved"])),
                               torch.tensor(pa["r2"]))
    assert pa["r2_mean"] == pytest.approx(sum(pa["r2"]) / n, rel=1e-5)
    for section in (r["repeated"], *r["ood"].values()):
        assert section["updates"] == list(range(6))
        assert torch.tensor(section["test_error"]).shape == (6, n) and _finite(section["test_loss"])
        assert "test_error_after_5" in section["summary"] and "test_error_after_10" not in section["summary"]
    torch.testing.assert_close(torch.tensor(r["repeated"]["test_loss"][1]), torch.tensor(r["one_step"]["after"]["test_loss"]))
    memo = r["memorisation"]
    assert memo["runs_searched"] == 4 and memo["checkpoints_searched"] == 4 * 3
    assert len(memo["nearest_distance"]) == n and _finite(memo["nearest_distance"])
    assert all(a <= u + 1e-4 for a, u in zip(memo["nearest_distance"], memo["nearest_distance_unaligned"]))
    assert len(memo["corpus_nn_distance"]) == 12 and memo["nearest_run"][0] in range(4)
    den = r["denoising"]
    assert den["runs_used"] == 2 and den["timesteps"] == [49, 34, 20, 10, 5, 1, 0] and len(den["ratio"]) == 7
    train = den["train_runs"]  # the same check on runs the generator trained on
    assert train["split"] == "train" and train["run_ids"] == [0, 2] and train["timesteps"] == den["timesteps"]
    assert den["split"] == "heldout" and den["run_ids"] == [1, 3] and train["ratio"] != den["ratio"]
    assert "(ratio on 2 training runs)" in "\n".join(denoising_lines(den))
    for png in ("one_step.png", "prompt_alignment.png", "baselines.png", "denoising.png"):
        assert (out / png).stat().st_size > 1000


def test_eval_without_store_skips_memorisation_and_denoising(mnist_data, tmp_path):
    from pretrain.evaluate import evaluate_generator

    manifest = record_split(save_tiny_mnist_generator(tmp_path / "gen"), [0, 1])
    config = EvalConfig(generator=str(manifest), out=str(tmp_path / "eval"), inits=2, prompts=2, max_steps=10,
                        sampling_steps=1, repeats=1, timing_steps=5, progress=False, plots=False)
    r = evaluate_generator(config, data=mnist_data)
    assert "skipped" in r["memorisation"] and "--store" in r["memorisation"]["skipped"]
    assert set(r["denoising"]) == {"skipped"} and "--store" in r["denoising"]["skipped"]
    assert not (tmp_path / "eval" / "baselines.png").exists()


def test_eval_refuses_corpus_seeds(mnist_data, tmp_path):
    from learned_opt.errors import ConfigError
    from pretrain.evaluate import evaluate_generator

    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    store = make_store(tmp_path / "store", runs=2, checkpoints=3)
    config = EvalConfig(generator=str(manifest), store=str(store.root), out=str(tmp_path / "eval"), seed=1, inits=2,
                        progress=False)
    with pytest.raises(ConfigError, match="used for corpus runs"):
        evaluate_generator(config, data=mnist_data)


def test_diverged_baselines_are_not_counted_as_not_reached():
    from pretrain.evaluate import reach_summary

    nan = float("nan")
    curves = torch.tensor([[2.0, 1.0, 0.5], [nan, nan, nan], [2.0, 1.9, 1.8]])
    out = reach_summary([20, None, None], curves)
    assert out["diverged"] == 1 and out["not_reached"] == 1 and out["steps_to_reach"]["n"] == 1


# ---------------------------------------------------------------------- denoising


def record_split(manifest: Path, heldout: list[int], train: list[int] = ()) -> Path:
    """Write a training split into a saved generator's manifest (as ``pretrain.train`` records it)."""
    m = json.loads(manifest.read_text())
    m["corpus"]["split"] = {"train": list(train), "heldout": list(heldout), "heldout_fraction": 0.5, "seed": 0}
    manifest.write_text(json.dumps(m))
    return manifest


def tiny_generator(task_name: str, precondition: bool = False, perturb: float = 0.0,
                   heldout: list[int] | None = None) -> LoadedGenerator:
    """A tiny in-memory generator on a 50-step schedule; ``perturb`` 0 leaves its decoder at zero."""
    task = tasks.get(task_name)
    diffusion = DiffusionConfig(num_steps=50)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = dataclasses.replace(get_config("tiny"), precondition=precondition)
        model = build_generator(task.layout(), config, diffusion)
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(torch.randn(p.shape) * perturb)
    metric = {"mnist-mlp": "test_loss", "cartpole-mlp": "return"}[task_name]
    gen = LoadedGenerator.from_model(model, diffusion, Normalization(4.0, 0.0, 2.5), task=task_name, metric=metric,
                                     best_prompt=0.0)
    if heldout is not None:
        gen.manifest["corpus"] = {"split": {"train": [], "heldout": heldout, "heldout_fraction": 0.5, "seed": 0}}
    return gen


def test_denoise_timesteps_scale_to_the_schedule():
    assert denoise_timesteps(1000) == [999, 700, 400, 200, 100, 30, 5]
    assert denoise_timesteps(50) == [49, 34, 20, 10, 5, 1, 0]
    assert denoise_timesteps(3) == [2, 1, 0]  # deduplicated


@pytest.mark.parametrize("name", ["mnist-mlp", "cartpole-mlp"])
@pytest.mark.parametrize("precondition", [False, True])
def test_denoising_of_a_zero_decoder_is_returning_theta(tmp_path, name, precondition):
    store = make_store(tmp_path / "store", task=name, runs=4, checkpoints=5)
    gen = tiny_generator(name, precondition, heldout=[3, 1, 99, 2])  # run 99 is not in the store
    was_training = gen.model.training
    den = measure_denoising(gen, store, EvalConfig(generator="unused", denoise_runs=2))
    assert gen.model.training == was_training
    assert den["runs_used"] == 2 and den["run_ids"] == [3, 1] and den["timesteps"] == [49, 34, 20, 10, 5, 1, 0]
    for key in ("x0_mse", "identity_mse", "ratio", "cosine"):
        assert len(den[key]) == 7, key
    assert {"noise_seed", "num_steps", "what_it_means"} <= set(den)
    # the untrained model returns θ exactly: its x0 MSE is that of returning θ at every t
    assert den["ratio"] == pytest.approx([1.0] * 7, abs=1e-9) and den["cosine"] == [0.0] * 7
    pairs = [store.read_checkpoints(r, [0, 4]) for r in (3, 1)]
    expected = sum(float(((4.0 * (b - a)) ** 2).sum()) for a, b in pairs) / (2 * store.num_params)
    assert den["identity_mse"] == pytest.approx([expected] * 7, rel=1e-5)


def test_denoising_calls_the_model_as_training_does(tmp_path):
    store = make_store(tmp_path / "store", runs=3, checkpoints=4)
    gen = tiny_generator("mnist-mlp", perturb=1e-2, heldout=[0, 2])
    den = measure_denoising(gen, store, EvalConfig(generator="unused", sample_batch=1))  # one pair per batch
    assert den["runs_used"] == 2 and all(r != pytest.approx(1.0, abs=1e-6) for r in den["ratio"])
    # the same numbers written out with forward() on both pairs at once
    norm = gen.normalization
    theta = norm.params(torch.stack([store.read_checkpoints(r, [0])[0] for r in (0, 2)]))
    target = norm.params(torch.stack([store.read_checkpoints(r, [3])[0] for r in (0, 2)]))
    values = [store.read_metrics(r)[1]["test_loss"] for r in (0, 2)]
    metric, prompt = norm.metric(torch.stack([v[0] for v in values])), norm.metric(torch.stack([v[-1] for v in values]))
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(den["noise_seed"]))
    gen.model.eval()
    with torch.no_grad():
        for i, t in enumerate(den["timesteps"]):
            tt = torch.full((2,), t)
            pred = gen.model(gen.diffusion.q_sample(target, tt, noise), tt, theta, metric, prompt)
            assert den["x0_mse"][i] == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-4)
            cos = torch.nn.functional.cosine_similarity(pred - theta, target - theta, dim=1).mean()
            assert den["cosine"][i] == pytest.approx(float(cos), abs=1e-4)
    lines = denoising_lines(den)
    assert len(lines) == 4 and "2 held-out runs" in lines[0] and lines[2].split()[0] == "ratio"
    assert plot_denoising(den, tmp_path).stat().st_size > 1000


def test_denoising_is_skipped_without_a_store_a_split_or_runs(tmp_path):
    store = make_store(tmp_path / "store", runs=2, checkpoints=3)
    config = EvalConfig(generator="unused")
    assert "--store" in measure_denoising(tiny_generator("mnist-mlp", heldout=[0]), None, config)["skipped"]
    assert "held-out" in measure_denoising(tiny_generator("mnist-mlp"), store, config)["skipped"]
    assert "none of the 1" in measure_denoising(tiny_generator("mnist-mlp", heldout=[7]), store, config)["skipped"]
    off = EvalConfig(generator="unused", denoise_runs=0)
    assert "--denoise-runs 0" in measure_denoising(tiny_generator("mnist-mlp", heldout=[0]), store, off)["skipped"]
    assert denoising_lines({"skipped": "why"}) == ["denoising: why"]
    with pytest.raises(Exception, match="--denoise-runs must be >= 0"):
        EvalConfig(generator="unused", denoise_runs=-1)


def test_eval_candidates_keep_the_best_on_validation_data(mnist_data, tmp_path):
    from pretrain.evaluate import Sampler, evaluate_generator

    manifest = record_split(save_tiny_mnist_generator(tmp_path / "gen"), [0, 1])
    common = dict(generator=str(manifest), inits=2, prompts=2, max_steps=10, sampling_steps=2, repeats=1,
                  timing_steps=5, progress=False, plots=False)
    r = evaluate_generator(EvalConfig(out=str(tmp_path / "c3"), candidates=3, t_min=5, **common), data=mnist_data)
    assert {k: r["sampler"][k] for k in ("method", "steps", "t_min", "candidates")} == {
        "method": "ddim", "steps": 2, "t_min": 5, "candidates": 3}
    assert r["sampler"]["candidates_scored"]["one_step_and_repeats"]["networks"] == 2 * 1 * 3
    assert len(r["one_step"]["after"]["test_loss"]) == 2  # one network per init, not per candidate

    # the choice itself: of C samples per row, the one with the lowest score
    from learned_opt.pretrained import load_generator

    gen = load_generator(manifest)
    config = EvalConfig(generator=str(manifest), sampling_steps=2, candidates=4)
    scored = []

    def score(flat):
        s = flat[:, 0].clone()  # any deterministic score of the samples
        scored.append((flat.clone(), s))
        return s

    theta = init_params(TASK, [5, 6])
    out = Sampler(gen, config, seed=0, score=score)(theta, torch.ones(2), torch.zeros(2))
    flat, s = scored[0]
    assert flat.shape == (8, theta.shape[1])
    best = s.view(2, 4).argmin(1)
    torch.testing.assert_close(out, flat.view(2, 4, -1)[torch.arange(2), best])
    with pytest.raises(Exception, match="validation data"):
        Sampler(gen, config, seed=0)


def test_repeated_updates_keep_networks_that_already_meet_the_prompt(tmp_path):
    from learned_opt.pretrained import load_generator
    from pretrain.evaluate.sampler import Sampler, repeated_updates

    gen = load_generator(save_tiny_mnist_generator(tmp_path / "gen"))
    theta = init_params(TASK, [5, 6, 7])
    best = gen.best_prompt
    losses = {0: best / 2, 1: best + 1.0, 2: best}  # rows 0 and 2 already meet the best prompt

    def measure(flat):  # a metric per row that depends only on which init the row started from
        return {"test_loss": torch.tensor([losses[i] for i in range(flat.shape[0])])}

    for keep in (True, False):
        sampler = Sampler(gen, EvalConfig(generator="x", sampling_steps=2, keep_if_met=keep), seed=0)
        _, first = repeated_updates(sampler, theta, measure, 2, "test_loss")
        same = [torch.equal(first[i], theta[i]) for i in range(3)]
        assert same == ([True, False, True] if keep else [False, False, False])


def test_mnist_validation_data_is_the_held_out_training_slice(mnist_data):
    from learned_opt.errors import ConfigError

    val = TASK.validation_data(mnist_data, 1000)
    assert val.test_x.shape[0] == 1000 and val.train_x.shape[0] == mnist_data.train_x.shape[0] - 1000
    assert torch.equal(val.test_x, mnist_data.train_x[-1000:]) and torch.equal(val.test_y, mnist_data.train_y[-1000:])
    flat = init_params(TASK, [0])
    assert not torch.equal(TASK.evaluate(flat, val)["test_loss"], TASK.evaluate(flat, mnist_data)["test_loss"])
    for bad in (0, mnist_data.train_x.shape[0], 1.5):
        with pytest.raises(ConfigError, match="holdout"):
            TASK.validation_data(mnist_data, bad)
