"""``learned-opt eval`` on a ``cartpole-mlp`` generator: the PPO baseline, the solved share and weight
matching of two hidden layers (the permutation check of both tasks is in ``test_evaluate.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from test_corpus_cartpole import corpus_cli
from test_demo_cartpole import save_tiny_cartpole_generator
from test_evaluate import record_split
from train_helpers import make_store

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from pretrain.store import Store
from pretrain.evaluate import (
    align_hidden_units,
    aligned_distance,
    init_params,
    r2_score,
    solved_share,
    steps_to_reach,
)

TASK = tasks.get("cartpole-mlp")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A 3-run cartpole-mlp corpus of one PPO update each, 5 checkpoints per run."""
    out = tmp_path_factory.mktemp("cartpole") / "store"
    assert cli_main(corpus_cli(out, "--runs", "3", "--batch-runs", "3")) == 0
    return out


def test_env_steps_to_reach_a_return_on_known_curves():
    grid = [0, 1024, 2048, 3072]
    curves = torch.tensor([[9.0, 40.0, 120.0, 80.0], [9.0, 20.0, 30.0, 40.0], [480.0, 500.0, 500.0, 500.0]])
    # at or above, equality counts; a curve that falls again keeps its first crossing
    assert steps_to_reach(grid, curves, torch.tensor([40.0, 41.0, 475.0]), "max") == [1024, None, 0]
    assert steps_to_reach(grid, curves, torch.tensor([100.0, float("nan"), 500.0]), "max") == [2048, None, 1024]
    assert steps_to_reach(grid, curves[:1], torch.tensor([9.0])) == [0]  # the default is still "at or below"


def test_solved_share_counts_returns_at_or_above_475():
    assert TASK.solved_return == 475.0
    assert solved_share(torch.tensor([475.0, 474.9, 500.0, 9.0]), TASK.solved_return) == 0.5


def test_weight_matching_sweeps_never_increase_the_distance():
    a, b = init_params(TASK, [7, 8])

    def dist(perms):
        return float((a - TASK.permute(b[None], [q[None] for q in perms])[0]).norm())

    first, swept = align_hidden_units(TASK, a, b, sweeps=0), align_hidden_units(TASK, a, b)
    assert dist(swept) <= dist(first) + 1e-6 and dist(swept) < float((a - b).norm())
    assert aligned_distance(TASK, a, b)[0] == pytest.approx(dist(swept), rel=1e-6)


def _reached(grid, curve, target):
    """The first grid step at or above ``target``, written out for the check."""
    return next((s for s, v in zip(grid, curve) if v >= target), None)


def test_eval_cartpole_end_to_end(store, tmp_path, capsys):
    heldout = Store.open(store).run_ids()[1:]
    manifest = record_split(save_tiny_cartpole_generator(tmp_path / "gen"), heldout)
    out = tmp_path / "eval"
    code = cli_main(["eval", "--generator", str(manifest), "--store", str(store), "--out", str(out), "--inits", "2",
                     "--prompts", "3", "--sampling-steps", "2", "--repeats", "2", "--max-env-steps", "2048",
                     "--memo-checkpoints", "3", "--denoise-runs", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for row in ("return, 1 update", "share with return >= 475, 2 updates", "PPO env steps to reach the update",
                "PPO env steps to reach 475", "prompt alignment R²", "return of that nearest checkpoint",
                "OOD uniform-x3: return, 2 updates", "ms/env step", "denoising, 1 held-out runs"):
        assert row in printed, row
    r = json.loads((out / "eval.json").read_text())
    n = 2
    assert r["generator"]["task"] == "cartpole-mlp" and r["generator"]["metric"] == "return"
    assert r["seeds"] == [1_000_000, 1_000_001] and r["config"]["max_env_steps"] == 2048

    # one step, repeats and the solved share
    before, after = torch.tensor(r["one_step"]["before"]["return"]), torch.tensor(r["one_step"]["after"]["return"])
    assert set(r["one_step"]["before"]) == {"return"} and before.shape == after.shape == (n,)
    assert bool(((before > 0) & (before <= 500) & (after > 0) & (after <= 500)).all())
    torch.testing.assert_close(before, TASK.evaluate(init_params(TASK, r["seeds"]))["return"])
    rep = torch.tensor(r["repeated"]["return"])  # [3, N]
    assert r["repeated"]["updates"] == [0, 1, 2] and rep.shape == (3, n)
    assert torch.equal(rep[0], before) and torch.equal(rep[1], after)
    solved = r["one_step"]["solved"]
    assert solved["threshold"] == 475.0 and list(solved["share"]) == ["0", "1", "2"]
    for k, share in solved["share"].items():
        assert 0.0 <= share <= 1.0 and share == sum(x >= 475.0 for x in rep[int(k)].tolist()) / n

    # PPO from the same inits, a checkpoint after each update of 8 x 128 env steps
    bl = r["baselines"]
    grid = bl["env_steps"]
    assert grid == [0, 1024, 2048] and bl["ppo"]["shape"]["total_steps"] == 2048 and bl["ppo"]["hparams"]["lr"] == 3e-4
    curves = torch.tensor(bl["ppo"]["return"])
    assert curves.shape == (n, len(grid)) and bool(((curves > 0) & (curves <= 500)).all())
    torch.testing.assert_close(curves[:, 0], before)  # every PPO run starts at its init
    for key, targets in (("steps_to_reach", after.tolist()), ("steps_to_solve", [475.0] * n)):
        reach = bl["ppo"][key]
        assert len(reach) == n and all(s is None or s in grid for s in reach)
        assert reach == [_reached(grid, c, t) for c, t in zip(curves.tolist(), targets)]
    assert bl["summary"]["ppo_not_reached"] == bl["ppo"]["steps_to_reach"].count(None)
    assert bl["summary"]["ppo_not_solved"] == bl["ppo"]["steps_to_solve"].count(None)
    assert bl["summary"]["ppo_final_solved_share"] == sum(c >= 475.0 for c in curves[:, -1].tolist()) / n

    t = r["timing"]
    assert t["update_seconds"] == pytest.approx(t["sample_seconds"] + t["metric_seconds"])
    assert t["ppo_seconds_per_env_step"] > 0 and t["ppo_timing_env_steps"] == 2048
    assert len(t["speedup_vs_ppo"]) == n
    assert [s is None for s in t["speedup_vs_ppo"]] == [s is None for s in bl["ppo"]["steps_to_reach"]]

    # prompts from the best prompt (500) down to each init's return
    pa = r["prompt_alignment"]
    prompts, achieved = torch.tensor(pa["prompts"]), torch.tensor(pa["achieved"])
    assert prompts.shape == achieved.shape == (n, 3)
    torch.testing.assert_close(prompts[:, 0], torch.full((n,), 500.0))
    torch.testing.assert_close(prompts[:, -1], before)
    torch.testing.assert_close(r2_score(prompts, achieved), torch.tensor(pa["r2"]))

    memo = r["memorisation"]
    assert memo["runs_searched"] == 3 and memo["checkpoints_searched"] == 3 * 3
    assert len(memo["nearest_distance"]) == n and len(memo["nearest_return"]) == n
    assert memo["generated_return"] == r["one_step"]["after"]["return"] and "test_loss" not in str(memo["summary"])
    assert all(a <= u + 1e-4 for a, u in zip(memo["nearest_distance"], memo["nearest_distance_unaligned"]))
    assert all(8 <= x <= 500 for x in memo["nearest_return"])
    for section in r["ood"].values():
        assert torch.tensor(section["return"]).shape == (3, n) and "return_after_2" in section["summary"]
    den = r["denoising"]
    assert den["runs_used"] == 1 and den["run_ids"] == heldout[:1] and r["config"]["denoise_runs"] == 1
    assert "no training runs" in den["train_runs"]["skipped"]  # the split records none
    assert all(len(den[k]) == len(den["timesteps"]) == 7 for k in ("x0_mse", "identity_mse", "ratio", "cosine"))
    for png in ("one_step.png", "prompt_alignment.png", "baselines.png", "denoising.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.parametrize("extra, message", [
    (["--max-env-steps", "1000"], "--max-env-steps must be >= 1024"),
    (["--store", "MNIST_STORE"], "--store holds 'mnist-mlp' runs but the generator is for 'cartpole-mlp'"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    manifest = save_tiny_cartpole_generator(tmp_path / "gen")
    if "MNIST_STORE" in extra:
        extra = ["--store", str(make_store(tmp_path / "mnist", runs=2, checkpoints=2).root)]
    assert cli_main(["eval", "--generator", str(manifest), "--out", str(tmp_path / "eval"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "eval").exists()


def test_cartpole_candidates_count_the_env_steps_spent_choosing(tmp_path):
    from pretrain.evaluate import EvalConfig, evaluate_generator

    manifest = save_tiny_cartpole_generator(tmp_path / "gen")
    config = EvalConfig(generator=str(manifest), out=str(tmp_path / "eval"), inits=2, prompts=2, sampling_steps=2,
                        repeats=2, candidates=3, max_env_steps=2048, timing_steps=5, progress=False, plots=False)
    r = evaluate_generator(config)
    counted = r["sampler"]["candidates_scored"]["one_step_and_repeats"]
    assert counted["networks"] == 2 * 2 * 3  # inits x updates x candidates
    assert counted["env_steps"] >= counted["networks"] * 10  # every scored episode lasts at least one step
    assert r["sampler"]["candidates_scored"]["all_sections"]["networks"] > counted["networks"]
