"""GptOptimizer's generative updates: transactions, the guard, prompts, metrics, RNG, periodic mode."""

from __future__ import annotations

import io
import math

import pytest
import torch
from gpt_helpers import (
    FnGenerator,
    assert_same,
    save_tiny_generator,
    snapshot,
    tiny_generator,
    toy_data,
    toy_loss,
    toy_model,
)

from learned_opt.errors import GenerationError
from learned_opt.optimizer import GenerationReport, GptOptimizer
from learned_opt.pretrained import load_generator

STEPS = 4  # sampling steps in tests: enough to exercise DDIM, cheap on two shared cores


def _metric(model):
    return lambda: toy_loss(model)


def _warm(model, opt, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        toy_loss(model).backward()
        opt.step()


def _trained_params(steps: int = 150) -> torch.Tensor:
    """The toy model's parameters after Adam training: a good θ′."""
    model = toy_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    _warm(model, opt, steps)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------- transactions


BAD = {
    "raises": (lambda th: (_ for _ in ()).throw(RuntimeError("boom")), "raised RuntimeError"),
    "nan": (lambda th: th * float("nan"), "NaN or Inf"),
    "inf": (lambda th: th + float("inf"), "NaN or Inf"),
    "short": (lambda th: th[:, :-1], "shape"),
    "batch": (lambda th: th.expand(2, -1), "shape"),
    "not a tensor": (lambda th: th.tolist(), "shape"),
    "exploding": (lambda th: th * 1e6, "max_update_ratio"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generator_changes_nothing_and_is_counted(case):
    fn, reason = BAD[case]
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(fn), lr=1e-2)
    _warm(model, opt)
    opt.zero_grad()
    toy_loss(model).backward()  # live gradients must survive too
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="generative update failed"):
        report = opt.generate(_metric(model))
    assert isinstance(report, GenerationReport)
    assert not report.accepted and report.failed and reason in report.reason
    assert report.metric_after is None and report.seconds >= 0
    assert_same(snapshot(model, opt), before)
    assert opt.counters == {"steps": 3, "attempted": 1, "accepted": 0, "rejected": 0, "failed": 1, "kept": 0}


def test_closure_failing_on_sample_restores():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation crashed")
        return toy_loss(model)

    before = snapshot(model, opt)
    report = opt.generate(closure)
    assert not report.accepted and "closure failed" in report.reason
    assert_same(snapshot(model, opt), before)


# ---------------------------------------------------------------------- guard


def test_better_update_is_accepted_and_adam_moments_kept():
    good = _trained_params()
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: good[None].clone()), lr=1e-2)
    _warm(model, opt)
    state_before = snapshot(model, opt)["state"]
    report = opt.generate(_metric(model))
    assert report.accepted and report.reason is None and not report.failed
    assert report.metric_after < report.metric_before
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), good)
    assert_same(snapshot(model, opt)["state"], state_before)
    assert opt.counters["accepted"] == 1 and opt.counters["attempted"] == 1


def test_worse_update_is_rejected_exactly():
    noise = torch.randn(1, 75, generator=torch.Generator().manual_seed(0)) * 0.3
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + noise), lr=1e-2)
    _warm(model, opt)
    before = snapshot(model, opt)
    report = opt.generate(_metric(model))
    assert not report.accepted and not report.failed and report.metric_after > report.metric_before
    assert "loss went from" in report.reason
    assert_same(snapshot(model, opt), before)
    assert opt.counters["rejected"] == 1 and opt.counters["accepted"] == 0


def _losses_of(model, thetas: torch.Tensor) -> list[float]:
    """The toy loss of each parameter vector [C, P], the model restored after."""
    params = list(model.parameters())
    keep = [p.detach().clone() for p in params]
    out = []
    with torch.no_grad():
        for theta in thetas:
            torch.nn.utils.vector_to_parameters(theta, params)
            out.append(float(toy_loss(model)))
        for p, k in zip(params, keep):
            p.copy_(k)
    return out


def test_candidates_keep_the_best_sample_by_the_closure():
    g = torch.Generator().manual_seed(3)
    model = toy_model()
    gen = FnGenerator(lambda th: th + 0.05 * torch.randn(th.shape, generator=g))
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, candidates=6)
    _warm(model, opt)
    g.manual_seed(3)
    expected = gen.fn(torch.cat([p.detach().reshape(-1) for p in model.parameters()])[None].expand(6, -1))
    losses = _losses_of(model, expected)
    g.manual_seed(3)
    report = opt.generate(_metric(model))
    assert gen.last_call["theta"].shape[0] == 6  # one batched call for all candidates
    assert report.candidates == 6 and report.candidate_metrics == pytest.approx(losses)
    best = min(range(6), key=losses.__getitem__)
    assert report.metric_after == pytest.approx(losses[best])
    if report.accepted:
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), expected[best])
    else:  # the best was still worse than before: nothing changed
        assert report.metric_after > report.metric_before and "the best of 6 candidates" in report.reason


def test_candidates_reject_exactly_when_all_are_worse_and_skip_broken_ones():
    noise = torch.randn(3, 75, generator=torch.Generator().manual_seed(0)) * 0.3
    model = toy_model()
    broken = torch.tensor([float("nan"), 0.0, 0.0])[:, None]  # the first candidate is not finite
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + noise + broken), lr=1e-2, candidates=3)
    _warm(model, opt)
    before = snapshot(model, opt)
    report = opt.generate(_metric(model))
    assert not report.accepted and not report.failed and "the best of 2 candidates" in report.reason
    assert len(report.candidate_metrics) == 2
    assert_same(snapshot(model, opt), before)


def test_candidates_without_a_finite_metric_are_rejected_even_without_the_guard():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2, candidates=2, guard=False)
    values = iter([1.0, float("nan"), float("inf")])  # before, then one per candidate
    before = snapshot(model, opt)
    report = opt.generate(lambda: next(values))
    assert not report.accepted and "no candidate of 2 gave a finite metric" in report.reason
    assert report.candidate_metrics == [None, None]
    assert_same(snapshot(model, opt), before)


def test_candidates_need_a_closure():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th), lr=1e-2, candidates=2)
    before = snapshot(model, opt)
    with pytest.raises(GenerationError, match="candidates=2 needs a closure"):
        opt.generate(metric=1.0)
    assert_same(snapshot(model, opt), before)
    assert opt.counters["attempted"] == 0


def test_sampler_defaults_come_from_the_generator_and_can_be_overridden():
    gen = FnGenerator(lambda th: th)
    gen.sampling = {"method": "dpm++2m", "steps": 7, "t_min": 30}
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    assert (opt.sampling_method, opt.sampling_steps, opt.sampling_t_min) == ("dpm++2m", 7, 30)
    opt.generate(metric=1.0)
    assert {k: gen.last_call[k] for k in ("method", "steps", "t_min")} == {"method": "dpm++2m", "steps": 7, "t_min": 30}
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, sampling_method="ddim", sampling_steps=3, sampling_t_min=0)
    opt.generate(metric=1.0)
    assert {k: gen.last_call[k] for k in ("method", "steps", "t_min")} == {"method": "ddim", "steps": 3, "t_min": 0}
    assert "ddim-3 t_min=0" in repr(opt)


def test_non_finite_metric_after_update_is_rejected():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    values = iter([1.0, float("nan")])
    before = snapshot(model, opt)
    report = opt.generate(lambda: next(values))
    assert not report.accepted and not report.failed
    assert report.reason.startswith("with the sampled parameters") and "=nan" in report.reason
    assert_same(snapshot(model, opt), before)


def test_guard_opt_out_accepts_a_worse_update():
    noise = torch.randn(1, 75, generator=torch.Generator().manual_seed(0)) * 0.3
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + noise), lr=1e-2, guard=False)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    report = opt.generate(_metric(model))
    assert report.accepted and report.metric_after is None
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta + noise[0])


def test_metric_given_directly_skips_the_guard():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.3), lr=1e-2)
    report = opt.generate(metric=torch.tensor(2.0, requires_grad=True))
    assert report.accepted and report.metric_before == 2.0 and report.metric_after is None


def test_maximised_metric_guard():
    model = toy_model()
    gen = FnGenerator(lambda th: th - 0.01)
    gen.metric_direction = "max"
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, keep_if_met=False)  # the metric is above the range
    values = iter([10.0, 9.0, 10.0, 11.0])  # before/after of two updates
    assert not opt.generate(lambda: next(values)).accepted
    assert opt.generate(lambda: next(values)).accepted


# ---------------------------------------------------------------------- metrics and prompts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "needs the current 'loss'"),
        (dict(metric=float("nan")), "finite metric"),
        (dict(metric=torch.tensor(float("inf"))), "finite metric"),
        (dict(closure=lambda: float("nan")), "finite metric"),
        (dict(closure=lambda: {"accuracy": 0.5}), "conditioned on 'loss'"),
        (dict(metric=torch.ones(3)), "shape"),
        (dict(metric="high"), "as a number"),
        (dict(metric=1.0, prompt=float("nan")), "prompt"),
    ],
)
def test_bad_metric_raises_before_anything_happens(kwargs, message):
    model = toy_model()
    gen = FnGenerator(lambda th: th + 0.01)
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    before = snapshot(model, opt)
    with pytest.raises(GenerationError, match=message):
        opt.generate(**kwargs)
    assert_same(snapshot(model, opt), before)
    assert gen.calls == 0 and opt.counters["attempted"] == 0


def test_closure_may_return_a_mapping_or_a_tensor_with_grad():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th), lr=1e-2)
    assert opt.generate(lambda: {"loss": toy_loss(model), "other": 1}).accepted
    w = torch.ones((), requires_grad=True)
    assert opt.generate(metric=w * 2).metric_before == 2.0


def test_prompt_default_number_callable_and_clamped():
    model = toy_model()
    gen = FnGenerator(lambda th: th)
    # metric range [0, 5], best prompt 0; keep_if_met=False: a prompt of 5 for a metric of 2 still samples
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, keep_if_met=False)
    assert opt.generate(metric=2.0).prompt == 0.0
    assert opt.generate(metric=2.0, prompt=1.5).prompt == 1.5
    assert opt.generate(metric=2.0, prompt=lambda m: m / 4).prompt == 0.5
    with pytest.warns(UserWarning, match="outside the generator's loss range"):
        report = opt.generate(metric=2.0, prompt=9.0)
    assert report.prompt == 5.0 and gen.last_call["prompt"].item() == 5.0
    assert gen.last_call["metric"].item() == 2.0 and gen.last_call["theta"].shape == (1, 75)
    with pytest.warns(UserWarning):
        assert opt.generate(metric=2.0, prompt=-1.0).prompt == 0.0


@pytest.mark.parametrize("direction, metric, prompt", [("min", 0.5, 1.0), ("min", 1.0, 1.0), ("max", 5.0, 5.0)])
def test_a_metric_that_already_meets_the_prompt_keeps_theta_without_sampling(direction, metric, prompt):
    model = toy_model()
    gen = FnGenerator(lambda th: th + 1.0)
    gen.metric_direction = direction
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, guard=False, prompt=prompt)
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.generate(metric=metric)
    assert report.kept and not report.accepted and "already meets the prompt" in report.reason
    assert gen.calls == 0  # nothing was sampled
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.counters["kept"] == 1 and opt.counters["attempted"] == 1 and opt.counters["rejected"] == 0
    # one step short of the prompt samples as usual; keep_if_met=False always samples
    short = metric + (1.0 if direction == "min" else -1.0)
    assert opt.generate(metric=short).accepted
    off = GptOptimizer(toy_model().parameters(), gen, lr=1e-2, guard=False, prompt=prompt, keep_if_met=False)
    assert off.generate(metric=metric).accepted and off.counters["kept"] == 0


# ---------------------------------------------------------------------- randomness


def _sample_after_generate(seed: int) -> torch.Tensor:
    model = toy_model()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), lr=1e-2, seed=seed,
                       sampling_steps=STEPS, guard=False)
    assert opt.generate(metric=1.0).accepted
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_seeded_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = _sample_after_generate(0), _sample_after_generate(0), _sample_after_generate(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, torch.cat([p.detach().reshape(-1) for p in toy_model().parameters()]))
    torch.set_rng_state(state)  # toy_model() reseeds; check generate/step alone:
    model = toy_model()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), lr=1e-2, sampling_steps=STEPS,
                       every=1, metric_closure=_metric(model))
    state = torch.get_rng_state()
    _warm(model, opt, 2)
    assert torch.equal(torch.get_rng_state(), state) and opt.counters["attempted"] == 2


def test_loading_a_generator_from_a_file_leaves_the_global_rng_untouched(tmp_path):
    path = save_tiny_generator(tmp_path, perturb=0.05)
    model = toy_model()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    gen = load_generator(path)
    assert torch.equal(torch.get_rng_state(), state)
    opt = GptOptimizer(model.parameters(), generator=path, lr=1e-2, sampling_steps=STEPS)
    assert torch.equal(torch.get_rng_state(), state)
    assert opt.generator.sha256 == gen.sha256 and opt.generate(metric=1.0, prompt=0.5).accepted
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- periodic mode and resume


def test_periodic_updates_every_k_steps():
    model = toy_model()
    gen = FnGenerator(lambda th: th + 0.001)
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, every=3, metric_closure=_metric(model),
                       prompt=lambda m: m * 0.9)
    _warm(model, opt, 7)
    assert gen.calls == 2 and opt.counters["attempted"] == 2 and opt.counters["steps"] == 7
    assert opt.last_report is not None and opt.last_report.step == 6
    assert opt.last_report.prompt == pytest.approx(0.9 * opt.last_report.metric_before)


def _periodic(model):
    return GptOptimizer(model.parameters(), tiny_generator(perturb=0.02), lr=1e-2, every=4,
                        metric_closure=_metric(model), sampling_steps=STEPS, guard=False)


def test_resume_across_generative_updates_equals_uninterrupted():
    straight = toy_model()
    opt = _periodic(straight)
    _warm(straight, opt, 11)
    assert opt.counters["accepted"] == 2

    first = toy_model()
    opt1 = _periodic(first)
    _warm(first, opt1, 5)  # one update done, the next one comes after the resume
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = toy_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = _periodic(resumed)
    opt2.load_state_dict(ckpt["opt"])
    _warm(resumed, opt2, 6)
    assert_same(snapshot(resumed, opt2), snapshot(straight, opt))
    assert opt2.counters == opt.counters
    assert torch.equal(opt2._rng.get_state(), opt._rng.get_state())


# ---------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_runs_on_the_parameters_device():
    model = toy_model().cuda()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), lr=1e-2, sampling_steps=STEPS)
    assert opt.generator.device.type == "cuda" and opt._rng.device.type == "cuda"
    report = opt.generate(lambda: toy_loss(model, tuple(t.cuda() for t in toy_data())))
    assert report.failed is False and math.isfinite(report.metric_before)
    sd = opt.state_dict()
    assert sd["gpt"]["rng_state"].device.type == "cpu"


# ---------------------------------------------------------------------- the real task


def test_mnist_mlp_with_task_metric_closure(mnist_data):
    """The mnist-mlp task's own batched evaluation as the metric closure (a name -> value mapping)."""
    from learned_opt import tasks
    from learned_opt.diffusion import DiffusionConfig
    from learned_opt.generator import build_generator
    from learned_opt.normalization import Normalization
    from learned_opt.pretrained import LoadedGenerator

    task = tasks.get("mnist-mlp")
    torch.manual_seed(0)
    gen = LoadedGenerator.from_model(
        build_generator(task.layout(), "tiny"), DiffusionConfig(), Normalization.from_stats(0.1, 0.0, 2.5),
        task=task.name, metric="test_loss", best_prompt=0.0,
    )
    model = task.build_model()
    opt = GptOptimizer(model.named_parameters(), gen, lr=1e-3, sampling_steps=2)

    def metrics():
        flat = task.layout().flatten_module(model)[None]  # [1, P]
        return {k: v[0] for k, v in task.evaluate(flat, mnist_data, ["test_loss", "test_error"]).items()}

    x, y = mnist_data.train_x[:256], mnist_data.train_y[:256]
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    report = opt.generate(metrics)  # an untrained generator returns θ: the metric does not move
    assert report.accepted and report.metric_after == pytest.approx(report.metric_before)
    assert report.metric_before < 2.2  # 20 Adam steps already beat chance (ln 10 ≈ 2.30)
