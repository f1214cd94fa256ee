"""``learned-opt demo``: the baselines' plain loop, the error without data, and a run end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from learned_opt import tasks
from learned_opt.cli import main as cli_main
from learned_opt.demo import first_step_at_or_below, train_baseline
from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator, get_config
from learned_opt.normalization import Normalization
from learned_opt.pretrained import save_generator


USER_TASK = """
import torch
from torch import nn
from learned_opt.tasks import ClassificationData, SupervisedTask

class {cls}(SupervisedTask):
    name = "{name}"
    def build_model(self):
        return {model}
    def load_data(self, root=None, *, download=False):  # 4x4 one-channel images, 3 learnable classes
        g = torch.Generator().manual_seed(0)
        x = torch.randn(700, 1, 4, 4, generator=g)
        y = x.flatten(1)[:, :3].argmax(1)
        return ClassificationData(x[:500], y[:500], x[500:], y[500:])
"""
USER_MLP = "nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))"
USER_CNN = "nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))"


def write_user_task(folder, name: str, model: str = USER_MLP, cls: str = "UserTask") -> str:
    """A supervised task of one's own in ``folder/user_task.py``; returns its ``file.py:Class`` reference."""
    path = folder / "user_task.py"
    path.write_text(USER_TASK.format(cls=cls, name=name, model=model), encoding="utf-8")
    return f"{path}:{cls}"


def save_tiny_mnist_generator(folder, perturb: float = 1e-3, seed: int = 0, task: str = "mnist-mlp",
                              name: str = "tiny-mnist", **config):
    """A tiny untrained generator (``mnist-mlp``'s, or ``task``'s) with slightly perturbed decoders,
    saved to ``folder``; ``config`` overrides fields of the tiny preset (``null_prompt=True``, ...)."""
    task = tasks.get(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_generator(task.layout(), dataclasses.replace(get_config("tiny"), **config))
        with torch.no_grad():
            for p in model.decoder.parameters():
                p.add_(torch.randn(p.shape) * perturb)
    return save_generator(
        folder, name, model, DiffusionConfig(num_steps=50), Normalization(4.0, 0.0, 2.5),
        task=task.name, metric="test_loss", best_prompt=0.0, corpus={"runs": 0}, training={"steps": 0},
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
    assert (out / "demo_mnist-mlp.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == ["demo_mnist-mlp.json", "demo_mnist-mlp.png"]  # named by task
    result = json.loads((out / "demo_mnist-mlp.json").read_text())
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
    result = json.loads((tmp_path / "out" / "demo_mnist-mlp.json").read_text())
    assert result["generator"]["name"] == "mnist-mlp"
    assert (tmp_path / "out" / "demo_mnist-mlp.png").stat().st_size > 0


# ---------------------------------------------------------------------- a task of one's own


def test_demo_of_a_user_task_without_a_generator_says_how_to_make_one(tmp_path, capsys):
    ref = write_user_task(tmp_path, "demo-user-mlp-a")
    code = cli_main(["demo", "--task", ref, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"learned-opt corpus --task {ref}" in err and "learned-opt train --store" in err
    assert "--generator GEN/demo-user-mlp-a.json" in err
    assert not (tmp_path / "out").exists()


def test_demo_runs_a_supervised_task_from_a_file(tmp_path, capsys):
    ref = write_user_task(tmp_path, "demo-user-mlp-b")
    manifest = save_tiny_mnist_generator(tmp_path / "gen", task=ref, name="tiny-user")
    out = tmp_path / "demo"
    code = cli_main(["demo", "--task", ref, "--generator", str(manifest), "--out", str(out), "--steps", "10",
                     "--eval-every", "5", "--sampling-steps", "2", "--no-plot"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "random init" in printed and "Adam lr 1e-3" in printed and "demo_demo-user-mlp-b.json" in printed
    result = json.loads((out / "demo_demo-user-mlp-b.json").read_text())
    assert result["task"] == "demo-user-mlp-b" and result["generator"]["name"] == "tiny-user"
    assert result["baselines"]["adam"]["steps"] == [0, 5, 10]
    assert sorted(p.name for p in out.iterdir()) == ["demo_demo-user-mlp-b.json"]  # no PNG


def test_demo_refuses_an_unknown_task_in_one_line(tmp_path, capsys):
    code = cli_main(["demo", "--task", "no-such-task", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown task 'no-such-task'" in err
    assert "mnist-mlp" in err and "file.py:ClassName" in err
