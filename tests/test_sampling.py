"""``learned-opt tune-sampling``: the sweep over samplers, its choice, and writing it into a manifest."""

from __future__ import annotations

import json

import pytest
import torch
from test_demo import save_tiny_mnist_generator

from learned_opt.cli import main as cli_main
from learned_opt.errors import ConfigError
from learned_opt.pretrained import load_generator
from pretrain.sampling import TuneConfig, record_choice, sampler_grid, sweep


def test_grid_skips_what_does_not_fit_and_one_step_samplers_repeated():
    config = TuneConfig(generator="x", steps=(1, 2, 60), t_min=(0, 10, 95))
    assert sampler_grid(config, 100) == [(1, 0), (2, 0), (2, 10), (2, 95), (60, 0), (60, 10)]
    ddpm = TuneConfig(generator="x", method="ddpm", steps=(1, 2), t_min=(0, 10, 95))
    assert sampler_grid(ddpm, 100) == [(1, 0), (1, 10), (1, 95)]  # DDPM ignores steps: one row per t_min
    with pytest.raises(ConfigError, match="no --steps"):
        sampler_grid(TuneConfig(generator="x", steps=(10,), t_min=(95,)), 100)
    # a t_min asked for beyond the schedule is refused, not dropped; the defaults beyond it are left out
    with pytest.raises(ConfigError, match="--t-min 100,200: .* 100 steps, so t_min must be below 100"):
        sampler_grid(TuneConfig(generator="x", steps=(2,), t_min=(0, 100, 200)), 100)
    assert sampler_grid(TuneConfig(generator="x", steps=(2,)), 150) == [(2, 0), (2, 100)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(inits=0), "--inits"), (dict(samples=0), "--samples"), (dict(method="euler"), "--method"),
    (dict(steps=()), "--sampling-steps"), (dict(t_min=(-1,)), "--t-min"), (dict(tolerance=1.0), "--tolerance"),
])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TuneConfig(generator="x", **kwargs)


class _Task:
    """Scores a network by its first parameter, whatever the data."""

    metrics = {"test_loss": None}

    def evaluate(self, flat, data, metrics):
        return {m: flat[:, 0].clone() for m in metrics}


class _Gen:
    """A generator whose sample's first parameter, the sweep's score, is lowest (1.0) at 3 steps, t_min 300."""

    metric_name, metric_direction, metric_range, best_prompt = "test_loss", "min", (0.0, 10.0), 0.0
    device = torch.device("cpu")

    class diffusion:
        num_steps = 1000

    def sample(self, theta, metric, prompt, *, steps, method, t_min, guidance, temperature, generator):
        out = theta.clone()
        out[:, 0] = 1.0 + 0.1 * abs(steps - 3) + abs(t_min - 300) / 1000
        return out


def test_sweep_chooses_the_best_median_and_prefers_fewer_steps_within_tolerance():
    config = TuneConfig(generator="x", inits=3, samples=2, steps=(1, 2, 3, 4), t_min=(0, 300, 600),
                        tolerance=0.0, progress=False)
    r = sweep(_Gen(), _Task(), None, torch.zeros(3, 5), config)
    assert r["chosen"] == {"method": "ddim", "steps": 3, "t_min": 300, "guidance": 1.0, "temperature": 1.0,
                           "median_test_loss": 1.0}
    assert len(r["rows"]) == 1 + 3 * 3
    # 2 steps score 1.1: within 20% of the best, and cheaper, so they win
    config = TuneConfig(generator="x", inits=3, samples=2, steps=(2, 3), t_min=(300,), tolerance=0.2, progress=False)
    assert sweep(_Gen(), _Task(), None, torch.zeros(3, 5), config)["chosen"]["steps"] == 2
    config = TuneConfig(generator="x", inits=3, samples=2, steps=(2, 3), t_min=(300,), tolerance=0.05, progress=False)
    assert sweep(_Gen(), _Task(), None, torch.zeros(3, 5), config)["chosen"]["steps"] == 3


class _CeilingGen(_Gen):
    """Every sampler's median is 1.0; stopping at t_min 0 leaves one update far off (a worse mean)."""

    def sample(self, theta, metric, prompt, *, steps, method, t_min, guidance, temperature, generator):
        out = theta.clone()
        out[:, 0] = 1.0
        if t_min == 0:
            out[0, 0] = 5.0
        return out


def test_sweep_breaks_a_tie_of_medians_by_the_mean():
    config = TuneConfig(generator="x", inits=3, samples=2, steps=(2,), t_min=(0, 300), tolerance=0.0, progress=False)
    r = sweep(_CeilingGen(), _Task(), None, torch.zeros(3, 5), config)
    assert [row["median_test_loss"] for row in r["rows"]] == [1.0, 1.0]
    assert [row["mean_test_loss"] for row in r["rows"]] == pytest.approx([(5.0 + 5 * 1.0) / 6, 1.0])
    assert (r["chosen"]["steps"], r["chosen"]["t_min"]) == (2, 300)


@pytest.mark.slow
def test_tune_sampling_end_to_end_writes_the_manifest(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    weights = manifest.with_suffix(".safetensors").read_bytes()
    out = tmp_path / "tune"
    code = cli_main(["tune-sampling", "--generator", str(manifest), "--data-root", str(mnist_root), "--out", str(out),
                     "--inits", "2", "--samples", "2", "--sampling-steps", "1,2", "--t-min", "0,20", "--write",
                     "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    r = json.loads((out / "sweep.json").read_text())
    chosen = r["chosen"]
    assert [(row["steps"], row["t_min"]) for row in r["rows"]] == [(1, 0), (2, 0), (2, 20)]
    assert f"chosen: ddim, {chosen['steps']} steps, t_min {chosen['t_min']}" in printed
    assert (out / "sweep.png").stat().st_size > 1000
    gen = load_generator(manifest)  # still loads: the weights and their hash are untouched
    assert gen.sampling == {**{k: chosen[k] for k in ("method", "steps", "t_min", "guidance", "temperature")},
                            "guidance_taper": False}
    assert manifest.with_suffix(".safetensors").read_bytes() == weights
    assert "tune-sampling" in json.loads(manifest.read_text())["sampling"]["chosen_by"]


def test_write_needs_a_manifest_path(mnist_root, tmp_path, capsys, monkeypatch):
    code = cli_main(["tune-sampling", "--generator", "mnist-mlp", "--data-root", str(mnist_root),
                     "--out", str(tmp_path), "--write", "--no-progress"])
    assert code == 2 and "--write needs the path" in capsys.readouterr().err
    # a registry name loads the shipped generator, whatever NAME.json the working folder holds
    local = save_tiny_mnist_generator(tmp_path / "here")
    monkeypatch.chdir(local.parent)
    before = local.read_text()
    code = cli_main(["tune-sampling", "--generator", local.stem, "--data-root", str(mnist_root),
                     "--out", str(tmp_path / "tune"), "--write", "--no-progress"])
    assert code == 2 and "--write needs the path" in capsys.readouterr().err and local.read_text() == before


def test_the_choice_is_not_written_into_a_manifest_of_other_weights(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    before = manifest.read_text()
    result = {"chosen": {"method": "ddim", "steps": 2, "t_min": 0}, "metric": "test_loss"}
    with pytest.raises(ConfigError, match="other weights"):  # swept before a re-export replaced the weights
        record_choice(manifest, result, TuneConfig(generator=str(manifest)), sha256="0" * 64)
    assert manifest.read_text() == before


def test_write_refuses_a_read_only_manifest_before_the_sweep(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    before = manifest.read_text()
    manifest.chmod(0o444)
    out = tmp_path / "tune"
    code = cli_main(["tune-sampling", "--generator", str(manifest), "--data-root", str(mnist_root), "--out", str(out),
                     "--inits", "1", "--samples", "1", "--sampling-steps", "1", "--t-min", "0", "--write",
                     "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and "is read-only" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and manifest.read_text() == before and not manifest.stat().st_mode & 0o222


def test_write_through_a_link_updates_the_manifest_it_points_to(mnist_root, tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    link = tmp_path / "gen" / "latest.json"
    link.symlink_to(manifest.name)
    code = cli_main(["tune-sampling", "--generator", str(link), "--data-root", str(mnist_root),
                     "--out", str(tmp_path / "tune"), "--inits", "1", "--samples", "1", "--sampling-steps", "1",
                     "--t-min", "0", "--holdout", "100", "--write", "--no-progress", "--no-plots"])
    assert code == 0 and link.is_symlink()
    assert "tune-sampling" in json.loads(manifest.read_text())["sampling"]["chosen_by"]
