"""Batched PPO, the corpus builder and ``eval`` on a control task that is not CartPole (Acrobot-v1,
from a task file): nothing outside the task file knows which environment it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learned_opt import cli, tasks
from learned_opt.baselines.ppo import PPOHparams, PPOShape, train_ppo
from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator
from learned_opt.normalization import Normalization
from learned_opt.pretrained import save_generator
from pretrain.evaluate import EvalConfig, evaluate_generator, format_summary, suite_for
from pretrain.seeding import seeded_init
from pretrain.store import Store

REF = f"{Path(__file__).with_name('acrobot_task.py')}:AcrobotMLP"
SHAPE = PPOShape(envs=2, horizon=32, epochs=1, minibatches=2, total_steps=128)  # 2 updates, 4 gradient steps


@pytest.fixture(scope="module")
def task():
    return tasks.get(REF)


def test_batched_ppo_trains_acrobot_policies_each_from_its_own_streams(task):
    init = torch.stack([seeded_init(task, s) for s in (1, 2)])
    both = train_ppo(task, init, PPOHparams(lr=[1e-3, 3e-3]), SHAPE, run_seeds=[1, 2], num_checkpoints=3)
    assert both.checkpoints.shape == (2, 3, task.num_params) and torch.equal(both.checkpoints[:, 0], init)
    assert bool(torch.isfinite(both.checkpoints).all()) and not torch.equal(both.checkpoints[:, -1], init)
    assert bool((both.train_return >= -20).all())  # episodes of at most 20 steps, reward -1 per step
    # run 2 alone (its episodes reset from its own stream) is run 2 beside run 1
    alone = train_ppo(task, init[1:], PPOHparams(lr=[3e-3]), SHAPE, run_seeds=[2], num_checkpoints=3)
    torch.testing.assert_close(alone.checkpoints[0], both.checkpoints[1], rtol=0, atol=1e-6)


def save_tiny_generator(task, folder):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_generator(task.layout(), "tiny")
    return save_generator(folder, "tiny-acrobot", model, DiffusionConfig(num_steps=50), Normalization(1.0, -40.0, 0.0),
                          task=task.name, metric="return", best_prompt=0.0, corpus={"runs": 0}, training={"steps": 0})


def test_corpus_and_eval_of_a_control_task_from_a_file(task, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli.main(["corpus", "--task", REF, "--runs", "2", "--batch-runs", "2", "--env-steps", "1024",
                     "--checkpoints", "3", "--out", str(out), "--no-progress"]) == 0
    store = Store.open(out)
    assert store.task_name == task.name and store.run_ids() == [0, 1]
    assert store.settings["ranges"]["lr"] == [1e-3, 2e-3]  # the task's corpus_ranges
    for r in store.run_ids():
        run = store.read_run(r)
        assert 1e-3 <= run.hparams["lr"] <= 2e-3 and run.params.shape == (3, task.num_params)
        assert bool(((run.metrics["return"] >= -40) & (run.metrics["return"] <= 0)).all())

    assert suite_for(task).solved_return is None  # Acrobot sets no solved return
    manifest = save_tiny_generator(task, tmp_path / "gen")
    config = EvalConfig(generator=str(manifest), store=str(out), out=str(tmp_path / "eval"), inits=2, prompts=2,
                        sampling_steps=2, repeats=1, candidates=2, max_env_steps=1024, memo_checkpoints=2,
                        memo_queries=2, timing_steps=5, progress=False, plots=False)
    r = evaluate_generator(config)
    assert r["baselines"]["env_steps"] == [0, 1024] and "steps_to_solve" not in r["baselines"]["ppo"]
    assert "solved" not in r["one_step"] and len(r["one_step"]["after"]["return"]) == 2
    scored = r["sampler"]["candidates_scored"]["one_step_and_repeats"]
    assert scored["networks"] == 2 * 2 and 0 < scored["env_steps"] <= scored["networks"] * 3 * 40
    assert "PPO env steps to reach the update" in format_summary(r)


def test_the_control_demo_runs_on_acrobot(task, tmp_path):
    from learned_opt.demo.cartpole import format_control_table, run_control_demo
    from learned_opt.demo.update import DemoConfig

    manifest = save_tiny_generator(task, tmp_path / "gen")
    config = DemoConfig(task=REF, generator=str(manifest), out=str(tmp_path / "demo"), ppo_env_steps=1024,
                        sampling_steps=2)
    result = run_control_demo(config)
    assert result["ppo"]["env_steps"] == [0, 1024] and result["episode"]["label"] == "observation 0"
    assert 1 <= len(result["episode"]["traced"]["init"]) <= 40 and Path(result["plot"]).stat().st_size > 1000
    assert "greedy return" in format_control_table(result)
