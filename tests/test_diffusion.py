"""The diffusion process: schedules, forward noising, loss, samplers, determinism, and overfitting."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from learned_opt.diffusion import Diffusion, DiffusionConfig, ddim_timesteps, logsnr_timesteps
from learned_opt.errors import ConfigError
from learned_opt.generator import build_generator
from learned_opt.layout import Layout

MU, STD = 0.7, 0.3  # a Gaussian "data set" x0 ~ N(MU, STD^2), for which E[x0 | x_t] is known



def gaussian_oracle(diffusion: Diffusion):
    """The exact posterior mean E[x0 | x_t] of x0 ~ N(MU, STD^2): the ideal x0-predicting model."""
    abar = diffusion.alphas_cumprod.float()

    def model(x, t):
        a = abar[t].view(-1, *([1] * (x.dim() - 1)))
        gain = STD**2 * a.sqrt() / (a * STD**2 + 1 - a)
        return MU + gain * (x - a.sqrt() * MU)

    return model


# ---------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_sane(schedule):
    d = Diffusion(DiffusionConfig(schedule=schedule))
    ab = d.alphas_cumprod
    assert ab.shape == (1000,)
    assert torch.all(ab > 0) and torch.all(ab <= 1)
    assert torch.all(ab[1:] < ab[:-1])  # strictly decreasing
    assert torch.all((d.betas > 0) & (d.betas < 1))
    assert ab[0] > 0.99 and ab[-1] < 1e-3  # starts near the data, ends near pure noise


def test_linear_schedule_is_gpts():
    d = Diffusion()
    assert d.config == DiffusionConfig(num_steps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))


def test_config_is_json_able_and_validated():
    cfg = DiffusionConfig(num_steps=50, schedule="cosine")
    assert DiffusionConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    for bad in [dict(num_steps=0), dict(schedule="sigmoid"), dict(beta_start=0.1, beta_end=0.01), dict(beta_end=1.0)]:
        with pytest.raises(ConfigError):
            DiffusionConfig(**bad)


def test_ddim_timesteps():
    for n, s in [(1000, 50), (1000, 10), (1000, 1000), (100, 7)]:
        ts = ddim_timesteps(n, s)
        assert len(ts) == len(set(ts)) == s
        assert ts[0] == n - 1 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ConfigError, match="steps"):
        ddim_timesteps(1000, 1001)


# ---------------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_has_the_schedules_mean_and_variance(schedule):
    d = Diffusion(DiffusionConfig(schedule=schedule))
    g = torch.Generator().manual_seed(0)
    n = 40_000
    for step in [0, 100, 500, 999]:
        x0 = torch.full((n, 1), 1.5)
        t = torch.full((n,), step, dtype=torch.long)
        xt = d.q_sample(x0, t, torch.randn(n, 1, generator=g))
        ab = d.alphas_cumprod[step].item()
        mean, var = math.sqrt(ab) * 1.5, 1 - ab
        # 6 standard errors of the sample mean and of the sample variance of a Gaussian
        assert abs(xt.mean().item() - mean) < 6 * math.sqrt(var / n)
        assert abs(xt.var().item() - var) < 6 * var * math.sqrt(2 / n)


def test_q_sample_broadcasts_per_sample_timesteps():
    d = Diffusion()
    x0, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0, 10, 999])
    xt = d.q_sample(x0, t, noise)
    for i in range(3):
        ab = d.alphas_cumprod[t[i]].float()
        torch.testing.assert_close(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])


# ---------------------------------------------------------------------------------- training loss


def test_training_loss_draws_from_the_generator_and_compares_with_x0():
    d = Diffusion()
    x0 = torch.randn(64, 7)
    seen = []

    def zero_model(x_t, t, scale):
        seen.append(t.clone())
        return torch.zeros_like(x_t) * scale

    rng = torch.get_rng_state()
    loss = d.training_loss(zero_model, x0, {"scale": torch.tensor(1.0)}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert loss.dim() == 0
    torch.testing.assert_close(loss, x0.pow(2).mean())
    assert seen[0].dtype == torch.long and 0 <= seen[0].min() and seen[0].max() < 1000
    assert len(set(seen[0].tolist())) > 30  # t varies across the batch

    oracle_loss = d.training_loss(lambda x_t, t: x0, x0, {}, generator=torch.Generator().manual_seed(3))
    assert oracle_loss.item() == 0.0
    # same seed, same draws
    d.training_loss(zero_model, x0, {"scale": torch.tensor(1.0)}, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], seen[1])


# ---------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(
    "method, steps, eta", [("ddpm", 0, 0.0), ("ddim", 1000, 1.0), ("ddim", 50, 0.0), ("dpm++2m", 25, 0.0)]
)
def test_samplers_draw_from_the_data_distribution_with_an_oracle(schedule, method, steps, eta):
    d = Diffusion(DiffusionConfig(schedule=schedule))
    x = d.sample(gaussian_oracle(d), {}, (10_000, 1), method=method, steps=steps or 50, eta=eta,
                 generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - MU) < 0.02
    # ancestral sampling is exact up to Monte Carlo error, and so (nearly) is the second-order
    # DPM-Solver++ at 25 steps; DDIM-50 (deterministic, first order) shrinks the spread by a few
    # percent on this data, so its band is wider
    tol = 0.10 if method == "ddim" and eta == 0.0 else 0.03
    assert abs(x.std().item() / STD - 1) < tol


def test_ddim_with_all_steps_and_eta_1_is_ddpm():
    d = Diffusion()
    a = d.sample(gaussian_oracle(d), {}, (6, 3), method="ddpm", generator=torch.Generator().manual_seed(5))
    b = d.sample(gaussian_oracle(d), {}, (6, 3), method="ddim", steps=1000, eta=1.0,
                 generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_beats_ddim_at_few_steps(schedule):
    """The point of the second-order solver: at 10 steps DDIM shrinks the spread, DPM-Solver++ barely."""
    d = Diffusion(DiffusionConfig(schedule=schedule))
    x_T = torch.randn(10_000, 1, generator=torch.Generator().manual_seed(0))
    err = {}
    for method in ["ddim", "dpm++2m"]:
        x = d.sample(gaussian_oracle(d), {}, x_T.shape, method=method, steps=10, x_T=x_T,
                     generator=torch.Generator().manual_seed(0))
        err[method] = abs(x.std().item() / STD - 1)
    assert err["dpm++2m"] < 0.06 and err["dpm++2m"] < err["ddim"] / 2, err


def test_logsnr_timesteps():
    for schedule in ["linear", "cosine"]:
        abar = Diffusion(DiffusionConfig(schedule=schedule)).alphas_cumprod
        for s in [2, 10, 50, 1000]:
            ts = logsnr_timesteps(abar, s)
            assert len(set(ts)) == s and ts == sorted(ts, reverse=True) and ts[0] == 999 and ts[-1] == 0
        ts = logsnr_timesteps(abar, 10)
        logsnr = torch.log(abar / (1 - abar))[ts]
        gaps = (logsnr[2:] - logsnr[1:-1]).tolist()  # the first step may start below the floor
        assert max(gaps) < 1.5 * min(gaps)  # evenly spaced in log-SNR (up to rounding to integer steps)
    assert logsnr_timesteps(abar, 1) == [999]
    with pytest.raises(ConfigError, match="steps"):
        logsnr_timesteps(abar, 1001)


def test_point_mass_oracle_lands_exactly():
    d = Diffusion()
    target = torch.tensor([[1.0, -2.0, 3.0]])
    for method in ["ddim", "ddpm", "dpm++2m"]:
        x = d.sample(lambda x_t, t: target.expand_as(x_t), {}, (1, 3), method=method, steps=10,
                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, target)


def test_sampling_is_deterministic_and_leaves_the_global_rng_alone():
    d = Diffusion(DiffusionConfig(num_steps=100))
    model = gaussian_oracle(d)
    rng = torch.get_rng_state()
    a = d.sample(model, {}, (4, 5), steps=20, eta=0.5, generator=torch.Generator().manual_seed(11))
    b = d.sample(model, {}, (4, 5), steps=20, eta=0.5, generator=torch.Generator().manual_seed(11))
    c = d.sample(model, {}, (4, 5), steps=20, eta=0.5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # eta = 0 from a given x_T needs no randomness at all
    x_T = torch.randn(4, 5)
    e = d.sample(model, {}, (4, 5), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1))
    f = d.sample(model, {}, (4, 5), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(e, f)


def test_sample_passes_conditioning_and_timesteps_and_restores_train_mode():
    d = Diffusion(DiffusionConfig(num_steps=100))

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x_t, t, theta):
            self.calls.append((t.clone(), self.training))
            return theta

    model = Recorder().train()
    theta = torch.randn(2, 3)
    x = d.sample(model, {"theta": theta}, (2, 3), steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, theta)
    assert [c[0].tolist() for c in model.calls] == [[t, t] for t in ddim_timesteps(100, 5)]
    assert not any(training for _, training in model.calls) and model.training
    model.calls.clear()
    d.sample(model, {"theta": theta}, (2, 3), method="ddpm", generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 100


def test_sampling_a_gpt_through_its_condition_equals_calling_it_plainly():
    torch.manual_seed(0)
    layout = Layout((("w", (4, 3)), ("b", (4,))), chunk_size=8)
    model = build_generator(layout, "tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    cond = {"theta": torch.randn(2, 16, generator=g), "metric": torch.rand(2, generator=g), "target": torch.zeros(2)}
    d = Diffusion(DiffusionConfig(num_steps=50))
    for method in ["ddim", "dpm++2m", "ddpm"]:
        a = d.sample(model, cond, (2, 16), method=method, steps=10, eta=0.3, generator=torch.Generator().manual_seed(4))
        b = d.sample(lambda x_t, t, **c: model(x_t, t, **c), cond, (2, 16), method=method, steps=10, eta=0.3,
                     generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, cond["theta"]), method


def test_early_stop_returns_the_x0_prediction_at_t_min():
    d = Diffusion(DiffusionConfig(num_steps=100))
    assert ddim_timesteps(100, 3, t_min=40) == [99, 70, 40]
    with pytest.raises(ConfigError, match="one step"):  # a single call is at the last timestep: t_min cannot apply
        ddim_timesteps(100, 1, t_min=40)
    assert ddim_timesteps(100, 5, t_min=0) == ddim_timesteps(100, 5)
    ts = logsnr_timesteps(d.alphas_cumprod, 6, t_min=30)
    assert ts[0] == 99 and ts[-1] == 30 and all(a > b for a, b in zip(ts, ts[1:]))

    calls = []

    def model(x_t, t):  # a prediction that names the timestep it was made at
        calls.append(int(t[0]))
        return torch.full_like(x_t, float(t[0]))

    for method, expected in [("ddim", [99, 70, 40]), ("dpm++2m", logsnr_timesteps(d.alphas_cumprod, 3, 40)),
                             ("ddpm", list(range(99, 39, -1)))]:
        calls.clear()
        x = d.sample(model, {}, (2, 3), method=method, steps=3, t_min=40, generator=torch.Generator().manual_seed(0))
        assert calls == expected, method
        assert torch.equal(x, torch.full((2, 3), 40.0)), method  # the last prediction itself, not a step from it


def test_bad_sampling_arguments_raise():
    d = Diffusion(DiffusionConfig(num_steps=100))
    g = torch.Generator().manual_seed(0)
    model = gaussian_oracle(d)
    with pytest.raises(ConfigError, match=r"ddim, ddpm, dpm\+\+2m"):
        d.sample(model, {}, (1, 2), method="euler", generator=g)
    with pytest.raises(ConfigError, match="steps"):
        d.sample(model, {}, (1, 2), steps=101, generator=g)
    with pytest.raises(ConfigError, match="x_T"):
        d.sample(model, {}, (1, 2), x_T=torch.zeros(1, 3), generator=g)
    for method in ["ddim", "ddpm", "dpm++2m"]:
        with pytest.raises(ConfigError, match="t_min"):
            d.sample(model, {}, (1, 2), method=method, t_min=100, generator=g)
        with pytest.raises(ConfigError, match="t_min"):
            d.sample(model, {}, (1, 2), method=method, t_min=-1, generator=g)
    with pytest.raises(ConfigError, match="steps"):
        d.sample(model, {}, (1, 2), steps=21, t_min=80, generator=g)


# ---------------------------------------------------------------------------------- overfitting


def test_tiny_generator_overfits_a_tiny_corpus_and_ddim_lands_on_the_targets():
    """8 (θ, l) -> (θ′, l′) pairs: the loss falls 10x and DDIM samples land near each θ′."""
    torch.manual_seed(0)
    layout = Layout((("w1", (6, 5)), ("b1", (6,)), ("w2", (3, 6)), ("b2", (3,))), chunk_size=16)
    g = torch.Generator().manual_seed(0)
    n, p = 8, layout.num_params
    theta = 0.5 * torch.randn(n, p, generator=g)
    theta_next = theta + 0.5 * torch.randn(n, p, generator=g)  # an arbitrary map to memorise
    metric, target = torch.rand(n, generator=g), torch.rand(n, generator=g)
    cond = {"theta": theta, "metric": metric, "target": target}

    d = Diffusion()
    model = build_generator(layout, "tiny")
    reps = 8  # each pair at several timesteps per batch

    def loss_on(seed):
        big = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in cond.items()}
        return d.training_loss(model, theta_next.repeat(reps, 1), big, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = loss_on(123).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for step in range(100):
        loss = loss_on(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = loss_on(123).item()
    assert after < before / 10, (before, after)

    for method, steps in [("ddim", 50), ("dpm++2m", 25)]:
        sample = d.sample(model, cond, (n, p), method=method, steps=steps, generator=torch.Generator().manual_seed(1))
        err = (sample - theta_next).norm(dim=1) / (theta - theta_next).norm(dim=1)  # 1.0 = no better than θ
        assert err.max() < 0.25, (method, err)


def test_snr_window_puts_most_training_steps_where_the_data_is_neither_noise_nor_clean():
    diffusion = Diffusion(DiffusionConfig(num_steps=1000))
    probs = diffusion.snr_window_probs(-4.0, 6.0, scale=0.4)
    assert probs.shape == (1000,) and probs.sum().item() == pytest.approx(1.0, abs=1e-5) and (probs > 0).all()
    ab = diffusion.alphas_cumprod
    logsnr = torch.log(ab / (1 - ab)) + 2 * math.log(0.4)
    inside = (logsnr >= -4) & (logsnr <= 6)
    assert probs[inside].sum().item() == pytest.approx(0.9 + 0.1 * inside.float().mean().item(), abs=1e-4)
    assert 0 < inside.sum() < 1000 and not inside[-1] and inside[50]  # pure noise is outside, t=50 inside
    with pytest.raises(ConfigError):
        diffusion.snr_window_probs(3.0, 1.0)


def test_training_loss_draws_t_from_given_probabilities():
    diffusion = Diffusion(DiffusionConfig(num_steps=100))
    seen = []

    def model(x_t, t, **cond):
        seen.append(t.clone())
        return x_t

    probs = torch.zeros(100)
    probs[[7, 42]] = 0.5
    diffusion.training_loss(model, torch.randn(64, 3), {}, generator=torch.Generator().manual_seed(0), t_probs=probs)
    assert set(seen[0].tolist()) == {7, 42}
