"""Tapered guidance: the scale in full at the best prompt, tapering to 1 for prompts that ask less;
per-row scales in the sampler; the manifest switch; ``tune-sampling``'s check and ``eval --guidance-taper``."""

from __future__ import annotations

import json

import pytest
import torch
from gpt_helpers import NORM
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_demo import save_tiny_mnist_generator
from test_guidance import guided_generator, inputs

from learned_opt.diffusion import Diffusion, DiffusionConfig
from learned_opt.errors import ConfigError, WeightsError
from learned_opt.guidance import tapered_scale
from learned_opt.pretrained import load_generator
from pretrain.sampling import record_choice


def scale(w, metric, prompt, best, direction="min"):
    return tapered_scale(w, torch.tensor([float(metric)]), torch.tensor([float(prompt)]), best, direction).item()


# ---------------------------------------------------------------------- the scale


def test_full_scale_at_the_best_prompt_and_beyond_one_where_no_improvement_is_asked():
    # a loss: current 2.0, best 0.2
    assert scale(3.0, 2.0, 0.2, 0.2) == 3.0 and scale(3.0, 2.0, 0.1, 0.2) == 3.0
    assert scale(3.0, 2.0, 2.0, 0.2) == 1.0 and scale(3.0, 2.0, 2.5, 0.2) == 1.0  # the current loss, or worse
    assert scale(3.0, 2.0, 1.1, 0.2) == pytest.approx(2.0)  # half the possible improvement: half the extra scale
    # a return to maximise: current 100, best 500
    assert scale(2.0, 100.0, 500.0, 500.0, "max") == 2.0 and scale(2.0, 100.0, 600.0, 500.0, "max") == 2.0
    assert scale(2.0, 100.0, 100.0, 500.0, "max") == 1.0 and scale(2.0, 100.0, 50.0, 500.0, "max") == 1.0
    assert scale(2.0, 100.0, 200.0, 500.0, "max") == pytest.approx(1.25)
    # below 1 it tapers up to 1 the same way
    assert scale(0.5, 2.0, 1.1, 0.2) == pytest.approx(0.75)


def test_a_network_at_or_past_the_best():
    assert scale(2.0, 0.2, 0.2, 0.2) == 2.0  # asked for the best: in full
    assert scale(2.0, 0.1, 0.2, 0.2) == 2.0
    assert scale(2.0, 0.1, 0.15, 0.12) == 1.0  # past the best, asked for less than it has: no extrapolation
    assert scale(2.0, 0.1, 0.1, 0.12) == 1.0 and scale(2.0, 0.1, 0.11, 0.12) == 1.0  # nor for what it has
    assert scale(2.0, 0.1, 0.12, 0.12) == 2.0  # the best prompt itself: always in full, as constant guidance
    assert scale(2.0, 600.0, 450.0, 500.0, "max") == 1.0
    assert scale(2.0, float("nan"), 1.0, 0.2) == 2.0  # an unknown metric: the constant scale
    assert scale(2.0, float("inf"), 1.0, 0.2) == 2.0 and scale(2.0, 1.0, float("-inf"), 0.2) == 2.0
    with pytest.raises(ValueError, match="direction"):
        scale(2.0, 1.0, 0.5, 0.2, "minimise")


@settings(max_examples=200, deadline=None)
@given(w=st.floats(0.0, 5.0), metric=st.floats(-10, 10), prompt=st.floats(-10, 10), best=st.floats(-10, 10),
       direction=st.sampled_from(["min", "max"]))
def test_the_scale_lies_between_one_and_w_and_grows_with_what_is_asked(w, metric, prompt, best, direction):
    s = scale(w, metric, prompt, best, direction)
    assert min(1.0, w) - 1e-6 <= s <= max(1.0, w) + 1e-6
    assume((metric - best if direction == "min" else best - metric) > 1e-3)  # short of the best (past it: above)
    better = prompt - 0.5 if direction == "min" else prompt + 0.5  # a prompt asking for more
    s2 = scale(w, metric, better, best, direction)
    assert abs(s2 - 1.0) >= abs(s - 1.0) - 1e-6  # asking for more never gets less extrapolation


# ---------------------------------------------------------------------- the sampler


def test_per_row_scales_equal_a_constant_scale_row_by_row():
    gen = guided_generator()
    theta, metric, prompt = inputs()
    cond = dict(theta=NORM.params(theta), metric=NORM.metric(metric), target=NORM.metric(prompt))
    scales = torch.tensor([1.0, 1.7, 3.0])
    rows = gen.diffusion.sample(gen.model, cond, theta.shape, steps=4, guidance=scales,
                                generator=torch.Generator().manual_seed(2))
    for i, w in enumerate(scales.tolist()):
        each = gen.diffusion.sample(gen.model, cond, theta.shape, steps=4, guidance=w,
                                    generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(rows[i], each[i])


@pytest.mark.parametrize("bad", [torch.ones(2), torch.ones(3, 1), torch.tensor([1.0, -1.0, 2.0]),
                                 torch.tensor([1.0, float("nan"), 2.0])])
def test_bad_per_row_scales_are_refused(bad):
    diffusion = Diffusion(DiffusionConfig(num_steps=10))
    with pytest.raises(ConfigError, match="guidance"):
        diffusion.sample(lambda x, t, **_: x, {"theta": torch.zeros(3, 4)}, (3, 4), steps=1, guidance=bad,
                         generator=torch.Generator().manual_seed(0))


def test_at_the_best_prompt_the_taper_changes_nothing_bit_for_bit():
    gen = guided_generator()  # best prompt 0
    theta, metric, _ = inputs()
    best = torch.zeros(3)
    for w in (1.5, 2.0, 1.3):
        a = gen.sample(theta, metric, best, steps=4, guidance=w, guidance_taper=True,
                       generator=torch.Generator().manual_seed(0))
        b = gen.sample(theta, metric, best, steps=4, guidance=w, guidance_taper=False,
                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)


def test_below_the_best_each_row_gets_its_tapered_scale():
    gen = guided_generator()
    theta, metric, prompt = inputs()  # metric 2, prompts 0 (the best), 0.5 and 1
    tapered = gen.sample(theta, metric, prompt, steps=4, guidance=3.0, guidance_taper=True,
                         generator=torch.Generator().manual_seed(0))
    constant = gen.sample(theta, metric, prompt, steps=4, guidance=3.0, guidance_taper=False,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(tapered[0], constant[0]) and not torch.allclose(tapered[1:], constant[1:])
    for i, w in ((1, 1.0 + 0.75 * 2.0), (2, 1.0 + 0.5 * 2.0)):  # share asked: 1.5 / 2 and 1 / 2
        alone = gen.sample(theta, metric, prompt, steps=4, guidance=w, guidance_taper=False,
                           generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(tapered[i], alone[i])


# ---------------------------------------------------------------------- the manifest and the commands


def _with_sampling(manifest, **sampling):
    data = json.loads(manifest.read_text())
    data["sampling"] = {"method": "ddim", "steps": 2, "t_min": 0, **sampling}
    manifest.write_text(json.dumps(data))


def test_the_taper_is_off_unless_a_manifest_turns_it_on_and_the_caller_decides_last(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    _with_sampling(manifest, guidance=2.0)
    gen = load_generator(manifest)
    assert gen.sampling["guidance_taper"] is False and gen.sampler(guidance_taper=True)["guidance_taper"] is True
    _with_sampling(manifest, guidance=2.0, guidance_taper=True)
    gen = load_generator(manifest)
    assert gen.sampler()["guidance_taper"] is True and gen.sampler(guidance_taper=False)["guidance_taper"] is False
    _with_sampling(manifest, guidance=2.0, guidance_taper="yes")
    with pytest.raises(WeightsError, match="guidance_taper"):
        load_generator(manifest)


def test_tune_sampling_records_the_taper_only_when_chosen(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)

    class Config:
        tolerance, inits, seed, samples = 0.01, 2, 0, 1

    for taper in (True, False):
        chosen = {"method": "ddim", "steps": 4, "t_min": 0, "guidance": 1.5, "temperature": 1.0, "guidance_taper": taper}
        record_choice(manifest, {"metric": "test_loss", "chosen": chosen}, Config())
        sampling = json.loads(manifest.read_text())["sampling"]
        assert sampling.get("guidance_taper") is (True if taper else None)  # off: left out, as older releases read it
        assert load_generator(manifest).sampling["guidance_taper"] is taper


def test_tune_sampling_checks_the_taper_on_validation_prompt_alignment(mnist_root, tmp_path):
    from learned_opt.cli import main as cli_main

    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    out = tmp_path / "tune"
    assert cli_main(["tune-sampling", "--generator", str(manifest), "--out", str(out), "--data-root", str(mnist_root),
                     "--inits", "2", "--samples", "1", "--sampling-steps", "2", "--t-min", "0", "--guidance", "2",
                     "--no-plots", "--no-progress", "--write"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    check = result["guidance_taper"]
    assert check["prompts"] == 8 and check["chosen"] == (check["r2_gain_mean"] > 2 * check["r2_gain_se"])
    assert check["r2_gain_mean"] == pytest.approx(check["r2_mean_tapered"] - check["r2_mean_constant"])
    assert check["r2_mean_tapered"] != check["r2_mean_constant"]  # the taper changed the off-best prompts' samples
    assert load_generator(manifest).sampling["guidance_taper"] is check["chosen"]
    chosen_by = json.loads(manifest.read_text())["sampling"]["chosen_by"]
    assert ("guidance tapered" if check["chosen"] else "guidance kept constant") in chosen_by
    plain = tmp_path / "plain"
    assert cli_main(["tune-sampling", "--generator", str(manifest), "--out", str(plain), "--data-root",
                     str(mnist_root), "--inits", "2", "--samples", "1", "--sampling-steps", "2", "--t-min", "0",
                     "--no-plots", "--no-progress"]) == 0
    assert "guidance_taper" not in json.loads((plain / "sweep.json").read_text())  # guidance 1: nothing to taper


def test_eval_guidance_taper_reaches_the_generator(mnist_root, tmp_path, monkeypatch):
    from learned_opt.cli import main as cli_main
    from learned_opt.pretrained import LoadedGenerator

    seen = []
    sample = LoadedGenerator.sample
    monkeypatch.setattr(LoadedGenerator, "sample", lambda self, *a, **kw: seen.append(kw["guidance_taper"])
                        or sample(self, *a, **kw))
    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    for recorded, flags, expected in ((False, [], False), (True, [], True), (False, ["--guidance-taper", "on"], True),
                                      (True, ["--guidance-taper", "off"], False)):
        _with_sampling(manifest, guidance=2.0, **({"guidance_taper": True} if recorded else {}))
        out = tmp_path / f"eval{len(seen)}"
        seen.clear()
        assert cli_main(["eval", "--generator", str(manifest), "--out", str(out), "--data-root", str(mnist_root),
                         "--inits", "2", "--max-steps", "10", "--prompts", "3", "--repeats", "1",
                         "--denoise-runs", "0", "--no-plots", "--no-progress", *flags]) == 0
        assert json.loads((out / "eval.json").read_text())["sampler"]["guidance_taper"] is expected
        assert seen and set(seen) == {expected}


def test_the_optimizer_pins_the_taper_and_a_caller_may_override_it(tmp_path, monkeypatch):
    import pickle

    from torch import nn

    from learned_opt import GptOptimizer
    from learned_opt.pretrained import LoadedGenerator

    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    _with_sampling(manifest, guidance=2.0, guidance_taper=True)
    seen = []
    sample = LoadedGenerator.sample
    monkeypatch.setattr(LoadedGenerator, "sample", lambda self, *a, **kw: seen.append(kw["guidance_taper"])
                        or sample(self, *a, **kw))
    model = nn.Sequential(nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10))
    for chosen, expected in ((None, True), (False, False), (True, True)):
        opt = GptOptimizer(model.parameters(), generator=str(manifest), guidance_taper=chosen, guard=False,
                           keep_if_met=False, prompt=1.0)
        assert opt.guidance_taper is expected and ("tapered" in repr(opt)) is expected
        seen.clear()
        opt.generate(metric=2.0)
        assert seen == [expected]
    state = pickle.loads(pickle.dumps(opt))
    del state.__dict__["guidance_taper"]  # as an optimizer pickled before the taper
    state.__setstate__(dict(state.__dict__))
    assert state.guidance_taper is False
    with pytest.raises(ConfigError, match="guidance_taper"):
        GptOptimizer(model.parameters(), generator=str(manifest), guidance_taper="on")


def test_the_best_prompt_is_exact_even_when_float32_cannot_hold_it():
    gen = guided_generator()
    gen.best_prompt = 0.2  # not a float32 number; prompts arrive as float32
    theta, _, _ = inputs()
    metric, best = torch.tensor([0.2001, 0.21, 2.0]), torch.full((3,), 0.2)
    a = gen.sample(theta, metric, best, steps=3, guidance=2.0, guidance_taper=True,
                   generator=torch.Generator().manual_seed(0))
    b = gen.sample(theta, metric, best, steps=3, guidance=2.0, guidance_taper=False,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    gen.model.to(torch.bfloat16)  # a half-precision model: the constant scale, not a rounded tensor of it
    a = gen.sample(theta, metric, best, steps=3, guidance=1.7, guidance_taper=True,
                   generator=torch.Generator().manual_seed(0))
    b = gen.sample(theta, metric, best, steps=3, guidance=1.7, guidance_taper=False,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
