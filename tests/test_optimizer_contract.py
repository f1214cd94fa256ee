"""GptOptimizer as a torch.optim.Optimizer: construction, base-optimizer equivalence, state, copies."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from gpt_helpers import assert_same, snapshot, tiny_generator, toy_loss, toy_model
from torch import nn

from learned_opt.errors import ArchitectureMismatchError, ConfigError, OptimizerStateError, WeightsError
from learned_opt.optimizer import GptOptimizer
from learned_opt.tasks import MLP


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def _train(model, opt, steps: int, *, scheduler=None, data=None) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = toy_loss(model, data)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------- construction tables


def _valid_configs(model):
    named = list(model.named_parameters())
    p = list(model.parameters())
    return {
        "defaults": dict(params=model.parameters()),
        "named": dict(params=model.named_parameters()),
        "groups": dict(params=[{"params": p[:2], "lr": 1e-2}, {"params": p[2:], "weight_decay": 0.1}]),
        "named groups": dict(params=[{"params": named[:2]}, {"params": named[2:]}]),
        "sgd": dict(params=p, base=torch.optim.SGD, lr=0.1, momentum=0.9),
        "periodic": dict(params=p, every=5, metric_closure=lambda: 1.0, prompt=lambda m: m / 2),
        "prompt": dict(params=p, prompt=0.5, sampling_steps=3, seed=7, guard=False),
    }


@pytest.mark.parametrize("name", ["defaults", "named", "groups", "named groups", "sgd", "periodic", "prompt"])
def test_valid_configurations(gen, name):
    model = toy_model()
    opt = GptOptimizer(generator=gen, **_valid_configs(model)[name])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    assert [id(p) for p in opt.params] == [id(p) for p in model.parameters()]
    _train(model, opt, 2)


# (id, kwargs for the model's parameter list p, error, message); every entry is run.
INVALID = [
    ("negative lr", lambda p: dict(params=p, lr=-1.0), ValueError, "learning rate"),
    ("every=0", lambda p: dict(params=p, every=0, metric_closure=lambda: 1.0), ConfigError, "Invalid every"),
    ("every<0", lambda p: dict(params=p, every=-3, metric_closure=lambda: 1.0), ConfigError, "Invalid every"),
    ("every float", lambda p: dict(params=p, every=1.5, metric_closure=lambda: 1.0), ConfigError, "Invalid every"),
    ("every bool", lambda p: dict(params=p, every=True, metric_closure=lambda: 1.0), ConfigError, "Invalid every"),
    ("every without closure", lambda p: dict(params=p, every=10), ConfigError, "needs metric_closure"),
    ("sampling_steps=0", lambda p: dict(params=p, sampling_steps=0), ConfigError, "sampling_steps"),
    ("unknown sampler", lambda p: dict(params=p, sampling_method="euler"), ConfigError, "sampling_method"),
    ("t_min<0", lambda p: dict(params=p, sampling_t_min=-1), ConfigError, "sampling_t_min"),
    ("t_min too late", lambda p: dict(params=p, sampling_t_min=10**6), ConfigError, "does not fit"),
    ("too many steps after t_min", lambda p: dict(params=p, sampling_steps=900, sampling_t_min=500), ConfigError,
     "does not fit"),
    ("one step with t_min", lambda p: dict(params=p, sampling_steps=1, sampling_t_min=30), ConfigError, "one step"),
    ("candidates=0", lambda p: dict(params=p, candidates=0), ConfigError, "Invalid candidates"),
    ("candidates float", lambda p: dict(params=p, candidates=2.0), ConfigError, "Invalid candidates"),
    ("seed str", lambda p: dict(params=p, seed="0"), ConfigError, "seed"),
    ("seed negative", lambda p: dict(params=p, seed=-1), ConfigError, "Invalid seed"),
    ("seed too large", lambda p: dict(params=p, seed=2**64), ConfigError, "Invalid seed"),
    ("set of params", lambda p: dict(params=set(p)), ConfigError, "a set has no order"),
    ("group of a set", lambda p: dict(params=[{"params": set(p)}]), ConfigError, "a set has no order"),
    ("option typo", lambda p: dict(params=p, sampling_step=5), ConfigError, "did you mean 'sampling_steps'"),
    ("base option typo", lambda p: dict(params=p, weight_decai=0.1), ConfigError, "did you mean 'weight_decay'"),
    ("prompt str", lambda p: dict(params=p, prompt="low"), ConfigError, "prompt"),
    ("max_update_ratio=0", lambda p: dict(params=p, max_update_ratio=0), ConfigError, "max_update_ratio"),
    ("single tensor", lambda p: dict(params=p[0]), ConfigError, "single tensor"),
    ("empty", lambda p: dict(params=[]), ConfigError, "empty"),
    ("duplicate", lambda p: dict(params=p + p[:1]), ConfigError, "listed twice"),
    ("unknown name", lambda p: dict(params=p, generator="no-such-generator"), WeightsError, "unknown generator"),
    ("missing file", lambda p: dict(params=p, generator="/nowhere/gen.json"), WeightsError, "no generator manifest"),
]


@pytest.mark.parametrize("make, error, message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_configurations_raise_clear_errors(gen, make, error, message):
    model = toy_model()
    kwargs = make(list(model.parameters()))
    kwargs.setdefault("generator", gen)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        GptOptimizer(**kwargs)
    assert_same(snapshot(model), before)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MLP((8, 7, 3)).parameters(), "parameter #0 has shape \\[7, 8\\] where the generator's fc1.weight has \\[6, 8\\]"),
        (lambda: list(toy_model().parameters())[:-1], "missing a parameter like the generator's fc2.bias"),
        (lambda: [*toy_model().parameters(), nn.Parameter(torch.zeros(2))], "is beyond the generator's 4 parameters"),
        (lambda: list(toy_model().parameters())[::-1], "parameter #0 has shape \\[3\\] where the generator's fc1.weight"),
        (lambda: list(toy_model().named_parameters())[::-1], "fc2.bias has shape \\[3\\] where the generator's fc1.weight"),
        (lambda: [(f"conv{i}.weight", p) for i, p in enumerate(MLP((8, 7, 3)).parameters())], "conv0.weight has shape"),
    ],
    ids=["width", "missing", "extra", "order", "named order", "the user's names"],
)
def test_architecture_mismatch_fails_before_touching_anything(gen, make, message):
    params = list(make())
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(ArchitectureMismatchError, match=message):
        GptOptimizer(params, gen)
    assert all(torch.equal(t, b) and t.grad is None for t, b in zip(tensors, before))


def test_the_mismatch_error_says_what_to_do_with_the_generators_own_shapes(gen):
    weights = [p for n, p in toy_model().named_parameters() if n.endswith("weight")]
    biases = [p for n, p in toy_model().named_parameters() if n.endswith("bias")]
    with pytest.raises(ArchitectureMismatchError, match="in another order: pass them in the model's order"):
        GptOptimizer([{"params": weights}, {"params": biases, "weight_decay": 0.0}], gen)  # the usual split
    with pytest.raises(ArchitectureMismatchError, match="some of its parameters are missing") as info:
        GptOptimizer(weights, gen)
    assert "learned-opt corpus" not in str(info.value)  # not a new architecture: no advice to train for it


def test_names_are_labels_shapes_in_order_are_the_architecture(gen):
    sequential = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))  # "0.weight", ... vs "fc1.weight"
    GptOptimizer(sequential.named_parameters(), gen)
    GptOptimizer([(f"x.{n}", p) for n, p in toy_model().named_parameters()], gen)


def test_the_mismatch_error_says_how_to_make_a_generator(gen):
    with pytest.raises(ArchitectureMismatchError) as info:
        GptOptimizer(MLP((8, 7, 3)).parameters(), gen)
    message = str(info.value)
    assert "learned-opt corpus --task" in message and "learned-opt train --store" in message
    assert "docs/your-own-model.md" in message


def test_wrapped_model_names_are_accepted(gen):
    wrapped = nn.Module()
    wrapped.module = toy_model()
    GptOptimizer(wrapped.named_parameters(), gen)


# ---------------------------------------------------------------------- equals the base optimizer


@pytest.mark.parametrize(
    "base, kwargs",
    [(torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)), (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
     (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True))],
    ids=["adam", "sgd", "adamw"],
)
def test_bit_identical_to_base_without_generative_updates(gen, base, kwargs):
    a, b = toy_model(), toy_model()
    opt_a = GptOptimizer(a.parameters(), gen, base=base, **kwargs)
    opt_b = base(b.parameters(), **kwargs)
    _train(a, opt_a, 15)
    _train(b, opt_b, 15)
    assert_same(snapshot(a, opt_a), snapshot(b, opt_b))


def test_param_groups_grad_none_zero_and_frozen_like_base(gen):
    def build():
        m = toy_model()
        m.fc2.bias.requires_grad_(False)  # frozen: never gets a grad
        groups = [
            {"params": [m.fc1.weight, m.fc1.bias], "lr": 3e-2, "weight_decay": 0.1},
            {"params": [m.fc2.weight, m.fc2.bias], "lr": 1e-3},
        ]
        return m, groups

    (a, ga), (b, gb) = build(), build()
    opt_a, opt_b = GptOptimizer(ga, gen, lr=1e-2), torch.optim.Adam(gb, lr=1e-2)
    for step in range(6):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            toy_loss(m).backward()
            if step % 2:
                m.fc1.bias.grad.zero_()  # zero gradients
            if step == 3:
                m.fc2.weight.grad = None  # grad None for one step
            opt.step()
    assert_same(snapshot(a, opt_a), snapshot(b, opt_b))
    assert opt_a.param_groups[0]["lr"] == 3e-2 and opt_a.param_groups[1]["weight_decay"] == 0.0


def test_loss_decreases_with_lr_scheduler(gen):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=3e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    losses = _train(model, opt, 30, scheduler=sched)
    assert losses[-1] < 0.8 * losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-2 / 8)
    assert opt.base.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_closure_step_hooks_and_zero_grad(gen):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = toy_loss(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and calls == ["pre", "post"] and opt.counters["steps"] == 1
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_global_step_hooks_run_once_per_step(gen):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__))),
    ]
    try:
        toy_loss(model).backward()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == [("pre", "GptOptimizer"), ("post", "GptOptimizer")]


def test_grad_scaler_skipped_step_changes_nothing(gen):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for poison in (False, True):
        opt.zero_grad()
        scaler.scale(toy_loss(model)).backward()
        if poison:
            model.fc1.weight.grad[0, 0] = float("inf")
            before = snapshot(model, opt)
            counters = dict(opt.counters)
        scaler.step(opt)
        scaler.update()
    after = snapshot(model, opt)
    after["grads"], before["grads"] = [], []  # unscale_ legitimately divides the grads
    assert_same(after, before)
    assert opt.counters == counters and counters["steps"] == 1
    assert scaler.get_scale() == 2.0**3


# ---------------------------------------------------------------------- state, copies, repr


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_resumes_exactly_and_input_is_not_mutated(gen):
    straight = toy_model()
    opt = GptOptimizer(straight.parameters(), gen, lr=1e-2)
    _train(straight, opt, 10)

    first = toy_model()
    opt1 = GptOptimizer(first.parameters(), gen, lr=1e-2)
    _train(first, opt1, 5)
    sd = _roundtrip(opt1.state_dict())
    assert sd["gpt"]["rng_state"].dtype == torch.uint8 and "model" not in str(sd["gpt"].keys())
    pristine = copy.deepcopy(sd)
    resumed = toy_model()
    resumed.load_state_dict(first.state_dict())
    opt2 = GptOptimizer(resumed.parameters(), gen, lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base.param_groups and opt2.state is opt2.base.state
    _train(resumed, opt2, 5)
    assert_same(snapshot(resumed, opt2), snapshot(straight, opt))
    assert opt2.counters == opt.counters
    assert_same(sd, pristine)


def test_load_state_from_other_generator_is_refused(gen):
    model = toy_model()
    sd = GptOptimizer(model.parameters(), tiny_generator(perturb=0.1, name="other"), lr=1e-2).state_dict()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    before = opt.state_dict()
    with pytest.raises(OptimizerStateError, match="saved with generator 'other'"):
        opt.load_state_dict(sd)
    assert_same(opt.state_dict(), before)


def test_plain_base_state_loads_with_zero_counters(gen):
    a, b = toy_model(), toy_model()
    adam = torch.optim.Adam(a.parameters(), lr=1e-2)
    _train(a, adam, 3)
    opt = GptOptimizer(b.parameters(), gen, lr=1e-2)
    opt.load_state_dict(adam.state_dict())
    assert opt.counters["steps"] == 0 and len(opt.state) == 4


def test_plain_base_state_reseeds_the_private_rng(gen):
    a, b = toy_model(), toy_model()
    adam = torch.optim.Adam(a.parameters(), lr=1e-2)
    _train(a, adam, 3)
    opt = GptOptimizer(b.parameters(), tiny_generator(perturb=0.05), lr=1e-2, seed=4, sampling_steps=2)
    fresh = opt._rng.get_state()
    opt.generate(metric=1.0)  # advances the private RNG
    assert not torch.equal(opt._rng.get_state(), fresh)
    opt.load_state_dict(adam.state_dict())
    assert torch.equal(opt._rng.get_state(), fresh)


def test_load_state_dict_runs_hooks_registered_on_the_optimizer(gen):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    _train(model, opt, 2)
    sd = opt.state_dict()
    pristine = copy.deepcopy(sd)
    calls = []

    def pre(optimizer, state_dict):
        calls.append(("pre", optimizer, "gpt" in state_dict))
        changed = copy.deepcopy(state_dict)
        changed["param_groups"][0]["lr"] = 0.5
        changed["gpt"]["counters"]["steps"] = 41
        return changed

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o, o.counters["steps"])))
    opt.load_state_dict(sd)
    assert calls == [("pre", opt, True), ("post", opt, 41)]
    assert opt.param_groups[0]["lr"] == 0.5 and opt.counters["steps"] == 41
    assert opt.param_groups is opt.base.param_groups
    assert_same(sd, pristine)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_a_working_optimizer(gen, how):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2, seed=3, sampling_steps=4)
    _train(model, opt, 2)
    clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert clone.param_groups is clone.base.param_groups and clone.state is clone.base.state
    assert clone.counters == opt.counters and torch.equal(clone._rng.get_state(), opt._rng.get_state())
    params = clone.params
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    clone.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert clone.generate(metric=1.0).accepted


def test_repr_is_informative(gen):
    text = repr(GptOptimizer(toy_model().parameters(), gen, lr=1e-2, every=4, metric_closure=lambda: 1.0))
    for part in ("GptOptimizer", "Adam", "toy-tiny", "every=4", "loss", "accepted/rejected/failed/kept=0/0/0/0"):
        assert part in text



def test_a_scheduler_built_on_the_base_still_sees_its_steps(gen):
    # An instance patch on opt.base (as LR schedulers make) must still run.
    import warnings

    model = toy_model()
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt.base, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        toy_loss(model).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
