"""Late updates: ``GptOptimizer(step_size=...)`` (θ + α(θ′ − θ) instead of θ′, and a line search over
several α) and ``min_improvement`` (the guard's margin)."""

from __future__ import annotations

import pytest
import torch
from gpt_helpers import FnGenerator, tiny_generator, toy_loss, toy_model
from hypothesis import given, settings
from hypothesis import strategies as st

from test_self_ranking import ranking_generator

from learned_opt import GptOptimizer
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.proposal import along_line

vec = torch.nn.utils.parameters_to_vector


def proposal(seed: int = 0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """θ and the θ′ a fresh optimizer (seed ``seed``) moves a toy model to, with ``kw``."""
    model = toy_model()
    theta = vec(model.parameters()).detach().clone()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), guard=False, sampling_steps=3, seed=seed, **kw)
    report = opt.generate(metric=2.0)
    assert report.accepted
    return theta, vec(model.parameters()).detach().clone()


def test_step_size_one_is_the_sample_itself_bit_for_bit():
    assert torch.equal(proposal()[1], proposal(step_size=1.0)[1])
    assert torch.equal(proposal()[1], proposal(step_size=[1])[1])


@pytest.mark.parametrize("alpha", [0.25, 0.5, 2.0])
def test_a_fixed_step_size_moves_that_share_of_the_way(alpha):
    theta, full = proposal()
    _, short = proposal(step_size=alpha)
    torch.testing.assert_close(short, theta + alpha * (full - theta))


def test_the_closure_chooses_the_step_size_and_the_report_says_which():
    model = toy_model()
    gen = tiny_generator(perturb=0.05)
    theta = vec(model.parameters()).detach().clone()
    full = proposal()[1]
    target = theta + 0.5 * (full - theta)

    def distance_to_target():  # best at α = 0.5 exactly
        return float((vec(model.parameters()) - target).norm())

    opt = GptOptimizer(model.parameters(), gen, sampling_steps=3, step_size=(1, 0.5, 0.25))
    report = opt.generate(distance_to_target, metric=2.0)  # the metric that proposal() conditions on
    assert report.accepted and report.step_size == 0.5
    assert len(report.candidate_metrics) == 3 and report.metric_after == min(report.candidate_metrics)
    torch.testing.assert_close(vec(model.parameters()).detach(), target)
    assert "step_size=1,0.5,0.25" in repr(opt)


def test_a_line_search_the_guard_refuses_leaves_theta_and_names_the_step_size():
    model = toy_model()
    theta = vec(model.parameters()).detach().clone()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), sampling_steps=3, step_size=(1, 0.5))
    report = opt.generate(lambda: 1 + float((vec(model.parameters()) - theta).norm()))  # θ itself is best
    assert not report.accepted and report.step_size == 0.5  # the nearest point, still worse than θ
    assert torch.equal(vec(model.parameters()).detach(), theta)


def test_several_step_sizes_with_closure_ranking_need_a_closure():
    model = toy_model()
    theta = vec(model.parameters()).detach().clone()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), sampling_steps=3, step_size=(1, 0.5))
    with pytest.raises(GenerationError, match="needs a closure"):
        opt.generate(metric=2.0)
    assert torch.equal(vec(model.parameters()).detach(), theta) and opt.counters["attempted"] == 0


def test_periodic_mode_searches_the_line_at_each_update():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), tiny_generator(perturb=0.05), every=2, sampling_steps=3, lr=1e-2,
                       metric_closure=lambda: toy_loss(model), step_size=(1, 0.5, 0.25))
    for _ in range(4):
        opt.zero_grad()
        toy_loss(model).backward()
        opt.step()
    assert opt.counters["attempted"] == 2 and opt.last_report.step_size in (1, 0.5, 0.25)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), (), (1, 0), "1", True, None, (1, "a"), (1, 1)])
def test_invalid_step_sizes_are_refused(value):
    with pytest.raises(ConfigError, match="step_size"):
        GptOptimizer(toy_model().parameters(), tiny_generator(), step_size=value)


def test_an_optimizer_pickled_before_step_sizes_takes_the_sample_itself():
    opt = GptOptimizer(toy_model().parameters(), tiny_generator())
    state = opt.__getstate__()
    del state["step_sizes"]
    old = GptOptimizer.__new__(GptOptimizer)
    old.__setstate__(state)
    assert old.step_sizes == (1.0,)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 3.0), min_size=1, max_size=4), st.integers(1, 3))
def test_points_lie_on_the_line_candidate_major(alphas, c):
    g = torch.Generator().manual_seed(len(alphas) * 7 + c)
    theta, samples = torch.randn(5, generator=g), torch.randn(c, 5, generator=g)
    points = along_line(theta, samples, tuple(alphas))
    assert points.shape == (c * len(alphas), 5)
    for i, point in enumerate(points):
        a, s = alphas[i % len(alphas)], samples[i // len(alphas)]
        torch.testing.assert_close(point, theta + a * (s - theta))


@pytest.mark.parametrize("direction, before, after", [("min", 1.0, 0.993), ("max", 100.0, 100.7)])
@pytest.mark.parametrize("margin, accepted", [(0.0, True), (0.005, True), (0.01, False)])
def test_the_guard_asks_for_min_improvement_of_the_metric(direction, before, after, margin, accepted):
    model = toy_model()
    theta = vec(model.parameters()).detach().clone()
    gen = FnGenerator(lambda th: th + 0.01)
    gen.metric_direction = direction
    opt = GptOptimizer(model.parameters(), gen, keep_if_met=False, min_improvement=margin)
    report = opt.generate(lambda values=iter([before, after]): next(values))
    assert report.accepted is accepted and report.metric_after == after
    if not accepted:
        assert "min_improvement" in report.reason and torch.equal(vec(model.parameters()).detach(), theta)


@pytest.mark.parametrize("value", [-0.1, 1, 1.5, float("nan"), True, "0.1", None])
def test_invalid_min_improvements_are_refused(value):
    with pytest.raises(ConfigError, match="min_improvement"):
        GptOptimizer(toy_model().parameters(), tiny_generator(), min_improvement=value)


def test_an_optimizer_pickled_before_min_improvement_accepts_any_update_not_worse():
    opt = GptOptimizer(toy_model().parameters(), tiny_generator(), min_improvement=0.01)
    state = opt.__getstate__()
    del state["min_improvement"]
    old = GptOptimizer.__new__(GptOptimizer)
    old.__setstate__(state)
    assert old.min_improvement == 0.0


def flat(model) -> torch.Tensor:
    return vec(model.parameters()).detach().clone()


def test_candidates_at_several_step_sizes_are_points_candidate_major():
    # two candidates θ + 1 and θ + 2 (ε apart in the generator's call order), each at α = 1 and 0.5
    shifts = iter([torch.tensor([[1.0], [2.0]])])
    gen = FnGenerator(lambda th: th + next(shifts))
    model = toy_model()
    theta = flat(model)
    seen = []

    def closure():  # 0 at θ + 1: candidate 0 at α = 1 and candidate 1 at α = 0.5; the first call measures θ
        seen.append(flat(model))
        return float((flat(model) - (theta + 1)).abs().sum()) + (0.5 if len(seen) == 1 else 0.0)

    opt = GptOptimizer(model.parameters(), gen, candidates=2, step_size=(1, 0.5), max_update_ratio=100.0)
    report = opt.generate(closure)
    expected = [theta + 1, theta + 0.5, theta + 2, theta + 1]  # candidate-major
    assert len(seen) == 5 and all(torch.allclose(a, b) for a, b in zip(seen[1:], expected))
    assert report.accepted and len(report.candidate_metrics) == 4
    assert report.step_size == 1.0 and torch.allclose(flat(model), theta + 1)  # the first of the two ties


def test_rank_self_predicts_every_point_and_loads_the_best():
    gen = ranking_generator()
    model = toy_model()
    theta = flat(model)
    opt = GptOptimizer(model.parameters(), gen, candidates=2, rank="self", guard=False, sampling_steps=3,
                       keep_if_met=False, step_size=(1, 0.5, 0.25))
    report = opt.generate(metric=2.0)
    assert report.accepted and len(report.predicted_metrics) == 6
    best = min(range(6), key=lambda i: report.predicted_metrics[i])
    assert report.step_size == (1, 0.5, 0.25)[best % 3]
    assert gen.predict_metric(flat(model)[None]).item() == pytest.approx(report.predicted_metrics[best])
    assert not torch.equal(flat(model), theta)


def test_a_broken_sample_is_not_rescued_by_a_short_step():
    model = toy_model()
    theta = flat(model)
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 100.0), step_size=(1, 0.01))
    with pytest.warns(RuntimeWarning, match="failed"):
        report = opt.generate(lambda: 1.0)
    assert report.failed and "all 2 points failed validation" in report.reason and "max_update_ratio" in report.reason
    assert torch.equal(flat(model), theta)


def test_a_long_step_that_fails_the_trust_check_leaves_the_others():
    model = toy_model()
    theta = flat(model)
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.1), step_size=(1, 500), guard=False,
                       keep_if_met=False)
    report = opt.generate(lambda: float(vec(model.parameters()).sum()))  # would prefer the far point if measured
    assert report.accepted and report.step_size == 1 and len(report.candidate_metrics) == 1
    torch.testing.assert_close(flat(model), theta + 0.1)


def test_without_the_guard_the_closure_still_chooses_the_point_and_it_is_kept():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.1), step_size=(1, 0.5), guard=False)
    report = opt.generate(lambda: 10.0 + float((flat(model) - flat(toy_model())).norm()), metric=1.0)
    assert report.accepted and report.step_size == 0.5 and report.metric_after > report.metric_before


def test_float64_parameters_are_moved_in_float64():
    model = toy_model().double()
    theta = flat(model)
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.1), step_size=1e-3, guard=False)
    assert opt.generate(metric=1.0).accepted
    sample = (theta.float() + 0.1).double()  # the generator computes in float32
    assert torch.equal(flat(model), theta + 1e-3 * (sample - theta))


def test_an_interrupt_during_a_line_search_restores_theta():
    model = toy_model()
    theta = flat(model)
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.1), step_size=(1, 0.5, 0.25))
    calls = iter([1.0, 0.5])

    def closure():
        try:
            return next(calls)
        except StopIteration:
            raise KeyboardInterrupt from None

    with pytest.raises(KeyboardInterrupt):
        opt.generate(closure)
    assert torch.equal(flat(model), theta) and opt.counters["rejected"] == 1


def test_min_improvement_needs_the_guard():
    with pytest.raises(ConfigError, match="min_improvement=0.01 is the guard's margin"):
        GptOptimizer(toy_model().parameters(), tiny_generator(), min_improvement=0.01, guard=False)
