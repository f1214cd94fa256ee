"""LearnedOptimizer's optimizer contract (docs TESTING.md items 1-4, 6-8, 11) and its functional core."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from learned_opt import LearnedOptimizer
from learned_opt.errors import ConfigError, LearnedOptError, NonFiniteStepError, OptimizerStateError, WeightsError
from learned_opt.lopt import hand_set_theta, init_state, update

THETA = hand_set_theta(noise=0.05)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return model, lambda: ((model(x) - y) ** 2).mean()


def _train(model, loss_fn, opt, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return float(loss_fn().detach())


@pytest.mark.parametrize("lr", [1.0, 0.5, 0, 3])
def test_valid_configs(lr):
    model, _ = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA, lr=lr)
    assert opt.param_groups[0]["lr"] == lr and "LearnedOptimizer(" in repr(opt) and "lr=" in repr(opt)


@pytest.mark.parametrize("lr", [np.float32(0.5), torch.tensor(0.5), np.float64(0.5), torch.tensor(1)])
def test_numpy_and_tensor_lrs_are_taken_as_torch_takes_them(lr, tmp_path):
    stepped = []
    for rate in (float(lr), lr):
        model, loss = _problem()
        opt = LearnedOptimizer([{"params": list(model.parameters())[:2]}], weights=THETA, lr=rate)
        opt.add_param_group({"params": list(model.parameters())[2:], "lr": rate})
        loss().backward()
        opt.step()
        stepped.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*stepped))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")  # and the state loads as torch.load's safe mode reads it
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf"), "1", True, torch.tensor([0.5, 1.0]),
                                torch.tensor(float("nan")), np.float32("inf"), torch.tensor(True),
                                torch.tensor(1 + 0j)])
def test_bad_lr(lr):
    model, _ = _problem()
    with pytest.raises(ConfigError, match="Invalid learning rate"):
        LearnedOptimizer(model.parameters(), weights=THETA, lr=lr)


def test_bare_tensor_and_duplicate_and_wrong_weights():
    with pytest.raises(ConfigError, match="empty parameter list: give LearnedOptimizer the model's parameters"):
        LearnedOptimizer([], weights=THETA)
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ConfigError, match="single tensor"):
        LearnedOptimizer(w, weights=THETA)
    with pytest.raises(ConfigError, match="listed twice"):
        LearnedOptimizer([w, w], weights=THETA)
    with pytest.raises(ConfigError, match="listed twice"):
        LearnedOptimizer([{"params": [w]}, {"params": [w]}], weights=THETA)
    with pytest.raises(WeightsError, match="do not match"):
        LearnedOptimizer([w], weights={"w0": torch.zeros(2, 2)})
    with pytest.raises(WeightsError, match="NaN"):
        LearnedOptimizer([w], weights={k: v * float("nan") for k, v in THETA.items()})
    with pytest.raises(WeightsError, match="cannot load"):
        LearnedOptimizer([w], weights=3)
    with pytest.raises(LearnedOptError, match="meta-train"):
        LearnedOptimizer([w], weights="not-shipped-name")


def test_named_parameters_train_as_the_plain_ones():
    (model, loss_fn), (twin, twin_loss) = _problem(), _problem()  # the same network and data twice
    named = LearnedOptimizer(model.named_parameters(), weights=THETA)
    assert named.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    _train(model, loss_fn, named, 3)
    _train(twin, twin_loss, LearnedOptimizer(twin.parameters(), weights=THETA), 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    with pytest.raises(ConfigError, match="tensors only"):
        LearnedOptimizer([("w", "not a tensor")], weights=THETA)


def test_loss_goes_down_with_a_scheduler():
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA, lr=10.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 50, gamma=0.5)
    before = float(loss_fn().detach())
    after = _train(model, loss_fn, opt, 150, sched)
    assert after < 0.2 * before and opt.param_groups[0]["lr"] == 10.0 * 0.5**3


def test_lr_zero_freezes_and_groups_have_own_lr():
    model, loss_fn = _problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    before = [p.detach().clone() for p in second]
    opt = LearnedOptimizer([{"params": first}, {"params": second, "lr": 0.0}], weights=THETA)
    _train(model, loss_fn, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, second))
    assert not torch.equal(first[0], _problem()[0][0].weight)
    assert [g["step"] for g in opt.param_groups] == [3, 3]


def test_grad_none_untouched_zero_grad_still_steps():
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = LearnedOptimizer([a, b], weights=THETA)
    a.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(b, torch.ones(4)) and b not in opt.state and a in opt.state
    assert torch.isfinite(a).all()


def test_a_parameter_without_gradients_for_a_while_starts_its_own_step_count():
    """Its bias corrections and step features are those of its first step, as Adam's would be."""
    exact = hand_set_theta(noise=0.0)  # the rule that is Adam(1e-3)
    a, b = torch.ones(6, requires_grad=True), torch.ones(6, requires_grad=True)
    opt = LearnedOptimizer([a, b], weights=exact)
    for _ in range(10):
        a.grad = torch.randn(6)
        opt.step()
    b.grad = torch.ones(6)
    opt.step()
    adam = torch.ones(6, requires_grad=True)
    reference = torch.optim.Adam([adam], lr=1e-3, eps=0.0)
    adam.grad = torch.ones(6)
    reference.step()
    torch.testing.assert_close(b.detach(), adam.detach(), rtol=0, atol=1e-5)
    assert (opt.state[a]["step"], opt.state[b]["step"], opt.param_groups[0]["step"]) == (11, 1, 11)


def test_a_state_saved_without_per_parameter_steps_goes_on_from_the_groups_count():
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 3)
    old = copy.deepcopy(opt.state_dict())
    for s in old["state"].values():
        del s["step"]
    _train(model, loss_fn, opt, 2)
    expected = [p.detach().clone() for p in model.parameters()]
    model2, loss2 = _problem()
    opt2 = LearnedOptimizer(model2.parameters(), weights=THETA)
    _train(model2, loss2, opt2, 3)
    opt2.load_state_dict(old)
    _train(model2, loss2, opt2, 2)
    assert all(torch.equal(x, y) for x, y in zip(expected, model2.parameters()))


def test_splitting_parameters_into_groups_changes_no_step():
    one, loss_one = _problem()
    two, loss_two = _problem()
    _train(one, loss_one, LearnedOptimizer(one.parameters(), weights=THETA), 3)
    decay = [p for p in two.parameters() if p.dim() > 1]
    rest = [p for p in two.parameters() if p.dim() <= 1]
    _train(two, loss_two, LearnedOptimizer([{"params": decay}, {"params": rest}], weights=THETA), 3)
    assert all(torch.equal(x, y) for x, y in zip(one.parameters(), two.parameters()))


def test_float64_parameters_are_not_rounded_to_float32():
    p = torch.tensor([1 + 1e-12, 3.0], dtype=torch.float64, requires_grad=True)
    opt = LearnedOptimizer([p], weights=hand_set_theta(noise=0.0), lr=0.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.dtype == torch.float64 and p[0].item() == 1 + 1e-12


def test_complex_parameters_are_refused_untouched():
    p = torch.tensor([1 + 2j, 3 - 1j], requires_grad=True)
    opt = LearnedOptimizer([p], weights=THETA)
    p.grad = torch.ones_like(p)
    with pytest.raises(ConfigError, match="complex parameters.*view_as_real"):
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([1 + 2j, 3 - 1j])) and not opt.state


@pytest.mark.parametrize("param", [torch.zeros(3, dtype=torch.int64), torch.zeros(3, device="meta")])
def test_integer_and_meta_parameters_are_refused_when_given(param):
    with pytest.raises(ConfigError, match="real floating-point tensors with values"):
        LearnedOptimizer([param], weights=THETA)


def test_state_dict_round_trip_equals_uninterrupted(tmp_path):
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 5)
    sd = opt.state_dict()
    snapshot = copy.deepcopy(sd)
    torch.save({"model": model.state_dict(), "opt": sd}, tmp_path / "ck.pt")
    _train(model, loss_fn, opt, 5)
    expected = [p.detach().clone() for p in model.parameters()]

    blob = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2, loss2 = _problem()
    model2.load_state_dict(blob["model"])
    opt2 = LearnedOptimizer(model2.parameters(), weights=THETA)
    opt2.load_state_dict(blob["opt"])
    _train(model2, loss2, opt2, 5)
    assert all(torch.equal(a, b) for a, b in zip(expected, model2.parameters()))
    assert sd.keys() == snapshot.keys() and sd["param_groups"] == snapshot["param_groups"]


def test_a_state_of_strided_tensors_steps_as_its_contiguous_copy():
    """A step writes the momenta in place: a loaded state whose tensors are transposed views (as
    another program may save them) is stored contiguous and steps exactly as its contiguous copy."""
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    strided = copy.deepcopy(sd)
    for s in strided["state"].values():
        s.update({k: t.T.contiguous().T for k, t in s.items() if isinstance(t, torch.Tensor) and t.dim() == 2})
    assert any(not t.is_contiguous() for s in strided["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor))
    stepped = []
    for state in (sd, strided):
        twin, twin_loss = _problem()
        twin.load_state_dict(model.state_dict())
        opt2 = LearnedOptimizer(twin.parameters(), weights=THETA)
        opt2.load_state_dict(state)
        _train(twin, twin_loss, opt2, 2)
        stepped.append([p.detach().clone() for p in twin.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*stepped))


def test_load_state_dict_validates_before_changing():
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 2)
    good = opt.state_dict()
    other = LearnedOptimizer(model.parameters(), weights=hand_set_theta(seed=1))
    with pytest.raises(OptimizerStateError, match="other|weights"):
        other.load_state_dict(good)
    bad = copy.deepcopy(good)
    bad["state"][0]["m1"] = torch.zeros(2)
    with pytest.raises(OptimizerStateError, match="does not fit"):
        opt.load_state_dict(bad)
    with pytest.raises(OptimizerStateError):
        opt.load_state_dict({"state": {}})
    assert opt.state_dict()["param_groups"] == good["param_groups"]


def test_deepcopy_and_pickle_keep_a_working_optimizer():
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 2)
    clone = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    pickle.dump((model, opt), buf)
    unpickled = pickle.loads(buf.getvalue())
    for m2, o2 in (clone, unpickled):
        assert o2.rule.sha256 == opt.rule.sha256
        x = torch.randn(4, 8)
        o2.zero_grad()
        m2(x).pow(2).mean().backward()
        o2.step()
        assert o2.param_groups[0]["step"] == 3


def test_grad_scaler_skips_inf_step():
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(loss_fn()).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(loss_fn()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert all(torch.equal(after["state"][i][k], state["state"][i][k]) for i in state["state"] for k in ("m0", "m3", "v"))


def test_deterministic_and_global_rng_untouched():
    results = []
    for _ in range(2):
        model, loss_fn = _problem()
        opt = LearnedOptimizer(model.parameters(), weights=THETA)
        rng = torch.get_rng_state()
        _train(model, loss_fn, opt, 3)
        assert torch.equal(rng, torch.get_rng_state())
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_optimizer_equals_functional_core():
    model, loss_fn = _problem()
    ref = [p.detach().clone() for p in model.parameters()]
    state = init_state(ref)
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    for step in range(3):
        opt.zero_grad()
        loss_fn().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        ref, state = update(THETA, ref, grads, state, step)
    assert all(torch.allclose(a, b, atol=0, rtol=0) for a, b in zip(ref, model.parameters()))


def test_functional_core_under_vmap():
    pop = 3
    theta = {k: torch.stack([v + 0.01 * i for i in range(pop)]) for k, v in THETA.items()}
    params = (torch.randn(pop, 5, 4), torch.randn(pop, 5))
    grads = (torch.randn(pop, 5, 4), torch.randn(pop, 5))
    one = init_state([p[0] for p in params])
    state = {k: tuple(t.expand(pop, *t.shape).clone() for t in v) for k, v in one.items()}
    new_p, new_s = torch.func.vmap(lambda t, p, g, s: update(t, p, g, s, 7))(theta, params, grads, state)
    for i in range(pop):
        ref_p, ref_s = update({k: v[i] for k, v in theta.items()}, [p[i] for p in params], [g[i] for g in grads],
                              {k: [t[i] for t in v] for k, v in state.items()}, 7)
        assert all(torch.allclose(a[i], b, atol=1e-6) for a, b in zip(new_p, ref_p))
        assert all(torch.allclose(a[i], b, atol=1e-6) for a, b in zip(new_s["m"], ref_s["m"]))


def test_hand_set_rule_is_adam_with_lr_1e_3():
    torch.manual_seed(0)
    p = torch.randn(50)
    ours, adam = p.clone(), p.clone().requires_grad_()
    reference = torch.optim.Adam([adam], lr=1e-3, eps=0.0)
    exact, state = hand_set_theta(noise=0.0), init_state([p])
    for t in range(20):
        g = torch.randn(50) * (1 + t)  # gradients of changing scale
        (ours,), state = update(exact, [ours], [g], state, t)
        adam.grad = g.clone()
        reference.step()
        # 1% of one step: the rule's eps sits inside the square root (it differs where |g| ~ 1e-4)
        torch.testing.assert_close(ours, adam.detach(), rtol=0, atol=1e-5)


def test_update_equals_the_mlp_on_full_feature_vectors():
    from learned_opt.lopt.model import BETA2, BETAS, EXP_MULT, STEP_MULT, features, mlp, step_features, tensor_features

    p, g = torch.randn(6, 5), torch.randn(6, 5)
    state = init_state([p])
    new, _ = update(THETA, [p], [g], state, 42, lr=0.7, num_tensors=9)
    m = torch.stack([(1 - b) * g for b in BETAS])
    v = (1 - BETA2) * g.square()
    scalars = torch.cat([tensor_features(p), step_features(42, 9, p.device)])
    x = torch.cat([features(p, g, m, v, 42), scalars.unsqueeze(1).expand(-1, 30)]).T
    out = mlp(THETA, x)
    expected = p - (out[:, 0] * torch.exp(EXP_MULT * out[:, 1]) * STEP_MULT * 0.7).view(6, 5)
    assert torch.allclose(new[0], expected, atol=1e-7)


def test_as_gpt_optimizer_base_with_state_round_trip():
    from gpt_helpers import tiny_generator, toy_loss, toy_model

    from learned_opt import GptOptimizer

    def make(model):
        return GptOptimizer(model.parameters(), generator=tiny_generator(perturb=0.01), base=LearnedOptimizer,
                            weights=THETA)

    model = toy_model()
    opt = make(model)
    assert opt.generate(metric=1.0).accepted
    for _ in range(2):
        opt.zero_grad()
        toy_loss(model).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2 = copy.deepcopy(model)
    opt2 = make(model2)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        toy_loss(m).backward()
        o.step()
    assert opt2.base.param_groups[0]["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_a_refused_step_changes_nothing_in_any_group():
    model, loss_fn = _problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = LearnedOptimizer([{"params": first}, {"params": second}], weights=THETA)
    loss_fn().backward()
    second[0].grad = second[0].grad.to_sparse()  # a later group's gradient is sparse
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state and [g["step"] for g in opt.param_groups] == [0, 0]


def test_state_round_trip_keeps_float32_momenta_for_bfloat16_parameters():
    model, loss_fn = _problem()
    model = model.to(torch.bfloat16)
    x = torch.randn(16, 8).to(torch.bfloat16)
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, lambda: model(x).float().square().mean(), opt, 2)
    sd = opt.state_dict()
    again = LearnedOptimizer(model.parameters(), weights=THETA)
    again.load_state_dict(sd)
    for p in model.parameters():
        assert again.state[p]["step"] == opt.state[p]["step"] == 2
        for k, v in opt.state[p].items():
            if k != "step":
                assert again.state[p][k].dtype == torch.float32 and torch.equal(again.state[p][k], v), k


@pytest.mark.parametrize("mangle", [lambda sd: sd["state"].__setitem__(0, 5),
                                    lambda sd: sd["param_groups"].__setitem__(0, "x"),
                                    lambda sd: sd.__setitem__("state", [])])
def test_load_state_dict_refuses_entries_of_the_wrong_kind(mangle):
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    mangle(sd)
    with pytest.raises(OptimizerStateError):
        opt.load_state_dict(sd)


def test_gpt_optimizer_state_keeps_the_learned_rule_it_was_saved_with():
    from gpt_helpers import tiny_generator, toy_model

    from learned_opt import GptOptimizer

    gen = tiny_generator(perturb=0.01)
    saved = GptOptimizer(toy_model().parameters(), generator=gen, base=LearnedOptimizer, weights=THETA).state_dict()
    assert saved["rule_sha256"] == LearnedOptimizer([torch.zeros(1)], weights=THETA).rule.sha256
    other = GptOptimizer(toy_model().parameters(), generator=gen, base=LearnedOptimizer, weights=hand_set_theta(seed=1))
    with pytest.raises(OptimizerStateError, match="weights"):
        other.load_state_dict(saved)


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, before) -> bool:
    params, sd = before
    now = opt.state_dict()
    same_state = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                     for pid in sd["state"] for a, b in zip(sd["state"][pid].values(), now["state"][pid].values()))
    return (all(torch.equal(a, b) for a, b in zip(params, model.parameters())) and same_state
            and [g["step"] for g in sd["param_groups"]] == [g["step"] for g in now["param_groups"]])


@pytest.mark.parametrize("spoil", ["nan-grad", "inf-grad", "huge-grad", "huge-lr", "nan-lr-set-later"])
def test_a_step_that_would_write_nan_or_inf_raises_and_changes_nothing(spoil):
    from learned_opt import NonFiniteStepError

    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 2)
    before = _snapshot(model, opt)
    opt.zero_grad()
    loss_fn().backward()
    grad = model[2].weight.grad
    error, cause = NonFiniteStepError, None
    if spoil == "nan-grad":
        grad[0, 3] = float("nan")  # one element: the RMS features would spread it over the whole tensor
        cause = "gradient holds NaN or Inf"
    elif spoil == "inf-grad":
        grad[0, 0] = float("inf")
        cause = "gradient holds NaN or Inf"
    elif spoil == "huge-grad":  # finite, but its square is not in float32
        grad[0, 0] = 2e19
        cause = "gradient is finite, but its largest element"
    elif spoil == "huge-lr":
        opt.param_groups[0]["lr"] = 1e300
        cause = "lr is too large"
    else:
        opt.param_groups[0]["lr"] = float("nan")
        error = ConfigError
    with pytest.raises(error, match="nothing was changed" if error is NonFiniteStepError else "learning rate") as info:
        opt.step()
    assert cause is None or cause in str(info.value)
    assert _unchanged(model, opt, before)


def test_a_float64_gradient_beyond_float32_is_named_as_it_is():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([1e39, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(NonFiniteStepError, match=r"its largest element \(1e\+39\)"):
        LearnedOptimizer([p], weights=THETA).step()
    assert torch.equal(p.detach(), torch.zeros(3, dtype=torch.float64))


def test_unordered_or_malformed_param_groups_are_refused():
    model, _ = _problem()
    params = list(model.parameters())
    for bad in (set(params), [{"params": set(params)}], [{"params": frozenset(params[:1])}]):
        with pytest.raises(ConfigError, match="has no order"):
            LearnedOptimizer(bad, weights=THETA)
    with pytest.raises(ConfigError, match="a 'params' entry"):
        LearnedOptimizer([{"lr": 1.0}], weights=THETA)
    opt = LearnedOptimizer(params[:2], weights=THETA)
    with pytest.raises(ConfigError, match="a 'params' entry"):
        opt.add_param_group(params[2:])  # a list, not a group dict
    for step in (True, -1, 1.0):  # its own state_dict would not load again
        with pytest.raises(ConfigError, match="step must be an integer >= 0"):
            opt.add_param_group({"params": params[2:], "step": step})


@pytest.mark.parametrize("weights, match", [
    ({"w0": torch.zeros(5), "w1": torch.zeros(5)}, "do not match"),
    ({"w0": "abc"}, "must map names to tensors"),
    ({0: torch.zeros(3)}, "must map names"),
])
def test_malformed_weight_dicts_are_one_line_errors(weights, match):
    with pytest.raises(WeightsError, match=match):
        LearnedOptimizer([torch.zeros(2, requires_grad=True)], weights=weights)


def test_the_optimizer_keeps_its_own_copy_of_the_weights_it_was_given():
    theta = hand_set_theta(noise=0.05)
    opt = LearnedOptimizer([torch.zeros(2, requires_grad=True)], weights=theta)
    sha = opt.rule.sha256
    theta["w0"].zero_()  # the caller goes on changing its dict
    assert not torch.equal(opt.rule.theta["w0"], theta["w0"]) and opt.rule.sha256 == sha


@pytest.mark.parametrize("spoil", [
    lambda s: s["v"].fill_(-1.0),
    lambda s: s["m0"].fill_(float("nan")),
    lambda s: s.__setitem__("m0", s["m0"].to_sparse()),
    lambda s: s.__setitem__("v", s["v"].to(torch.int64)),
], ids=["negative-v", "nan-momentum", "sparse-momentum", "integer-v"])
def test_load_state_dict_refuses_state_the_next_step_cannot_use(spoil):
    model, loss_fn = _problem()
    opt = LearnedOptimizer(model.parameters(), weights=THETA)
    _train(model, loss_fn, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    spoil(sd["state"][0])
    before = _snapshot(model, opt)
    with pytest.raises(OptimizerStateError, match="dense, real and finite"):
        opt.load_state_dict(sd)
    assert _unchanged(model, opt, before)


@pytest.mark.parametrize("max_rows", [1, 7, 40])
def test_the_mlp_in_passes_of_a_few_elements_gives_the_same_step(max_rows, monkeypatch):
    """A step runs the rule's MLP over at most MAX_ROWS elements at a time (memory): tensors larger
    than that in slices, smaller ones together. The result is the one pass's."""
    from learned_opt.lopt import model as rule

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in ((5, 9), (3,), (0,), (17,), (2, 2))]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    theta = hand_set_theta(noise=0.1)
    one_pass = update(theta, params, grads, init_state(params), 3, lr=0.5)
    monkeypatch.setattr(rule, "MAX_ROWS", max_rows)
    passes = update(theta, params, grads, init_state(params), 3, lr=0.5)
    for a, b in zip(one_pass[0], passes[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(one_pass[0][0], params[0])  # it moved


def test_parameters_that_share_storage_step_from_the_values_before_the_step():
    """Every new value is worked out before anything is written: of two parameters over one storage,
    the one written last wins, computed from the values before the step (what update() gives)."""
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter(torch.randn(3, 3, generator=gen))
    b = nn.Parameter(torch.empty(0))
    b.data = a.data  # two Parameter objects, one storage
    grads = [torch.randn(3, 3, generator=gen), torch.randn(3, 3, generator=gen)]
    expected, _ = update(THETA, [a.detach().clone(), a.detach().clone()], grads, init_state([a, b]), 0, num_tensors=2)
    opt = LearnedOptimizer([a, b], weights=THETA)
    a.grad, b.grad = grads
    opt.step()
    assert torch.equal(a.detach(), expected[1]) and not torch.equal(expected[0], expected[1])


def test_a_parameter_that_cannot_be_written_leaves_its_state_as_it_was():
    """A parameter whose elements overlap (an expanded tensor) cannot take a copy: the step raises
    before any momentum is written."""
    source = nn.Parameter(torch.ones(3, 4))
    first = LearnedOptimizer([source], weights=THETA)
    source.grad = torch.ones(3, 4)
    first.step()
    p = nn.Parameter(torch.ones(3, 1).expand(3, 4))
    opt = LearnedOptimizer([p], weights=THETA)
    opt.load_state_dict(first.state_dict())
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    p.grad = torch.full((3, 4), 5.0)
    with pytest.raises(RuntimeError):
        opt.step()
    assert all(torch.equal(v, opt.state[p][k]) if isinstance(v, torch.Tensor) else v == opt.state[p][k]
               for k, v in before.items())
    assert torch.equal(p.detach(), torch.ones(3, 4))


def test_a_strided_state_set_from_outside_steps_as_its_contiguous_copy():
    stepped = []
    for strided in (False, True):
        model, loss_fn = _problem()
        opt = LearnedOptimizer(model.parameters(), weights=THETA)
        _train(model, loss_fn, opt, 2)
        if strided:
            for st in opt.state.values():
                st.update({k: t.T.contiguous().T for k, t in st.items() if isinstance(t, torch.Tensor) and t.dim() == 2})
        _train(model, loss_fn, opt, 2)
        stepped.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*stepped))
