"""Sampling temperature: the scale of every noise draw of a sampler, from the diffusion up to the CLIs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from gpt_helpers import tiny_generator, toy_model
from test_demo import save_tiny_mnist_generator
from test_sampling import _Gen, _Task

from learned_opt import GptOptimizer, tasks
from learned_opt.cli import main as cli_main
from learned_opt.diffusion import Diffusion, DiffusionConfig, check_temperature
from learned_opt.errors import ConfigError, WeightsError
from learned_opt.pretrained import load_generator
from pretrain.evaluate import EvalConfig
from pretrain.sampling import TuneConfig, format_table, record_choice, sweep

DIFF = Diffusion(DiffusionConfig(num_steps=50))


def identity(x, t):
    """An x0 prediction that returns its input: a sample then shows the noise the sampler drew."""
    return x


def draw(temperature: float, seed: int = 0, **kw) -> torch.Tensor:
    return DIFF.sample(identity, {}, (4, 6), generator=torch.Generator().manual_seed(seed), temperature=temperature,
                       **kw)


def test_temperature_one_is_the_plain_sampler_bit_for_bit():
    for kw in ({"method": "ddim", "steps": 5}, {"method": "ddim", "steps": 5, "eta": 1.0}, {"method": "ddpm"}):
        plain = DIFF.sample(identity, {}, (4, 6), generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(draw(1.0, 3, **kw), plain)


@pytest.mark.parametrize("kw", [{"method": "ddim", "steps": 1}, {"method": "ddim", "steps": 5, "eta": 1.0},
                                {"method": "ddpm"}])
def test_temperature_scales_every_noise_draw(kw):
    # with an identity x0 prediction every step is linear in the noise drawn, so the sample scales with it
    assert torch.allclose(draw(0.5, **kw), 0.5 * draw(1.0, **kw), atol=1e-6)
    assert torch.equal(draw(0.0, **kw), torch.zeros(4, 6))


def test_temperature_zero_with_a_deterministic_sampler_ignores_the_seed():
    model = lambda x, t: 0.5 * x + 1.0  # noqa: E731
    runs = [DIFF.sample(model, {}, (2, 3), steps=4, generator=torch.Generator().manual_seed(s), temperature=0.0)
            for s in (0, 1)]
    assert torch.equal(runs[0], runs[1])
    noisy = [DIFF.sample(model, {}, (2, 3), steps=4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, True, "1", None])
def test_invalid_temperatures_are_refused(value):
    with pytest.raises(ConfigError, match="temperature"):
        check_temperature(value)
    with pytest.raises(ConfigError, match="temperature"):
        draw(value)
    if value is not None:  # None is "the generator's own" there
        with pytest.raises(ConfigError, match="temperature"):
            tiny_generator().sampler(temperature=value)
        with pytest.raises(ConfigError, match="temperature"):
            GptOptimizer(toy_model().parameters(), tiny_generator(), sampling_temperature=value)


def test_optimizer_samples_at_its_temperature():
    gen = tiny_generator(perturb=0.05)
    seen = []
    sample = gen.diffusion.sample
    gen.diffusion.sample = lambda *a, **kw: seen.append(kw["temperature"]) or sample(*a, **kw)
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, sampling_temperature=0.25, guard=False, sampling_steps=3)
    assert opt.sampling_temperature == 0.25 and "temperature=0.25" in repr(opt)
    assert opt.generate(metric=2.0).accepted and seen == [0.25]
    assert GptOptimizer(model.parameters(), gen).sampling_temperature == 1.0  # none recorded: 1
    state = opt.__getstate__()
    del state["sampling_temperature"]  # an optimizer pickled before temperatures
    old = GptOptimizer.__new__(GptOptimizer)
    old.__setstate__(state)
    assert old.sampling_temperature == 1.0


def test_several_candidates_at_temperature_zero_are_refused_everywhere(mnist_root, tmp_path, capsys):
    gen = tiny_generator(perturb=0.05)
    with pytest.raises(ConfigError, match="sampling_temperature above 0"):
        GptOptimizer(toy_model().parameters(), gen, candidates=4, sampling_temperature=0.0)
    GptOptimizer(toy_model().parameters(), gen, candidates=1, sampling_temperature=0.0)  # one sample is fine
    GptOptimizer(toy_model().parameters(), gen, candidates=4, sampling_temperature=0.5)
    path = save_tiny_mnist_generator(tmp_path / "cold")
    data = json.loads(path.read_text())
    data["sampling"] = {"temperature": 0.0}  # a generator whose own sampler is deterministic
    path.write_text(json.dumps(data))
    cold = load_generator(path)
    with pytest.raises(ConfigError, match="sampling_temperature above 0"):
        GptOptimizer(tasks.get("mnist-mlp").build_model().parameters(), cold, candidates=4)
    GptOptimizer(tasks.get("mnist-mlp").build_model().parameters(), cold, candidates=4, sampling_temperature=1.0)
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    for argv in (["eval", "--generator", str(manifest), "--out", str(tmp_path / "e"), "--data-root", str(mnist_root),
                  "--candidates", "4", "--temperature", "0", "--no-progress"],
                 ["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--data-root", str(mnist_root),
                  "--candidates", "4", "--temperature", "0", "--no-progress"],
                 ["tune-head", "--generator", str(manifest), "--out", str(tmp_path / "h"), "--data-root", str(mnist_root),
                  "--temperature", "0", "--no-progress"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "--temperature above 0" in err and len(err.strip().splitlines()) == 1


def test_manifest_temperature_is_the_default_and_is_checked(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    data = json.loads(manifest.read_text())
    data["sampling"] = {"method": "ddim", "steps": 2, "t_min": 0, "temperature": 0.5}
    manifest.write_text(json.dumps(data))
    gen = load_generator(manifest)
    assert gen.sampling["temperature"] == 0.5 and gen.sampler()["temperature"] == 0.5
    assert gen.sampler(temperature=1)["temperature"] == 1.0  # the caller's choice wins
    for bad in (-1, "x", None):
        data["sampling"] = {"temperature": bad}
        manifest.write_text(json.dumps(data))
        with pytest.raises(WeightsError, match="temperature"):
            load_generator(manifest)


def test_tune_sampling_sweeps_temperatures_and_records_the_choice(tmp_path):
    class Tempered(_Gen):  # the score is lowest (1.0) at temperature 0.5
        def sample(self, theta, metric, prompt, *, steps, method, t_min, guidance, temperature, generator):
            out = theta.clone()
            out[:, 0] = 1.0 + abs(temperature - 0.5)
            return out

    config = TuneConfig(generator="x", inits=2, samples=2, steps=(2,), t_min=(0,), temperature=(1.0, 0.5, 0.0),
                        tolerance=0.0, progress=False)
    r = sweep(Tempered(), _Task(), None, torch.zeros(2, 5), config)
    assert [row["temperature"] for row in r["rows"]] == [1.0, 0.5, 0.0] and r["chosen"]["temperature"] == 0.5
    assert "temperature 0.5" in format_table(r)
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    record_choice(manifest, r, config)
    assert json.loads(manifest.read_text())["sampling"]["temperature"] == 0.5
    assert load_generator(manifest).sampling["temperature"] == 0.5
    r["chosen"]["temperature"] = 1.0  # the plain temperature is left out, as older manifests are
    record_choice(manifest, r, config)
    assert "temperature" not in json.loads(manifest.read_text())["sampling"]


def test_clis_take_a_temperature_and_refuse_a_bad_one_in_one_line(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    for argv in (["eval", "--generator", str(manifest), "--out", str(tmp_path / "e"), "--data-root", str(mnist_root),
                  "--temperature", "-1", "--no-progress"],
                 ["bench", "--generator", str(manifest), "--out", str(tmp_path / "b"), "--data-root", str(mnist_root),
                  "--temperature", "-1", "--no-progress"],
                 ["tune-sampling", "--generator", str(manifest), "--out", str(tmp_path / "t"),
                  "--data-root", str(mnist_root), "--temperature", "1,-1", "--no-progress"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "temperature" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["tune-sampling", "--generator", str(manifest), "--out", str(tmp_path / "t"),
                     "--temperature", "1,x", "--no-progress"]) == 2
    assert "--temperature takes comma-separated floats" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--temperature"):
        EvalConfig(generator="x", temperature=-1.0)
    with pytest.raises(ConfigError, match="--temperature"):
        TuneConfig(generator="x", temperature=())
