"""``learned-opt demo`` on CartPole (the default task) and batched PPO used with one run, as the demo does."""

from __future__ import annotations

import json
import math
import os
import re
from unittest import mock

import pytest
import torch

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.baselines.ppo import PPOShape, train_ppo
from learned_opt.demo.cartpole import first_step_at_or_above
from learned_opt.diffusion import DiffusionConfig
from learned_opt.errors import EnvironmentStepError
from learned_opt.generator import build_generator
from learned_opt.normalization import Normalization
from learned_opt.pretrained import save_generator

from test_demo import save_tiny_mnist_generator


def save_tiny_cartpole_generator(folder, perturb: float = 1e-3, seed: int = 0):
    """A tiny untrained ``cartpole-mlp`` generator with slightly perturbed decoders, saved to ``folder``."""
    task = tasks.get("cartpole-mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_generator(task.layout(), "tiny")
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(torch.randn(p.shape) * perturb)
    return save_generator(
        folder, "tiny-cartpole", model, DiffusionConfig(num_steps=50), Normalization(1.0, 0.0, 500.0),
        task="cartpole-mlp", metric="return", best_prompt=500.0, corpus={"runs": 0}, training={"steps": 0},
    )


def seeded_policy(seed: int) -> torch.Tensor:
    task = tasks.get("cartpole-mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.layout().flatten_module(task.build_model())


def break_cartpole_step(monkeypatch):
    """Make every CartPole vector environment fail on its first step (a broken installation)."""
    from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv

    def step(self, action):
        raise RuntimeError("simulated physics failure")

    monkeypatch.setattr(CartPoleVectorEnv, "step", step)


# ---------------------------------------------------------------------- the PPO baseline


def one_run(task, init, updates, seed=0):
    """The demo's PPO: one run of the batched PPO, a checkpoint after every update."""
    return train_ppo(task, init[None], shape=PPOShape(total_steps=updates * 1024), run_seeds=[seed],
                     checkpoint_at=[u * 16 for u in range(updates + 1)])


def test_ppo_raises_the_greedy_return_of_a_random_policy():
    task = tasks.get("cartpole-mlp")
    init = seeded_policy(0)
    kept = init.clone()
    rng = torch.random.get_rng_state()
    run = one_run(task, init, 8)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left alone
    assert torch.equal(init, kept)  # the init is not modified
    assert run.env_steps.tolist() == [[i * 1024 for i in range(9)]]
    assert run.checkpoints.shape == (1, 9, task.num_params)
    assert torch.equal(run.checkpoints[0, 0], init)
    returns = task.evaluate(run.checkpoints[0])["return"]
    # a random tanh policy balances for a few dozen steps; 8 updates of PPO hold it several times
    # longer (an update with the wrong sign drives the return down to CartPole's minimum of ~9)
    assert returns[0] < 40
    assert returns[-1] > max(100.0, 3 * returns[0])
    again = one_run(task, init, 2)
    assert torch.equal(again.checkpoints[0], run.checkpoints[0, :3])  # deterministic for a seed


def test_a_failing_environment_step_raises_and_leaves_the_policy_alone(monkeypatch):
    task = tasks.get("cartpole-mlp")
    init = seeded_policy(1)
    kept = init.clone()
    break_cartpole_step(monkeypatch)
    with pytest.raises(EnvironmentStepError, match="CartPole(-v1)? failed to step: simulated physics failure"):
        task.evaluate(init[None])
    with pytest.raises(EnvironmentStepError, match="CartPole(-v1)? failed to step: simulated physics failure"):
        one_run(task, init, 1)
    assert torch.equal(init, kept)


def test_first_step_at_or_above_on_a_known_curve():
    steps, ret = [0, 1024, 2048, 3072], [9.0, 40.0, 120.0, 80.0]
    assert first_step_at_or_above(steps, ret, 40.0) == 1024  # at or above: equality counts
    assert first_step_at_or_above(steps, ret, 100.0) == 2048
    assert first_step_at_or_above(steps, ret, 5.0) == 0
    assert first_step_at_or_above(steps, ret, 200.0) is None
    assert first_step_at_or_above(steps, ret, math.nan) is None


# ---------------------------------------------------------------------- the demo


def test_cartpole_is_the_default_and_runs_end_to_end(tmp_path, capsys):
    manifest = save_tiny_cartpole_generator(tmp_path / "gen")
    out = tmp_path / "demo"
    rng = torch.random.get_rng_state()
    code = cli_main(["demo", "--generator", str(manifest), "--out", str(out), "--ppo-env-steps", "3000",
                     "--sampling-steps", "2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert torch.equal(torch.random.get_rng_state(), rng)  # the demo leaves the global RNG alone
    assert "random init" in printed and "PPO, 2,048 env steps" in printed and "greedy return" in printed
    assert (out / "demo_cartpole-mlp.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["demo_cartpole-mlp.json", "demo_cartpole-mlp.png"]
    result = json.loads((out / "demo_cartpole-mlp.json").read_text())
    assert {"task", "generator", "seed", "init", "update", "ppo", "ppo_reaches_update_at", "episode",
            "config"} <= result.keys()
    assert result["task"] == "cartpole-mlp" and result["generator"]["name"] == "tiny-cartpole"

    # the init's return is the task's evaluation of the seeded policy, whatever else was rolled out
    task = tasks.get("cartpole-mlp")
    init_return = float(task.evaluate(seeded_policy(1)[None])["return"][0])
    assert result["init"]["return"] == pytest.approx(init_return)
    up = result["update"]
    assert len(up["episode_returns"]) == 10 and up["return"] == pytest.approx(sum(up["episode_returns"]) / 10)
    if up["accepted"]:  # the guard: an accepted update is not worse than the init
        assert up["return"] >= init_return
    else:
        assert up["return"] == pytest.approx(init_return)

    ppo = result["ppo"]
    assert ppo["env_steps"] == [0, 1024, 2048]  # 3,000 rounded down to whole updates
    assert len(ppo["curve"]) == 3 and ppo["curve"][0] == pytest.approx(init_return)
    assert ppo["return"] == ppo["curve"][-1]
    reached = [s for s, r in zip(ppo["env_steps"], ppo["curve"]) if r >= up["return"]]
    assert result["ppo_reaches_update_at"] == (reached[0] if reached else None)

    ep = result["episode"]
    assert ep["observation"] == 2 and ep["label"] == "pole angle (rad)"  # CartPole's pole angle
    assert ep["limit"] == pytest.approx(0.2095, abs=1e-4) == task.traced_limit
    for policy in ("init", "update", "ppo"):
        angles = ep["traced"][policy]
        assert 1 <= len(angles) <= 500 and all(math.isfinite(a) for a in angles)
        assert angles[0] == pytest.approx(ep["start"][2], abs=1e-6)  # the episode's start
        # the episode ends once the pole leaves ±12° (or the cart leaves the track, or at 500 steps)
        assert all(abs(a) <= task.traced_limit for a in angles)
    assert len(ep["traced"]["init"]) == int(result["init"]["episode_returns"][0])
    assert len(ep["traced"]["ppo"]) == int(ppo["episode_returns"][0])


def test_the_default_demo_uses_the_shipped_generator(tmp_path, capsys):
    code = cli_main(["demo", "--out", str(tmp_path / "out"), "--ppo-env-steps", "2048"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "demo_cartpole-mlp.json").read_text())
    assert result["generator"]["name"] == "cartpole-mlp"
    assert (tmp_path / "out" / "demo_cartpole-mlp.png").stat().st_size > 0


def test_without_a_shipped_generator_the_demo_says_how_to_pass_one(tmp_path, capsys, monkeypatch):
    from learned_opt import pretrained

    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setattr(pretrained, "_weights_dir", lambda: empty)
    code = cli_main(["demo", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "no cartpole-mlp generator ships with this learned-opt yet" in err and "--generator PATH.json" in err
    assert not (tmp_path / "out").exists()


def test_a_generator_for_another_architecture_is_a_one_line_error(tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    args = ["demo", "--generator", str(manifest), "--out", str(tmp_path / "out"), "--ppo-env-steps", "1024"]
    code = cli_main([*args, "--task", "cartpole-mlp"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "does not fit the network of task 'cartpole-mlp'" in err and "fc1.weight" in err and "leave --task out" in err
    assert not (tmp_path / "out").exists()
    # without --task the demo runs the generator's own task (here: MNIST, which needs its data)
    monkeypatch_env = {k: v for k, v in os.environ.items() if k != "LEARNED_OPT_DATA"}
    with mock.patch.dict(os.environ, monkeypatch_env, clear=True):
        assert cli_main(args) == 2
    assert "no data root given" in capsys.readouterr().err


def test_a_broken_environment_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    manifest = save_tiny_cartpole_generator(tmp_path / "gen")
    break_cartpole_step(monkeypatch)
    code = cli_main(["demo", "--generator", str(manifest), "--out", str(tmp_path / "out"), "--ppo-env-steps", "1024",
                     "--sampling-steps", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and re.search("CartPole(-v1)? failed to step", err)
    assert not (tmp_path / "out").exists()


def test_a_ppo_budget_below_one_update_is_refused(tmp_path, capsys):
    manifest = save_tiny_cartpole_generator(tmp_path / "gen")
    code = cli_main(["demo", "--generator", str(manifest), "--out", str(tmp_path / "out"), "--ppo-env-steps", "100"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--ppo-env-steps must be >= 1024" in err
