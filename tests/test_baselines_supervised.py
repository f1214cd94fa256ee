"""The one supervised training loop (``learned_opt.baselines.supervised``): any SupervisedTask, any
input shape, seeded data order, evaluation at given steps, and a wrapped optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from learned_opt import LearnedOptimizer
from learned_opt.baselines.supervised import BASELINES, BaselineRun, make_optimizer, recipe_of, train_baseline
from learned_opt.errors import ConfigError, GenerationError
from learned_opt.recipes import ADAM_BASELINE, GPT_RECIPE, LOPT_BASELINE, SGD_BASELINE, cosine_lr
from learned_opt.tasks import ClassificationData, SupervisedTask


class TwoConv(SupervisedTask):
    """A 2-conv net on image tensors (defined here, not registered)."""

    name = "test-two-conv"

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )

    def load_data(self, root=None, *, download=False):  # the tests pass data in
        raise NotImplementedError


@pytest.fixture(scope="module")
def few_images(mnist_data):
    """600 training and 300 test images of real MNIST."""
    d = mnist_data
    return ClassificationData(d.train_x[:600], d.train_y[:600], d.test_x[:300], d.test_y[:300])


def _init(task, seed: int = 0) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.layout().flatten_module(task.build_model())


def test_a_cnn_trains_and_the_run_is_seeded(few_images):
    task = TwoConv()
    init = _init(task)
    rng = torch.get_rng_state()
    seen = []
    recipe = {**ADAM_BASELINE, "lr": 1e-2}  # a recipe of one's own: a small CNN learns faster than at 1e-3
    curve = train_baseline(task, init, few_images, recipe, 40, [0, 20, 40], seed=1,
                           on_step=lambda t, model, opt: seen.append(t))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert seen == list(range(1, 41))
    assert curve.steps == [0, 20, 40] and curve.optimizer == "adam"
    assert curve.test_loss[-1] < curve.test_loss[0] - 0.3
    assert curve.wall_s[0] == 0.0 and 0 < curve.wall_s[1] < curve.wall_s[2]
    assert 0 < curve.seconds_per_step < 10 and curve.diverged_at is None
    assert all(0 <= e <= 100 for e in curve.test_error)
    again = train_baseline(task, init, few_images, recipe, 40, [40], seed=torch.Generator().manual_seed(1))
    assert again.test_loss == curve.test_loss[-1:]  # the same order from a seed or its generator
    other = train_baseline(task, init, few_images, recipe, 40, [40], seed=2)
    assert other.test_loss != curve.test_loss[-1:]


def test_recipes_make_their_optimizers():
    params = [nn.Parameter(torch.zeros(3))]
    adam, sched = make_optimizer("adam", params)
    assert isinstance(adam, torch.optim.Adam) and sched is None
    assert adam.defaults["lr"] == ADAM_BASELINE["lr"] and adam.defaults["betas"] == (0.9, 0.999)
    sgd, sched = make_optimizer("sgd", params)
    assert sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == SGD_BASELINE["weight_decay"]
    sgd.step()
    for _ in range(12):  # epochs
        sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(cosine_lr(SGD_BASELINE["lr"], 12, SGD_BASELINE["epochs"]))
    _, sched = make_optimizer(GPT_RECIPE, params)  # a recipe without "schedule": the per-epoch cosine
    assert sched is not None
    assert set(BASELINES) == {"adam", "sgd"}
    with pytest.raises(ConfigError, match="unknown baseline optimizer 'lion'"):
        recipe_of("lion")
    with pytest.raises(ConfigError, match="missing"):
        recipe_of({"optimizer": "adam"})
    lopt, sched = make_optimizer("lopt", params)  # the learned optimizer: a named recipe, not a demo baseline
    assert isinstance(lopt, LearnedOptimizer) and sched is None and lopt.param_groups[0]["lr"] == 1.0
    lopt, _ = make_optimizer({**LOPT_BASELINE, "weights": "hand-set", "lr": 0.5}, params)
    assert lopt.rule.name == "hand-set" and lopt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ConfigError, match="takes no weight_decay"):
        recipe_of({**LOPT_BASELINE, "weight_decay": 1e-4})


@pytest.mark.parametrize("recipe", ["sgd", {**LOPT_BASELINE, "weights": "hand-set"}])
def test_a_run_in_stages_equals_one_in_one_go(few_images, recipe):
    task = TwoConv()
    init = _init(task)
    whole = train_baseline(task, init, few_images, recipe, 12, [0, 4, 9, 12], seed=3)
    staged = BaselineRun(task, init, few_images, recipe, seed=3)
    staged.train_to(5, [0, 4, 9, 12])  # 600 examples, batch 128: the first epoch ends in the second stage
    assert staged.t == 5 and staged.curve.steps == [0, 4]
    staged.train_to(12, [0, 4, 9, 12])
    assert staged.curve.steps == whole.steps and staged.curve.test_loss == whole.test_loss
    assert staged.train_to(12, [12]).steps == whole.steps  # nothing left to train or measure
    assert staged.curve.seconds_per_step > 0 and staged.curve.wall_s[-1] >= staged.curve.wall_s[1]


def test_a_run_whose_parameters_turn_non_finite_stops_as_diverged(few_images):
    task = TwoConv()
    curve = train_baseline(task, _init(task), few_images, {**SGD_BASELINE, "lr": 1e30}, 12, [0, 4, 8, 12], seed=0)
    assert curve.diverged_at == 4 and curve.steps == [0, 4, 8, 12]
    assert math.isfinite(curve.test_loss[0]) and all(math.isnan(v) for v in curve.test_loss[1:])
    assert math.isnan(curve.wall_s[-1]) and curve.seconds_per_step > 0


def test_a_wrapped_optimizer_that_diverges_stops_the_run(few_images):
    task = TwoConv()

    class Diverging(torch.optim.Optimizer):
        def __init__(self, base):
            self.base = base
            super().__init__(base.param_groups, {})
            self.steps = 0

        def step(self, closure=None):
            self.steps += 1
            if self.steps == 3:
                raise GenerationError("the metric closure returned nan")
            self.base.step()

    curve = train_baseline(task, _init(task), few_images, "sgd", 10, [0, 2, 5, 10], seed=0,
                           wrap=lambda model, base: Diverging(base(model.parameters())))
    assert curve.diverged_at == 3 and curve.steps == [0, 2, 5, 10]
    assert math.isfinite(curve.test_loss[1]) and all(math.isnan(v) for v in curve.test_loss[2:])
