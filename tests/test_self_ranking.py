"""Self-ranking: the property head, its training, ``rank="self"`` in GptOptimizer and eval, and
its rank correlations in ``learned-opt eval``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from gpt_helpers import DIFFUSION, NORM, snapshot, tiny_generator, toy_model
from test_demo import save_tiny_mnist_generator
from train_helpers import make_store, tiny_config

from learned_opt import GptOptimizer, tasks
from learned_opt.cli import main as cli_main
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.generator import build_generator, get_config
from learned_opt.layout import Layout
from learned_opt.pretrained import LoadedGenerator, load_generator
from pretrain.dataset import PairSampler, open_pairs
from pretrain.evaluate import EvalConfig, Sampler, evaluate_generator, init_params
from pretrain.evaluate.metrics import spearman
from pretrain.evaluate.report import property_lines
from pretrain.train import LOG_NAME, TrainConfig, read_jsonl, train
from pretrain.train.auxiliary import property_loss


def ranking_generator(direction: str = "min", seed: int = 0) -> LoadedGenerator:
    """A tiny toy generator with a property head; decoders and the head's read-out perturbed, so
    that samples differ with the noise and the head tells them apart."""
    torch.manual_seed(seed)
    layout = Layout.of(toy_model(), chunk_size=16)
    model = build_generator(layout, dataclasses.replace(get_config("tiny"), property_head=True))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in (*model.decoder.parameters(), *model.property_head.out.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return LoadedGenerator.from_model(model, DIFFUSION, NORM, name="toy-ranked", task="toy", metric="loss",
                                      best_prompt=0.0, metric_direction=direction)


def recording(gen: LoadedGenerator) -> list:
    """Record every batch of samples ``gen`` draws."""
    drawn = []
    sample = gen.sample
    gen.sample = lambda *a, **kw: drawn.append(sample(*a, **kw)) or drawn[-1]
    return drawn


def never(*_):
    raise AssertionError("rank='self' must not call the closure")


# ---------------------------------------------------------------------- rank="self" in the optimizer


@pytest.mark.parametrize("direction", ["min", "max"])
def test_rank_self_keeps_the_best_predicted_sample_without_calling_the_closure(direction):
    gen = ranking_generator(direction)
    drawn = recording(gen)
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, candidates=5, rank="self", guard=False, sampling_steps=3,
                       keep_if_met=False)
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.generate(never, metric=2.0)  # the closure is there, and never called
    assert report.accepted and report.candidates == 5 and report.candidate_metrics is None
    samples = drawn[0]  # [5, P]
    predicted = gen.predict_metric(samples)
    assert len(set(predicted.tolist())) == 5  # the head tells the samples apart
    best = int(predicted.argmin() if direction == "min" else predicted.argmax())
    assert report.predicted_metrics == pytest.approx(predicted.tolist())
    assert torch.equal(gen.layout.flatten([p.detach() for p in model.parameters()]), samples[best])
    assert not torch.equal(model.fc1.weight, before[0])
    # with no closure at all
    report = opt.generate(metric=2.0)
    assert report.accepted and len(drawn) == 2
    assert torch.equal(gen.layout.flatten([p.detach() for p in model.parameters()]),
                       drawn[1][gen.predict_metric(drawn[1]).argmin() if direction == "min" else
                                gen.predict_metric(drawn[1]).argmax()])


def test_rank_self_with_the_guard_measures_the_chosen_sample_only():
    gen = ranking_generator()
    drawn = recording(gen)
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, candidates=4, rank="self", sampling_steps=3)
    calls = []

    def closure():
        calls.append(gen.layout.flatten([p.detach().clone() for p in model.parameters()]))
        return 1.0  # the guard accepts: 1.0 is not worse than 2.0

    report = opt.generate(closure, metric=2.0)
    assert report.accepted and report.metric_after == 1.0 and report.candidate_metrics == [1.0]
    best = int(gen.predict_metric(drawn[0]).argmin())
    assert len(calls) == 1 and torch.equal(calls[0], drawn[0][best])
    state = snapshot(model, opt)
    report = opt.generate(lambda: 3.0, metric=2.0)  # worse: refused and θ restored
    assert not report.accepted and "went from 2 to 3" in report.reason
    assert torch.equal(state["params"][0], model.fc1.weight)


def test_rank_self_with_a_broken_head_fails_cleanly():
    gen = ranking_generator()
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, candidates=3, rank="self", guard=False, sampling_steps=2)
    before = snapshot(model, opt)
    gen.predict_metric = lambda flat: torch.full((flat.shape[0],), float("nan"))
    with pytest.warns(RuntimeWarning, match="not finite"):
        report = opt.generate(metric=2.0)
    assert report.failed and not report.accepted and opt.counters["failed"] == 1
    assert report.predicted_metrics == [None, None, None]
    gen.predict_metric = never
    with pytest.warns(RuntimeWarning, match="property head raised"):
        assert opt.generate(metric=2.0).failed
    from gpt_helpers import assert_same

    assert_same(snapshot(model, opt), before)


def test_rank_self_needs_a_head_and_rank_is_checked():
    plain = tiny_generator()
    with pytest.raises(ConfigError, match="--property-head"):
        GptOptimizer(toy_model().parameters(), plain, candidates=4, rank="self")
    with pytest.raises(ConfigError, match="Invalid rank"):
        GptOptimizer(toy_model().parameters(), ranking_generator(), rank="best")
    with pytest.raises(ConfigError, match="--property-head"):
        plain.predict_metric(torch.zeros(2, 75))
    with pytest.raises(ConfigError, match="--property-head"):
        plain.model.predict_metric(torch.zeros(2, 75))
    opt = GptOptimizer(toy_model().parameters(), ranking_generator(), candidates=4)  # rank="closure": today's
    with pytest.raises(GenerationError, match="rank='self'"):
        opt.generate(metric=2.0)


def test_predict_metric_is_in_metric_units_and_leaves_inputs_alone():
    gen = ranking_generator()
    theta = torch.randn(4, 75)
    before = theta.clone()
    raw = gen.predict_metric(theta)
    normalised = gen.model.predict_metric(NORM.params(theta))
    torch.testing.assert_close(raw, NORM.unmetric(normalised))
    assert torch.equal(theta, before) and raw.shape == (4,)
    # an untrained head (zero read-out) predicts the middle of the metric range
    fresh = build_generator(gen.layout, dataclasses.replace(get_config("tiny"), property_head=True))
    assert torch.equal(fresh.predict_metric(theta), torch.full((4,), 0.5))


# ---------------------------------------------------------------------- training the head


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking") / "store"
    make_store(root, runs=4, checkpoints=5)
    return root


def test_property_head_fits_the_metrics_of_a_tiny_store(store_dir):
    """On make_store's runs the metric falls as the random walk's norm grows: the head learns it."""
    pairs = open_pairs(str(store_dir), TrainConfig(store=str(store_dir)).pair_config())
    torch.manual_seed(0)
    model = build_generator(pairs.task.layout(1000, "chunk"),
                            dataclasses.replace(get_config("tiny"), property_head=True))
    sampler = PairSampler(len(pairs.train), 16, 0, pairs.task, True)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    losses = []
    for step in range(120):
        idx, perms = sampler.global_batch(step)
        loss = property_loss(model, pairs.train.batch(idx, perms))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)


@pytest.mark.slow
def test_training_with_a_property_head_lowers_its_loss_and_exports_it(store_dir, tmp_path):
    result = train(tiny_config(store_dir, tmp_path, steps=120, batch_size=16, lr=3e-3, warmup=5, log_every=20,
                               eval_every=60, checkpoint_every=60, export=True, property_head=1.0))
    log = read_jsonl(tmp_path / LOG_NAME)
    assert log[-1]["property_loss"] < 0.5 * log[0]["property_loss"], [r["property_loss"] for r in log]
    assert {"heldout_property_loss", "heldout_property_loss_ema"} <= set(log[-1])
    manifest = json.loads(result.manifest.read_text())
    assert manifest["model_config"]["property_head"] is True and manifest["model_config"]["null_prompt"] is False
    assert manifest["training"]["property_head"] == 1.0 and "property_head x" in manifest["training"]["loss"]
    assert manifest["training"]["final_property_loss"] == log[-1]["property_loss"]
    gen = load_generator(result.manifest)
    assert gen.has_property_head and not gen.supports_guidance
    # the exported head orders the store's checkpoints by their metric
    store_pairs = open_pairs(str(store_dir), TrainConfig(store=str(store_dir)).pair_config())
    batch = store_pairs.train.batch(list(range(len(store_pairs.train))))
    predicted = gen.model.predict_metric(torch.cat([batch.theta, batch.theta_next]))
    assert spearman(predicted, torch.cat([batch.metric, batch.target])) > 0.5


# ---------------------------------------------------------------------- eval


def test_spearman_on_known_data():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # ties get their mean rank
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_eval_sampler_rank_self_keeps_the_best_predicted_sample(tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    gen = load_generator(manifest)
    with torch.no_grad():  # a head whose predictions differ between samples
        gen.model.property_head.out.weight.normal_(0, 1.0)
    drawn = recording(gen)
    theta = init_params(tasks.get("mnist-mlp"), [5, 6])
    out = Sampler(gen, EvalConfig(generator="x", sampling_steps=2, candidates=3, rank="self"), seed=0)(
        theta, torch.ones(2), torch.zeros(2))
    flat = torch.cat(drawn)
    best = gen.predict_metric(flat).view(2, 3).argmin(1)
    torch.testing.assert_close(out, flat.view(2, 3, -1)[torch.arange(2), best])
    plain = load_generator(save_tiny_mnist_generator(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="--property-head"):
        Sampler(plain, EvalConfig(generator="x", candidates=3, rank="self"), seed=0)
    with pytest.raises(ConfigError, match="--rank"):
        EvalConfig(generator="x", rank="best")


def test_eval_reports_the_heads_rank_correlations(mnist_data, tmp_path):
    manifest = save_tiny_mnist_generator(tmp_path / "gen", property_head=True)
    data = json.loads(manifest.read_text())
    data["corpus"] = {"split": {"train": [0, 1], "heldout": [2, 3], "heldout_fraction": 0.5, "seed": 0}}
    manifest.write_text(json.dumps(data))
    store = make_store(tmp_path / "store", runs=4, checkpoints=5)
    common = dict(generator=str(manifest), store=str(store.root), inits=2, prompts=3, max_steps=10,
                  sampling_steps=1, repeats=1, timing_steps=5, memo_runs=2, memo_checkpoints=2, progress=False,
                  plots=False)
    r = evaluate_generator(EvalConfig(out=str(tmp_path / "e"), candidates=2, rank="self", **common), data=mnist_data)
    prop = r["property_head"]
    assert prop["heldout_checkpoints"]["count"] == 2 * 5  # both held-out runs, every one of their 5 checkpoints
    assert prop["generated_one_step"]["count"] == 2 and prop["generated_prompt_alignment"]["count"] == 2 * 3
    for key in ("heldout_checkpoints", "generated_one_step", "generated_prompt_alignment"):
        assert "spearman" in prop[key] and prop[key]["mean_abs_error"] >= 0
    assert r["sampler"]["rank"] == "self" and "candidates_scored" not in r["sampler"]  # no validation data used
    assert "Spearman" in property_lines(prop)[0]
    plain = save_tiny_mnist_generator(tmp_path / "plain")
    r = evaluate_generator(EvalConfig(out=str(tmp_path / "p"), **{**common, "generator": str(plain)}), data=mnist_data)
    assert "skipped" in r["property_head"] and property_lines(r["property_head"]) == []


def test_eval_rank_self_without_a_head_is_refused_in_one_line(mnist_root, tmp_path, capsys):
    manifest = save_tiny_mnist_generator(tmp_path / "gen")
    code = cli_main(["eval", "--generator", str(manifest), "--out", str(tmp_path / "e"), "--data-root",
                     str(mnist_root), "--candidates", "4", "--rank", "self", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--property-head" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        cli_main(["eval", "--generator", str(manifest), "--out", str(tmp_path / "e"), "--rank", "best"])


@pytest.mark.parametrize("argv, hint", [
    (["eval"], "give --candidates 2 or more"),
    (["bench", "--bases", "adam", "--every", "10"], "or several --step-size values"),
])
def test_rank_self_with_nothing_to_choose_from_is_refused_in_one_line(tmp_path, capsys, argv, hint):
    code = cli_main(argv + ["--generator", "never-read", "--out", str(tmp_path / "o"), "--rank", "self"])
    err = capsys.readouterr().err
    assert code == 2 and hint in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_ranking_by_a_generator_in_training_mode_draws_nothing_from_the_global_rng():
    gen = ranking_generator()
    gen.model.train()
    for m in gen.model.modules():  # dropout that would draw from the global RNG in training mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    opt = GptOptimizer(toy_model().parameters(), gen, candidates=4, rank="self", guard=False, sampling_steps=2,
                       keep_if_met=False)
    state = torch.get_rng_state()
    assert opt.generate(metric=2.0).accepted
    assert torch.equal(torch.get_rng_state(), state) and gen.model.training
