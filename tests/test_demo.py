"""``learned-opt demo``: the baselines' plain loop, the error without data, and a run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.demo import first_step_at_or_below, train_baseline
from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator
from learned_opt.normalization import Normalization
from learned_opt.pretrained import save_generator


def save_tiny_mnist_generator(folder, perturb: float = 1e-3, seed: int = 0):
    """A tiny untrained ``mnist-mlp`` generator with slightly perturbed decoders, saved to ``folder``."""
    task = tasks.get("mnist-mlp")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_generator(task.layout(), "tiny")
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(torch.randn(p.shape) * perturb)
    return save_generator(
        folder, "tiny-mnist", model, DiffusionConfig(num_steps=50), Normalization(4.0, 0.0, 2.5),
        task="mnist-mlp", metric="test_loss", best_prompt=0.0, corpus={"runs": 0}, training={"steps": 0},
    )


def test_first_step_at_or_below_on_a_known_curve():
    steps, loss = [0, 10, 20, 50], [2.3, 1.0, 0.5, 0.4]
    assert first_step_at_or_below(steps, loss, 1.0) == 10  # at or below: equality counts
    assert first_step_at_or_below(steps, loss, 0.45) == 50
    assert first_step_at_or_below(steps, loss, 3.0) == 0
    assert first_step_at_or_below(steps, loss, 0.1) is None
    assert first_step_at_or_below(steps, loss, math.nan) is None


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_baseline_lowers_the_test_loss(mnist_data, optimizer):
    task = tasks.get("mnist-mlp")
    torch.manual_seed(3)
    init = task.layout().flatten_module(task.build_model())
    rng = torch.get_rng_state()
    curve = train_baseline(task, init, mnist_data, optimizer, 30, [0, 10, 30], seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert curve.steps == [0, 10, 30]
    assert curve.test_loss[-1] < curve.test_loss[0] - 0.3
    assert 0 < curve.seconds_per_step < 10
    again = train_baseline(task, init, mnist_data, optimizer, 30, [30], seed=1)
    assert again.test_loss == curve.test_loss[-1:]  # deterministic for a seed


def test_demo_without_data_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("LEARNED_OPT_DATA", raising=False)
    code = cli_main(["demo", "--task", "mnist-mlp", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "LEARNED_OPT_DATA" in err and "--data-root" in err and "--download" in err
    assert not (tmp_path / "out").exists()


def test_demo_runs_end_to_end(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    out = tmp_path / "demo"
    rng = torch.random.get_rng_state()
    code = cli_main(["demo", "--task", "mnist-mlp", "--generator", str(manifest), "--data-root", str(mnist_root),
                     "--out", str(out), "--steps", "20", "--eval-every", "10", "--sampling-steps", "2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert torch.equal(torch.random.get_rng_state(), rng)  # the demo leaves the global RNG alone
    assert "random init" in printed and "Adam lr 1e-3" in printed and "SGD (G.pt recipe)" in printed
    assert (out / "demo.png").stat().st_size > 1000
    assert not (out / "demo_cartpole.json").exists()  # the MNIST path, not CartPole's
    result = json.loads((out / "demo.json").read_text())
    assert result["generator"]["name"] == "tiny-mnist"
    for o in ("adam", "sgd"):
        curve = result["baselines"][o]
        assert curve["steps"] == [0, 10, 20]
        assert all(math.isfinite(v) for v in curve["test_loss"] + curve["test_error"])
        assert curve["test_loss"][0] == pytest.approx(result["init"]["test_loss"], rel=1e-5)
    assert math.isfinite(result["update"]["test_loss"])
    if result["update"]["accepted"]:  # the guard: an accepted update is not worse than the init
        assert result["update"]["test_loss"] <= result["init"]["test_loss"]
    else:
        assert result["update"]["test_loss"] == pytest.approx(result["init"]["test_loss"], rel=1e-6)


def test_the_mnist_demo_uses_the_shipped_generator(mnist_root, tmp_path, capsys):
    code = cli_main(["demo", "--task", "mnist-mlp", "--data-root", str(mnist_root), "--out", str(tmp_path / "out"),
                     "--steps", "20"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert result["generator"]["name"] == "mnist-mlp"
    assert (tmp_path / "out" / "demo.png").stat().st_size > 0
