"""Classifier-free guidance: the null prompt, the guided sampler, prompt dropout in training, and
the errors for generators trained without it."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest
import torch
from gpt_helpers import DIFFUSION, NORM, tiny_generator, toy_model
from test_demo import save_tiny_mnist_generator
from train_helpers import make_store, state_hash, tiny_config

from learned_opt import GptOptimizer
from learned_opt.cli import main as cli_main
from learned_opt.diffusion import Diffusion, DiffusionConfig
from learned_opt.errors import ConfigError, TrainingError, WeightsError
from learned_opt.generator import build_generator, get_config
from learned_opt.guidance import check_guidance, guided_denoiser
from learned_opt.layout import Layout
from learned_opt.pretrained import LoadedGenerator, load_generator
from pretrain.evaluate import EvalConfig
from pretrain.sampling import TuneConfig
from pretrain.train import CHECKPOINT_NAME, LOG_NAME, load_checkpoint, read_jsonl, train
from pretrain.train import outputs


def guided_generator(perturb: float = 0.05, seed: int = 0, **config) -> LoadedGenerator:
    """A tiny toy generator with a null prompt (and ``config`` on top), its decoders and null prompt
    perturbed so that prompted and unprompted predictions differ."""
    torch.manual_seed(seed)
    layout = Layout.of(toy_model(), chunk_size=16)
    model = build_generator(layout, dataclasses.replace(get_config("tiny"), null_prompt=True, **config))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in (*model.decoder.parameters(), model.null_prompt):
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    return LoadedGenerator.from_model(model, DIFFUSION, NORM, name="toy-guided", task="toy", metric="loss",
                                      best_prompt=0.0, metric_direction="min")


def inputs(b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 75, generator=g) * 0.3, torch.full((b,), 2.0), torch.linspace(0.0, 1.0, b)


# ---------------------------------------------------------------------- the sampler


def test_guidance_one_is_the_plain_sampler_bit_for_bit():
    """guidance=1 runs the sampler's plain path: the same model calls, the same samples."""
    for gen in (tiny_generator(perturb=0.05), guided_generator()):
        theta, metric, prompt = inputs()
        plain = gen.diffusion.sample(
            gen.model, dict(theta=NORM.params(theta), metric=NORM.metric(metric), target=NORM.metric(prompt)),
            theta.shape, steps=5, generator=torch.Generator().manual_seed(3))
        for kw in ({}, {"guidance": 1.0}, {"guidance": 1}):
            out = gen.sample(theta, metric, prompt, steps=5, generator=torch.Generator().manual_seed(3), **kw)
            assert torch.equal(out, NORM.unparams(plain))


def test_a_null_prompt_leaves_the_conditional_model_as_it_was():
    """A generator built with a null prompt starts like one without (same seed), and predicts the
    same wherever the prompt is kept."""
    layout = Layout.of(toy_model(), chunk_size=16)
    torch.manual_seed(5)
    plain = build_generator(layout, "tiny")
    torch.manual_seed(5)
    both = build_generator(layout, dataclasses.replace(get_config("tiny"), null_prompt=True, property_head=True))
    shared = plain.state_dict()
    assert {k: v for k, v in both.state_dict().items() if k in shared}.keys() == shared.keys()
    assert all(torch.equal(both.state_dict()[k], v) for k, v in shared.items())
    with torch.no_grad():
        for p in (*plain.decoder.parameters(), *both.decoder.parameters()):
            p.fill_(0.01)
    theta, metric, prompt = inputs()
    x, t = torch.randn(3, 75), torch.tensor([5, 50, 99])
    expected = plain(x, t, theta, metric, prompt)
    assert torch.equal(both(x, t, theta, metric, prompt), expected)
    assert torch.equal(both(x, t, theta, metric, prompt, drop_prompt=torch.zeros(3, dtype=torch.bool)), expected)
    dropped = both(x, t, theta, metric, prompt, drop_prompt=torch.tensor([True, False, True]))
    assert torch.equal(dropped[1], expected[1]) and not torch.equal(dropped[0], expected[0])


def test_guidance_formula_on_a_stub_in_one_doubled_call():
    calls = []

    def model(x_t, t, theta, target, drop_prompt=None):
        calls.append((x_t.shape[0], drop_prompt.clone()))
        return theta + torch.where(drop_prompt, 1.0, 3.0)[:, None] + 0 * x_t  # cond: θ + 3, uncond: θ + 1

    theta = torch.randn(2, 4)
    cond = dict(theta=theta, target=torch.zeros(2))
    diffusion = Diffusion(DiffusionConfig(num_steps=10))
    for w in (0.0, 1.5, 3.0):
        calls.clear()
        out = diffusion.sample(model, cond, (2, 4), steps=1, guidance=w, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, theta + 1.0 + w * 2.0)  # uncond + w (cond - uncond)
        assert len(calls) == 1 and calls[0][0] == 4  # one forward of the doubled batch per step
        assert calls[0][1].tolist() == [False, False, True, True]
    calls.clear()
    diffusion.sample(model, cond, (2, 4), steps=4, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4


def test_guided_gpt_equals_two_separate_forwards():
    gen = guided_generator()
    theta, metric, prompt = inputs()
    x, t = torch.randn(3, 75), torch.tensor([10, 40, 90])
    model = gen.model
    with torch.no_grad():
        cond = model(x, t, theta, metric, prompt)
        uncond = model(x, t, theta, metric, prompt, drop_prompt=torch.ones(3, dtype=torch.bool))
        guided = guided_denoiser(model, dict(theta=theta, metric=metric, target=prompt), 2.5)(x, t)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond))
    a = gen.sample(theta, metric, prompt, steps=4, guidance=2.5, generator=torch.Generator().manual_seed(0))
    b = gen.sample(theta, metric, prompt, steps=4, guidance=2.5, generator=torch.Generator().manual_seed(0))
    c = gen.sample(theta, metric, prompt, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_the_null_prompt_learns_from_dropped_rows():
    gen = guided_generator()
    theta, metric, prompt = inputs()
    gen.model.requires_grad_(True)
    out = gen.model(torch.randn(3, 75), torch.tensor([1, 2, 3]), theta, metric, prompt,
                    drop_prompt=torch.tensor([True, False, False]))
    out.square().sum().backward()
    assert gen.model.null_prompt.grad.abs().sum() > 0


# ---------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "2"])
def test_invalid_guidance_values_are_refused(value):
    with pytest.raises(ConfigError, match="guidance"):
        check_guidance(value)
    with pytest.raises(ConfigError, match="guidance"):
        guided_generator().sampler(guidance=value)


def test_guidance_on_a_generator_trained_without_prompt_dropout_is_refused():
    gen = tiny_generator()
    assert not gen.supports_guidance
    theta, metric, prompt = inputs()
    with pytest.raises(ConfigError, match="--prompt-dropout"):
        gen.sample(theta, metric, prompt, guidance=2.0, generator=torch.Generator())
    with pytest.raises(ConfigError, match="--prompt-dropout"):
        GptOptimizer(toy_model().parameters(), gen, guidance=2.0)
    with pytest.raises(ConfigError, match="--prompt-dropout"):
        gen.model(torch.randn(3, 75), torch.tensor([1, 2, 3]), theta, metric, prompt,
                  drop_prompt=torch.ones(3, dtype=torch.bool))
    GptOptimizer(toy_model().parameters(), gen, guidance=1.0)  # plain sampling is what it can do


def test_optimizer_samples_with_its_guidance():
    gen = guided_generator()
    seen = []
    sample = gen.sample
    gen.sample = lambda *a, **kw: seen.append(kw["guidance"]) or sample(*a, **kw)
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, guidance=2.0, guard=False, sampling_steps=3)
    assert opt.guidance == 2.0 and "guidance=2" in repr(opt)
    assert opt.generate(metric=2.0).accepted and seen == [2.0]
    assert GptOptimizer(model.parameters(), gen).guidance == 1.0  # none recorded: 1


def test_manifest_guidance_is_the_default_and_needs_a_null_prompt(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    data = json.loads(manifest.read_text())
    data["sampling"] = {"method": "ddim", "steps": 2, "t_min": 0, "guidance": 1.5}
    manifest.write_text(json.dumps(data))
    gen = load_generator(manifest)
    assert gen.supports_guidance and gen.sampling["guidance"] == 1.5 and gen.sampler()["guidance"] == 1.5
    assert gen.sampler(guidance=1.0)["guidance"] == 1.0  # the caller's choice wins
    plain = save_tiny_mnist_generator(tmp_path / "plain")
    for bad, message in ((1.5, "null prompt"), (-1, "guidance"), ("x", "guidance")):
        data = json.loads(plain.read_text())
        data["sampling"] = {"guidance": bad}
        plain.write_text(json.dumps(data))
        with pytest.raises(WeightsError, match=message):
            load_generator(plain)


@pytest.mark.parametrize("name", ["mnist-mlp", "cartpole-mlp"])
def test_shipped_generators_guide_and_rank_and_a_manifest_without_either_loads_as_before(name, tmp_path):
    """The shipped generators carry a null prompt and a property head; the same weights without them,
    under a manifest that names neither (as manifests did before both features), load and sample
    exactly as the shipped generator does at guidance 1, and refuse what they cannot do."""
    from safetensors.torch import load_file, save_file

    from learned_opt.pretrained import sha256_file

    gen = load_generator(name)
    assert gen.supports_guidance and gen.has_property_head and gen.sampling["guidance"] > 1.0
    theta = torch.randn(2, gen.layout.num_params, generator=torch.Generator().manual_seed(0)) * 0.05
    assert torch.isfinite(gen.predict_metric(theta)).all()
    lo, _ = gen.metric_range
    args = (theta, torch.full((2,), lo * 2), torch.full((2,), lo))

    source = resources.files("learned_opt") / "weights" / f"{name}.safetensors"
    weights = {k: v for k, v in load_file(str(source)).items()
               if k != "null_prompt" and not k.startswith("property_head.")}
    save_file(weights, str(tmp_path / "plain.safetensors"))
    manifest = dict(gen.manifest)
    manifest["model_config"] = {k: v for k, v in manifest["model_config"].items() if k not in ("null_prompt", "property_head")}
    manifest["sampling"] = {k: v for k, v in manifest["sampling"].items() if k != "guidance"}
    manifest["weights_file"] = "plain.safetensors"
    manifest["weights_sha256"] = sha256_file(tmp_path / "plain.safetensors")
    (tmp_path / "plain.json").write_text(json.dumps(manifest))
    plain = load_generator(tmp_path / "plain.json")
    assert not plain.supports_guidance and not plain.has_property_head and plain.sampling["guidance"] == 1.0
    a = plain.sample(*args, steps=2, generator=torch.Generator().manual_seed(1))
    b = gen.sample(*args, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="--prompt-dropout"):
        plain.sampler(guidance=2.0)
    with pytest.raises(ConfigError, match="--property-head"):
        plain.predict_metric(theta)


# ---------------------------------------------------------------------- training with prompt dropout


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance") / "store"
    make_store(root, runs=4, checkpoints=5)
    return root


def test_prompt_dropout_drops_that_share_of_prompts_and_exports_a_generator_that_guides(store_dir, tmp_path,
                                                                                       monkeypatch):
    seen = []
    loss = Diffusion.training_loss
    monkeypatch.setattr(Diffusion, "training_loss", lambda self, m, x0, cond, **kw: seen.append(dict(cond)) or
                        loss(self, m, x0, cond, **kw))
    result = train(tiny_config(store_dir, tmp_path, batch_size=16, steps=6, export=True, prompt_dropout=0.5))
    dropped = torch.cat([c["drop_prompt"] for c in seen if "drop_prompt" in c])
    assert dropped.dtype == torch.bool and dropped.numel() == 6 * 16  # training steps only: held-out loss keeps prompts
    assert 0.2 < dropped.float().mean() < 0.8
    manifest = json.loads(result.manifest.read_text())
    assert manifest["model_config"]["null_prompt"] is True and manifest["model_config"]["property_head"] is False
    assert manifest["training"]["prompt_dropout"] == 0.5 and "null prompt" in manifest["training"]["loss"]
    gen = load_generator(result.manifest)
    assert gen.supports_guidance
    theta = torch.randn(2, gen.layout.num_params) * 0.1
    out = gen.sample(theta, torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5]), steps=2, guidance=2.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_prompt_dropout_changes_training_and_a_plain_run_has_neither_feature(store_dir, tmp_path):
    plain = train(tiny_config(store_dir, tmp_path / "plain"))
    dropout = train(tiny_config(store_dir, tmp_path / "dropout", prompt_dropout=0.5))
    assert state_hash(plain.model) != state_hash(dropout.model)
    assert plain.model.null_prompt is None and plain.model.property_head is None
    assert "property_loss" not in read_jsonl(tmp_path / "plain" / LOG_NAME)[-1]


AUX = dict(prompt_dropout=0.3, property_head=1.0)


def test_resumed_run_with_prompt_dropout_and_a_head_equals_an_uninterrupted_one(store_dir, tmp_path):
    whole = train(tiny_config(store_dir, tmp_path / "whole", **AUX))
    train(tiny_config(store_dir, tmp_path / "parts", stop_after=3, **AUX))
    resumed = train(tiny_config(store_dir, tmp_path / "parts", resume=True, **AUX))
    assert state_hash(resumed.model) == state_hash(whole.model) and state_hash(resumed.ema) == state_hash(whole.ema)
    state = load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)
    assert state["model_config"]["null_prompt"] and state["model_config"]["property_head"]
    for change, message in (({"prompt_dropout": 0.1}, "prompt_dropout=0.3 \\(asked: 0.1\\)"),
                            ({"property_head": 0.0}, "property_head=1.0 \\(asked: 0.0\\)")):
        with pytest.raises(TrainingError, match=message):
            train(tiny_config(store_dir, tmp_path / "parts", resume=True, steps=8, **{**AUX, **change}))
    with pytest.raises(TrainingError, match="prompt_dropout=0.3 \\(asked: 0.0\\)"):  # nor lose them on resume
        train(tiny_config(store_dir, tmp_path / "whole", resume=True, steps=8))


def test_checkpoint_from_before_the_options_still_resumes(store_dir, tmp_path):
    train(tiny_config(store_dir, tmp_path, stop_after=3))
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for key in ("prompt_dropout", "property_head"):
        del state["config"][key]
    for key in ("null_prompt", "property_head"):
        del state["model_config"][key]
    outputs.atomic_torch_save(state, path)
    assert train(tiny_config(store_dir, tmp_path, resume=True)).step == 6


def test_fine_tune_adds_a_null_prompt_and_a_head_to_a_plain_generator(store_dir, tmp_path):
    source = train(tiny_config(store_dir, tmp_path / "src", steps=3, export=True, name="src")).manifest
    src = load_generator(source)
    still = train(tiny_config(store_dir, tmp_path / "still", steps=1, lr=1e-30, init_from=str(source), **AUX))
    for name, value in src.model.state_dict().items():  # everything the source had starts where it was
        torch.testing.assert_close(still.model.state_dict()[name], value, rtol=0, atol=1e-12, msg=name)
    ft = train(tiny_config(store_dir, tmp_path / "ft", steps=2, export=True, init_from=str(source), **AUX))
    gen = load_generator(ft.manifest)
    assert gen.supports_guidance and gen.has_property_head
    # a fine-tune of that one without the options keeps its null prompt and head as they are
    again = train(tiny_config(store_dir, tmp_path / "again", steps=2, init_from=str(ft.manifest)))
    assert torch.equal(again.model.null_prompt, gen.model.null_prompt)
    assert all(torch.equal(a, b) for a, b in zip(again.model.property_head.parameters(),
                                                 gen.model.property_head.parameters()))


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("option, value", [("--prompt-dropout", "1.0"), ("--prompt-dropout", "-0.1"),
                                           ("--property-head", "-1"), ("--property-head", "nan")])
def test_train_refuses_bad_values_in_one_line(store_dir, tmp_path, capsys, option, value):
    code = cli_main(["train", "--store", str(store_dir), "--out", str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert code == 2 and option in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_train_options_are_parsed(store_dir, tmp_path):
    from pretrain.train.cli import config_from_args
    from learned_opt.cli import build_parser

    args = build_parser().parse_args(["train", "--store", str(store_dir), "--out", str(tmp_path),
                                      "--prompt-dropout", "0.1", "--property-head", "0.5"])
    config = config_from_args(args)
    assert (config.prompt_dropout, config.property_head) == (0.1, 0.5)


def test_eval_and_tune_sampling_refuse_guidance_for_a_plain_generator(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    for argv in (["eval", "--generator", str(manifest), "--out", str(tmp_path / "e"), "--data-root", str(mnist_root),
                  "--guidance", "2", "--no-progress"],
                 ["tune-sampling", "--generator", str(manifest), "--out", str(tmp_path / "t"),
                  "--data-root", str(mnist_root), "--guidance", "1,2", "--no-progress"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "--prompt-dropout" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["tune-sampling", "--generator", str(manifest), "--out", str(tmp_path / "t"),
                     "--guidance", "1,x", "--no-progress"]) == 2
    assert "--guidance takes comma-separated floats" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--guidance"):
        EvalConfig(generator="x", guidance=-1.0)
    with pytest.raises(ConfigError, match="--guidance"):
        TuneConfig(generator="x", guidance=(1.0, float("nan")))


def test_tune_sampling_sweeps_guidance_and_records_it(tmp_path):
    from test_sampling import _Gen, _Task

    from pretrain.sampling import format_table, record_choice, sweep

    class Guided(_Gen):  # the score is lowest (1.0) at guidance 2
        def sample(self, theta, metric, prompt, *, steps, method, t_min, guidance, temperature, generator):
            out = theta.clone()
            out[:, 0] = 1.0 + abs(guidance - 2.0)
            return out

    config = TuneConfig(generator="x", inits=2, samples=2, steps=(2,), t_min=(0,), guidance=(1.0, 2.0, 3.0),
                        tolerance=0.0, progress=False)
    r = sweep(Guided(), _Task(), None, torch.zeros(2, 5), config)
    assert [row["guidance"] for row in r["rows"]] == [1.0, 2.0, 3.0] and r["chosen"]["guidance"] == 2.0
    assert "guidance 2" in format_table(r)
    manifest = save_tiny_mnist_generator(tmp_path / "gen", null_prompt=True)
    record_choice(manifest, r, config)
    assert json.loads(manifest.read_text())["sampling"]["guidance"] == 2.0
    assert load_generator(manifest).sampling["guidance"] == 2.0
