"""Faults thrown at GptOptimizer on purpose: interrupts, grad mode, threads, bad states and inputs.

Every exit path of an update must leave θ as it was (or θ′ when accepted), and a state that
cannot be loaded must change nothing.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from gpt_helpers import FnGenerator, assert_same, snapshot, tiny_generator, toy_loss, toy_model

from learned_opt.errors import ConfigError, GenerationError, OptimizerStateError
from learned_opt.optimizer import GptOptimizer


def _warm(model, opt, steps: int = 2) -> None:
    for _ in range(steps):
        opt.zero_grad()
        toy_loss(model).backward()
        opt.step()


def _interrupting(model, exc: type[BaseException]):
    """A metric closure that measures θ once, then raises ``exc`` while it measures θ′."""
    calls = []

    def closure():
        calls.append(1)
        if len(calls) > 1:
            raise exc()
        return toy_loss(model)

    return closure


# ---------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("candidates", [1, 4])
def test_interrupt_in_the_closure_restores_theta_counts_and_reraises(exc, candidates):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2, candidates=candidates)
    _warm(model, opt)
    before = snapshot(model, opt)
    with pytest.raises(exc):
        opt.generate(_interrupting(model, exc))
    assert_same(snapshot(model, opt), before)
    c = opt.counters
    assert c["attempted"] == 1 and c["rejected"] == 1 and c["accepted"] == c["failed"] == 0


def test_interrupt_in_a_periodic_update_restores_theta():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2, every=1,
                       metric_closure=_interrupting(model, KeyboardInterrupt))
    reference = toy_model()  # the same base step without the update
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        toy_loss(m).backward()
    ref_opt.step()
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert opt.counters["steps"] == 1 and opt.counters["rejected"] == 1


def test_closure_that_switches_grad_mode_on_still_restores():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.5), lr=1e-2)
    _warm(model, opt)
    before = snapshot(model, opt)
    calls = []

    def closure():
        calls.append(1)
        torch.set_grad_enabled(True)  # leaks grad mode on, as careless evaluation code does
        return toy_loss(model) + (10.0 if len(calls) > 1 else 0.0)  # θ′ is worse: rejected

    report = opt.generate(closure)
    assert not report.accepted and not report.failed
    assert_same(snapshot(model, opt), before)
    assert torch.is_grad_enabled()  # the caller's mode (on, outside generate) is back


# ---------------------------------------------------------------------- threads


def test_two_threads_with_rejecting_closures_leave_parameters_unchanged():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.3), lr=1e-2)
    before = snapshot(model)
    base = float(toy_loss(model).detach())
    barrier = threading.Barrier(2)
    errors = []

    def closure():
        # θ′ is worse than θ, so every update is rejected; the sleep widens the race window
        value = float(toy_loss(model).detach())
        threading.Event().wait(0.002)
        return value if abs(value - base) < 1e-9 else value + 1.0

    def worker():
        try:
            barrier.wait()
            for _ in range(15):
                opt.generate(closure)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_same(snapshot(model), before)
    assert opt.counters["rejected"] == 30


def test_the_lock_survives_deepcopy_and_pickle():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), tiny_generator(), lr=1e-2, sampling_steps=2)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied._lock is not opt._lock
        copied.generate(metric=1.0)
        assert copied.counters["attempted"] == 1


def test_an_optimizer_pickled_before_keep_if_met_unpickles_without_it():
    opt = GptOptimizer(toy_model().parameters(), tiny_generator(), lr=1e-2, sampling_steps=2)
    del opt.keep_if_met, opt.counters["kept"], opt._shapes  # what such a pickle holds
    old = pickle.loads(pickle.dumps(opt))
    assert old.keep_if_met is False and old.counters["kept"] == 0
    assert not old.generate(metric=0.0).kept and "kept=" in repr(old)  # the best prompt is met; it samples


# ---------------------------------------------------------------------- bad input


def test_metric_beyond_float32_is_bad_input_not_a_generator_failure():
    model = toy_model()
    gen = FnGenerator(lambda th: th + 0.01)
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    before = snapshot(model, opt)
    with pytest.raises(GenerationError, match="float32"):
        opt.generate(metric=1e308)
    assert_same(snapshot(model, opt), before)
    assert gen.calls == 0 and opt.counters["attempted"] == opt.counters["failed"] == 0


@pytest.mark.parametrize(
    "prompt",
    ["abc", lambda m: None, lambda m: torch.ones(3), lambda m: "x", lambda m: float("nan")],
    ids=["string", "callable-none", "callable-vector", "callable-string", "callable-nan"],
)
def test_bad_prompt_at_generate_raises_before_anything_happens(prompt):
    model = toy_model()
    gen = FnGenerator(lambda th: th + 0.01)
    opt = GptOptimizer(model.parameters(), gen, lr=1e-2)
    before = snapshot(model, opt)
    with pytest.raises(GenerationError, match="prompt"):
        opt.generate(metric=1.0, prompt=prompt)
    assert_same(snapshot(model, opt), before)
    assert gen.calls == 0 and opt.counters["attempted"] == 0


@pytest.mark.parametrize("prompt", [float("nan"), float("inf"), "abc", True])
def test_bad_prompt_at_construction_is_a_config_error(prompt):
    with pytest.raises(ConfigError, match="Invalid prompt"):
        GptOptimizer(toy_model().parameters(), FnGenerator(lambda th: th), prompt=prompt)


# ---------------------------------------------------------------------- load_state_dict


def _trained_pair():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2, seed=3)
    _warm(model, opt, 3)
    opt.generate(metric=1.0)
    return model, opt


def _fresh():
    model = toy_model(seed=5)
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=0.5, seed=9)
    _warm(model, opt, 1)
    return model, opt


def _set(sd, path, value):
    target = sd
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    "path, value",
    [
        (("gpt", "rng_state"), None),
        (("gpt", "rng_state"), _DELETE),
        (("gpt", "rng_state"), torch.zeros(7, dtype=torch.uint8)),
        (("gpt", "rng_state"), torch.zeros(5056, dtype=torch.float32)),
        (("gpt", "rng_state"), "abc"),
        (("gpt", "counters", "steps"), -1),
        (("gpt", "counters", "accepted"), 1.5),
        (("gpt", "counters"), None),
        (("gpt",), 5),
        (("state", 0, "exp_avg"), torch.zeros(3, 3)),
        (("state", 1, "exp_avg_sq"), torch.zeros(7)),
        (("state", 0, "exp_avg"), torch.zeros(1, 8)),  # broadcasts to fc1.weight [6, 8], yet Adam's step would fail
        (("param_groups", 0, "betas"), _DELETE),  # torch would load the group without it, and Adam's step fail
        (("param_groups",), []),
        (("state", 0, "step"), _DELETE),  # passes the checks, fails inside torch's load: rolled back
        (("param_groups", 0, "lr"), "1e-3"),
        (("param_groups", 0, "betas"), (0.9,)),
        (("param_groups", 0, "amsgrad"), 1),
        (("param_groups", 0, "weight_decay"), float("nan")),
        # each loads in torch, then breaks or poisons the next step: refused by a step on a copy
        (("state", 0, "exp_avg"), torch.full((6, 8), float("nan"))),
        (("state", 0, "exp_avg_sq"), torch.full((6, 8), -1.0)),
        (("state", 0, "exp_avg_sq"), _DELETE),
        (("state", 0, "exp_avg"), [1.0, 2.0, 3.0]),
        (("state", 0, "step"), torch.tensor(-5.0)),
        (("param_groups", 0, "amsgrad"), True),  # no max_exp_avg_sq in the state
        (("param_groups", 0, "params"), ["a", "b", "c", "d"]),  # torch would drop every moment
        (("state", 0), 3),
    ],
    ids=["rng-none", "rng-missing", "rng-short", "rng-float", "rng-string", "negative-steps", "float-counter",
         "counters-none", "gpt-int", "exp-avg-shape", "exp-avg-sq-shape", "exp-avg-broadcast", "betas-missing",
         "no-groups", "step-missing",
         "lr-string", "betas-short", "flag-int", "weight-decay-nan",
         "exp-avg-nan", "exp-avg-sq-negative", "exp-avg-sq-missing", "exp-avg-list", "step-negative",
         "amsgrad-without-its-state", "unknown-param-ids", "entry-int"],
)
def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(path, value):
    _, source = _trained_pair()
    sd = source.state_dict()
    _set(sd, path, value)
    model, opt = _fresh()
    before = snapshot(model, opt)
    counters, rng = dict(opt.counters), opt._rng.get_state()
    with pytest.raises(OptimizerStateError, match="nothing was changed|not a GptOptimizer|cannot load"):
        opt.load_state_dict(sd)
    assert_same(snapshot(model, opt), before)
    assert opt.counters == counters and torch.equal(opt._rng.get_state(), rng)
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state  # still shared
    _warm(model, opt, 1)  # and it still steps


@pytest.mark.parametrize("state", [None, [1, 2], "state"])
def test_load_state_dict_of_something_else_than_a_mapping_is_refused(state):
    model, opt = _fresh()
    before = snapshot(model, opt)
    with pytest.raises(OptimizerStateError, match="not the mapping state_dict"):
        opt.load_state_dict(state)
    assert_same(snapshot(model, opt), before)


def test_load_state_dict_still_loads_a_good_state():
    _, source = _trained_pair()
    model, opt = _fresh()
    opt.load_state_dict(source.state_dict())
    assert opt.counters == source.counters and opt.param_groups[0]["lr"] == 1e-2
    assert torch.equal(opt._rng.get_state(), source._rng.get_state())


def test_load_state_dict_takes_a_group_without_a_setting_its_base_fills_in():
    _, source = _trained_pair()
    sd = source.state_dict()
    del sd["param_groups"][0]["amsgrad"]  # as older releases saved Adam: its __setstate__ sets False
    model, opt = _fresh()
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["amsgrad"] is False
    _warm(model, opt, 1)


@pytest.mark.parametrize("base, kwargs", [(torch.optim.LBFGS, dict(lr=0.1, max_iter=3)), (torch.optim.Adafactor, {})])
def test_load_state_dict_round_trips_bases_with_flat_or_factored_state(base, kwargs):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), base=base, **kwargs)

    def closure():
        opt.zero_grad()
        loss = toy_loss(model)
        loss.backward()
        return loss

    opt.step(closure)  # LBFGS keeps whole-model vectors, Adafactor row and column statistics
    state = opt.state_dict()
    opt.load_state_dict(state)
    opt.step(closure)


def test_an_rng_state_of_another_kind_of_device_says_what_to_do():
    _, source = _trained_pair()
    sd = source.state_dict()
    sd["gpt"]["rng_state"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    _, opt = _fresh()
    with pytest.raises(OptimizerStateError, match="another kind of device") as info:
        opt.load_state_dict(sd)
    assert "delete state_dict['gpt']" in str(info.value)


# ---------------------------------------------------------------------- edges found by review


def test_parameters_moved_after_the_optimizer_was_built_are_told_to_build_it_after():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    # Module.to(...) moves parameters in place where it can: the sampler's RNG stays where they were.
    # Without a second device here, the RNG stands for one built on another kind of device.
    opt._rng = type("CudaRng", (), {"device": torch.device("cuda")})()
    before = snapshot(model)
    with pytest.raises(GenerationError, match="build the optimizer after moving the model"):
        opt.generate(metric=1.0)
    assert opt.counters["attempted"] == 0
    assert_same(snapshot(model), before)


def test_an_interrupt_while_sampling_counts_the_update_as_failed_and_leaves_theta():
    model = toy_model()

    def interrupted(theta):
        raise KeyboardInterrupt

    opt = GptOptimizer(model.parameters(), FnGenerator(interrupted), lr=1e-2)
    _warm(model, opt)
    before = snapshot(model, opt)
    with pytest.raises(KeyboardInterrupt):
        opt.generate(metric=1.0)
    assert_same(snapshot(model, opt), before)
    c = opt.counters
    assert c["attempted"] == 1 and c["failed"] == 1 and c["accepted"] == c["rejected"] == c["kept"] == 0


def test_a_sample_that_overflows_half_precision_fails_and_leaves_theta():
    model = toy_model().half()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th.float() + 1e5), lr=1e-2, max_update_ratio=float("inf"))
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="overflow"):
        report = opt.generate(metric=1.0)
    assert report.failed and not report.accepted and "torch.float16" in report.reason
    assert_same(snapshot(model), before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_sample_that_overflows_one_half_precision_parameter_of_a_mixed_model_fails():
    model = toy_model()
    model.fc1.bias.data = model.fc1.bias.data.half()  # θ flattens to float32; one parameter is float16
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 1e5), lr=1e-2, max_update_ratio=float("inf"))
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="overflow a torch.float16 parameter"):
        assert opt.generate(metric=1.0).failed
    assert_same(snapshot(model), before)


def _round_trip(make, steps: int = 2):
    model = toy_model()
    opt = make(model)
    _warm(model, opt, steps)
    return model, opt, opt.state_dict()


@pytest.mark.parametrize("make_saved, make_loading", [
    (lambda m: GptOptimizer(m.named_parameters(), tiny_generator(), lr=1e-2),) * 2,
    (lambda m: GptOptimizer(m.parameters(), tiny_generator(), base=torch.optim.Adafactor, lr=1e-2),) * 2,
    (lambda m: GptOptimizer(m.parameters(), tiny_generator(), lr=1e-2),
     lambda m: GptOptimizer(m.parameters(), tiny_generator(), lr=1e-2, foreach=True)),
    (lambda m: GptOptimizer(m.parameters(), tiny_generator(), base=torch.optim.SGD, lr=1e-2, momentum=0.9),
     lambda m: GptOptimizer(m.parameters(), tiny_generator(), base=torch.optim.SGD, lr=0.5, momentum=0.9,
                            nesterov=True)),
], ids=["named-parameters", "adafactor", "foreach-none-to-true", "sgd-nesterov"])
def test_valid_states_of_torch_optimizers_still_load(make_saved, make_loading):
    _, _, sd = _round_trip(make_saved)
    model = toy_model(seed=5)
    opt = make_loading(model)
    opt.load_state_dict(sd)
    assert opt.param_groups is opt.base.param_groups and opt.param_groups[0]["lr"] == 1e-2
    _warm(model, opt, 1)


def test_the_closure_leaves_the_same_gradient_tensors_with_the_same_values():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    toy_loss(model).backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]

    def loss_closure():  # torch's usual closure: zeroes and refills the gradients
        opt.zero_grad(set_to_none=False)
        loss = toy_loss(model)
        loss.backward()
        return loss

    opt.generate(loss_closure)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(g, v) for g, v in zip(grads, values))


def test_adding_a_param_group_is_refused_with_what_to_do():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    groups = len(opt.param_groups)
    with pytest.raises(ConfigError, match="build a new GptOptimizer"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == len(opt.base.param_groups) == groups


@pytest.mark.parametrize("kwargs, match", [(dict(lr="x"), "base optimizer Adam could not be built with these "
                                                          "parameters and lr='x': '<=' not supported"),
                                           (dict(betas="ab"), "and betas='ab'"),
                                           (dict(lr=-1.0), "and lr=-1.0: Invalid learning rate")])
def test_options_the_base_refuses_are_a_config_error_naming_them(kwargs, match):
    model = toy_model()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), **kwargs)
    assert_same(snapshot(model), before)


def test_a_group_added_through_the_base_is_refused_at_the_next_update_with_params_untouched():
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    extra = torch.nn.Parameter(torch.ones(3))
    opt.base.add_param_group({"params": [extra]})
    before = [p.detach().clone() for p in opt.params]
    with pytest.raises(GenerationError, match="parameters changed after it was built.*build a new GptOptimizer"):
        opt.generate(metric=1.0)
    assert all(torch.equal(p, b) for p, b in zip(opt.params, before))


@pytest.mark.parametrize("params, match", [([{"lr": 1e-3}], "no 'params' entry")])
def test_a_group_without_params_is_a_config_error(params, match):
    with pytest.raises(ConfigError, match=match):
        GptOptimizer(params, FnGenerator(lambda th: th + 0.01))


@pytest.mark.parametrize("step_size", [[[1]], [{}], "ab"])
def test_a_step_size_that_is_not_numbers_is_a_config_error(step_size):
    with pytest.raises(ConfigError, match="Invalid step_size"):
        GptOptimizer(toy_model().parameters(), FnGenerator(lambda th: th + 0.01), step_size=step_size)


def test_parameters_on_the_meta_device_are_refused_and_the_generator_is_left_where_it_was():
    gen = tiny_generator()
    with pytest.raises(ConfigError, match="meta device"):
        GptOptimizer(toy_model().to("meta").parameters(), gen)
    assert gen.device.type == "cpu"
    model = toy_model()
    GptOptimizer(model.parameters(), gen).generate(metric=1.0)  # still a working generator


@pytest.mark.parametrize("raise_on_call", [1, 2])
def test_a_closure_that_changes_the_weights_in_place_changes_nothing(raise_on_call):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    _warm(model, opt)
    before = snapshot(model, opt)
    calls = []

    def meddling():
        calls.append(1)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        if len(calls) == raise_on_call:
            raise ValueError("broken on purpose")
        return toy_loss(model)

    if raise_on_call == 1:
        with pytest.raises(ValueError, match="on purpose"):
            opt.generate(meddling)
    else:  # the update's check fails: rejected
        assert not opt.generate(meddling).accepted
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("kwargs", [{"guard": "no"}, {"guard": 1}, {"keep_if_met": "yes"}, {"keep_if_met": None}])
def test_flags_take_only_true_or_false(kwargs):
    with pytest.raises(ConfigError, match="must be True or False"):
        GptOptimizer(toy_model().parameters(), tiny_generator(), **kwargs)


@pytest.mark.parametrize("value", [True, torch.tensor(True), torch.zeros((), device="meta")])
def test_a_metric_that_is_a_flag_or_holds_no_value_is_refused_before_anything_happens(value):
    model = toy_model()
    opt = GptOptimizer(model.parameters(), FnGenerator(lambda th: th + 0.01), lr=1e-2)
    before = snapshot(model, opt)
    with pytest.raises(GenerationError, match="return the"):
        opt.generate(lambda: value)
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_parameters_that_are_not_real_floating_point_are_refused(dtype):
    params = [p.detach().to(dtype) for p in toy_model().parameters()]
    with pytest.raises(ConfigError, match="real floating-point parameters"):
        GptOptimizer(params, tiny_generator())


def test_a_tensor_that_is_not_a_leaf_is_refused_with_what_to_do():
    named = list(toy_model().named_parameters())
    name, first = named[0]
    with pytest.raises(ConfigError, match=f"{name} .* is computed from other tensors.*model.parameters"):
        GptOptimizer([(name, first * 2), *named[1:]], tiny_generator())


def test_a_broadcast_parameter_is_refused_with_what_to_do():
    model = toy_model()
    named = list(model.named_parameters())
    name, first = named[0]
    shared = torch.zeros(first.shape[-1]).expand(first.shape)  # stride 0: one row for all
    with pytest.raises(ConfigError, match=f"{name} .* is a broadcast view .*nn.Parameter\\(t.clone\\(\\)\\)"):
        GptOptimizer([(name, shared), *named[1:]], tiny_generator())
