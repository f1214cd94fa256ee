"""The G.pt transformer: identity at initialisation, shapes, token plumbing, presets, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from learned_opt import tasks
from learned_opt.errors import ArchitectureMismatchError, ConfigError, LearnedOptError
from learned_opt.generator import PRESETS, Gpt, GptConfig, build_generator, get_config
from learned_opt.layout import Layout

# A toy MLP 5-6-3 cut into chunks of 16: w1 -> 2 tokens, b1 -> 1, w2 -> 2, b2 -> 1 (T=6, M=16).
TOY = Layout((("w1", (6, 5)), ("b1", (6,)), ("w2", (3, 6)), ("b2", (3,))), chunk_size=16)



def inputs(layout: Layout, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = layout.num_params
    return dict(
        x_t=torch.randn(batch, p, generator=g) * 3,
        t=torch.randint(0, 1000, (batch,), generator=g),
        theta=torch.randn(batch, p, generator=g),
        metric=torch.rand(batch, generator=g),
        target=torch.rand(batch, generator=g) * 2 - 0.5,
    )


def test_untrained_model_returns_theta_exactly():
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    for seed, batch in [(0, 1), (1, 5), (2, 3)]:
        x = inputs(TOY, batch, seed)
        out = model(**x)
        assert out.shape == (batch, TOY.num_params)
        assert out.dtype == torch.float32
        assert torch.equal(out, x["theta"])


def test_untrained_model_returns_theta_on_mnist_layout_in_train_mode_with_dropout():
    layout = tasks.get("mnist-mlp").layout(chunk_size=1000)
    torch.manual_seed(0)
    model = build_generator(layout, dataclasses.replace(PRESETS["tiny"], dropout=0.5)).train()
    x = inputs(layout, 2)
    assert torch.equal(model(**x), x["theta"])
    assert layout.num_tokens == 11 and model.pos_embedding.shape[1] == 26  # G.pt's 26 tokens


def test_tokens_match_the_layout_and_decoder_maps_back_through_the_layout():
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    x = inputs(TOY, 4)
    assert torch.equal(model._tokens(x["theta"]), TOY.to_tokens(x["theta"]))
    # A decoder that outputs a known pattern per token entry must land where the layout says.
    pattern = torch.randn(TOY.num_tokens, TOY.token_dim)  # [T, M]
    with torch.no_grad():
        model.decoder.bias.copy_(pattern)
    out = model(**x)
    expected = x["theta"] + TOY.from_tokens(pattern).unsqueeze(0)
    torch.testing.assert_close(out, expected)


def test_encoders_and_decoders_are_per_token_and_padding_rows_start_at_zero():
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    t, m, d = TOY.num_tokens, TOY.token_dim, model.config.d_model
    assert model.theta_encoder.weight.shape == (t, m, d)
    assert model.noised_encoder.weight.shape == (t, m, d)
    assert model.decoder.weight.shape == (t, d, m)
    pad = ~TOY.token_mask  # [T, M]
    assert pad.any()
    assert torch.all(model.theta_encoder.weight[pad] == 0)
    assert torch.all(model.theta_encoder.weight[~pad] != 0)


def test_conditioning_changes_the_output_once_trained():
    """After one optimizer step the output depends on x_t, t and both metrics (all inputs are wired in)."""
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    x = inputs(TOY, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = (model(**x) - torch.randn(4, TOY.num_params)).pow(2).mean()
    loss.backward()
    assert model.decoder.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        base = model(**x)
        assert not torch.equal(base, x["theta"])
        for key, change in [("x_t", 1.0), ("t", 7), ("metric", 0.3), ("target", 0.3)]:
            other = dict(x)
            other[key] = x[key] + change
            assert not torch.allclose(model(**other), base), key


def test_condition_is_forward_with_the_condition_encoded_once():
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a "trained" model: the output depends on everything
    x = inputs(TOY, 3)
    denoise = model.condition(x["theta"], x["metric"], x["target"])
    for seed in range(3):
        y = inputs(TOY, 3, seed)
        assert torch.equal(denoise(y["x_t"], y["t"]), model(y["x_t"], y["t"], x["theta"], x["metric"], x["target"]))
    with pytest.raises(ArchitectureMismatchError):
        denoise(y["x_t"][:2], y["t"][:2])


def test_state_dict_holds_only_learned_tensors_and_round_trips():
    torch.manual_seed(0)
    model = build_generator(TOY, "tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    assert set(state) == {n for n, _ in model.named_parameters()}
    assert all(v.dtype == torch.float32 for v in state.values())
    config = GptConfig(**json.loads(json.dumps(dataclasses.asdict(model.config))))
    assert config == model.config
    clone = Gpt(TOY, config)
    clone.load_state_dict(state)
    x = inputs(TOY, 3)
    with torch.no_grad():
        torch.testing.assert_close(clone(**x), model(**x), rtol=0, atol=0)


def test_presets_and_their_sizes():
    assert {"tiny", "mini", "small", "base"} <= set(PRESETS)
    layout = tasks.get("mnist-mlp").layout(chunk_size=1000)
    assert build_generator(TOY, "tiny").num_parameters() < 200_000
    small = build_generator(layout, "small").num_parameters()
    assert 5_000_000 <= small <= 10_000_000
    assert PRESETS["tiny"].d_model < PRESETS["mini"].d_model < PRESETS["small"].d_model < PRESETS["base"].d_model
    assert build_generator(layout, "mini").num_parameters() < small
    # get_config hands out copies: editing one does not change the preset
    cfg = get_config("tiny")
    cfg.dropout = 0.3
    assert PRESETS["tiny"].dropout == 0.0


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny.*small") as err:
        build_generator(TOY, "huge")
    assert isinstance(err.value, ValueError) and isinstance(err.value, LearnedOptError)


@pytest.mark.parametrize(
    "kwargs",
    [dict(d_model=30, n_layers=1, n_heads=4), dict(d_model=32, n_layers=0, n_heads=2),
     dict(d_model=32, n_layers=1, n_heads=2, dropout=1.0), dict(d_model=32, n_layers=1, n_heads=2, mlp_ratio=0)],
)
def test_invalid_configs_raise(kwargs):
    with pytest.raises(ConfigError):
        GptConfig(**kwargs)


def test_wrong_input_width_names_the_expected_shape():
    model = build_generator(TOY, "tiny")
    x = inputs(TOY, 2)
    x["x_t"] = x["x_t"][:, :-1]
    with pytest.raises(ArchitectureMismatchError, match=rf"\[B, {TOY.num_params}\]"):
        model(**x)


def test_one_token_per_layer_layout():
    layout = Layout(TOY.signature, chunk_size=None)
    torch.manual_seed(0)
    model = build_generator(layout, "tiny")
    x = inputs(layout, 2)
    assert torch.equal(model(**x), x["theta"])
    assert model.theta_encoder.weight.shape[:2] == (4, 30)


# ---------------------------------------------------------------------------- preconditioned variant


def preconditioned(layout: Layout = TOY, **kw) -> Gpt:
    from learned_opt.diffusion import DiffusionConfig

    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["tiny"], precondition=True, **kw)
    return build_generator(layout, config, DiffusionConfig(num_steps=100))


def test_preconditioned_model_needs_its_noise_schedule():
    with pytest.raises(ConfigError, match="noise schedule"):
        build_generator(TOY, dataclasses.replace(PRESETS["tiny"], precondition=True))
    with pytest.raises(ConfigError, match="residual_std"):
        GptConfig(d_model=32, n_layers=1, n_heads=2, residual_std=0.0)


def test_untrained_preconditioned_model_returns_theta_exactly():
    model = preconditioned()
    x = inputs(TOY, 4)
    x["t"] = x["t"] % 100
    assert torch.equal(model(**x), x["theta"])


def test_preconditioned_input_has_unit_scale_at_every_noise_level():
    """c_in (x_t - a θ) has unit std per parameter when θ′ - θ has std σ_p, whatever the step."""
    model = preconditioned()
    sigma = torch.linspace(0.01, 2.0, TOY.num_params)
    model.residual_scale.copy_(sigma)
    n = 20_000
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(n, TOY.num_params, generator=g)
    x0 = theta + sigma * torch.randn(n, TOY.num_params, generator=g)
    for step in (0, 10, 50, 99):
        t = torch.full((n,), step)
        a, s = model.signal_rate[step], model.noise_rate[step]
        x_t = a * x0 + s * torch.randn(n, TOY.num_params, generator=g)
        c_in, a_out = model._preconditioning(t, torch.float32)
        assert torch.equal(a_out[:, 0], torch.full((n,), a.item()))
        std = (c_in * (x_t - a * theta)).std(0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=0.03, rtol=0)


def test_preconditioned_output_is_theta_plus_scaled_decoding_and_loss_weight_undoes_the_scale():
    model = preconditioned()
    sigma = torch.linspace(0.1, 1.0, TOY.num_params)
    model.residual_scale.copy_(sigma)
    with torch.no_grad():
        model.decoder.bias.fill_(1.0)  # decoded output: 1 at every real parameter
    x = inputs(TOY, 3)
    x["t"] = x["t"] % 100
    out = model(**x)
    torch.testing.assert_close(out, x["theta"] + sigma)
    weight = model.loss_weight(x["t"])
    torch.testing.assert_close(weight, sigma.square().reciprocal()[None])
    # ... so the weighted x0 error is the decoded output's own error
    torch.testing.assert_close((weight * (out - x["theta"]).square()).mean(), torch.tensor(1.0))
    assert torch.equal(build_generator(TOY, "tiny").loss_weight(x["t"]), torch.ones(3, 1))


def test_residual_scale_is_saved_with_the_weights():
    model = preconditioned()
    model.residual_scale.copy_(torch.rand(TOY.num_params) + 0.1)
    state = model.state_dict()
    assert "residual_scale" in state and "signal_rate" not in state
    clone = preconditioned()
    clone.load_state_dict(state)
    assert torch.equal(clone.residual_scale, model.residual_scale)


def test_encoders_of_wide_tokens_start_at_the_principal_directions_of_the_updates():
    # updates that live in 3 directions of token 0 (16 wide, tiny d_model 32 > 16: use a narrow model)
    config = GptConfig(d_model=4, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    model = build_generator(TOY, config)
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 3, generator=g)).Q  # [16, 3] orthonormal
    updates = torch.zeros(200, TOY.num_params)
    token0 = TOY.to_tokens(torch.arange(TOY.num_params).float())[0].long()  # flat positions of token 0
    updates[:, token0] = torch.randn(200, 3, generator=g) @ directions.T
    before = model.noised_encoder.weight.clone()
    done = model.init_encoders_from_updates(updates)
    assert 0 in done and all(TOY.token_mask[k].sum() > 4 for k in done)
    w = model.noised_encoder.weight[0, :, :3]  # [16, 3]
    torch.testing.assert_close(w.T @ w, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal ...
    torch.testing.assert_close(directions @ (directions.T @ w), w, atol=1e-5, rtol=0)  # ... in their span
    assert torch.equal(model.theta_encoder.weight[0], model.noised_encoder.weight[0])
    narrow = [k for k in range(TOY.num_tokens) if k not in done]
    assert all(torch.equal(model.noised_encoder.weight[k], before[k]) for k in narrow)
    x = inputs(TOY, 2)
    assert torch.equal(model(**x), x["theta"])  # decoders still zero
    with pytest.raises(ArchitectureMismatchError):
        model.init_encoders_from_updates(updates[:, :-1])


def test_subspace_skip_copies_a_clean_update_inside_its_directions_and_nothing_outside():
    from learned_opt.diffusion import DiffusionConfig

    config = dataclasses.replace(GptConfig(d_model=4, n_layers=1, n_heads=2), precondition=True, subspace_skip=True)
    torch.manual_seed(0)
    model = build_generator(TOY, config, DiffusionConfig(num_steps=100))
    x = inputs(TOY, 3)
    x["t"] = torch.zeros(3, dtype=torch.long)
    assert torch.equal(model(**x), x["theta"])  # no directions yet: no skip
    g = torch.Generator().manual_seed(1)
    updates = torch.randn(300, TOY.num_params, generator=g)
    token0 = TOY.to_tokens(torch.arange(TOY.num_params).float())[0].long()
    updates[:, token0] = torch.randn(300, 2, generator=g) @ torch.linalg.qr(torch.randn(16, 2, generator=g)).Q.T
    model.init_encoders_from_updates(updates)
    # at t = 0 the noised input is the update itself: inside token 0's directions it comes through
    inside = updates[:3]
    x["x_t"] = model.signal_rate[0] * (x["theta"] + inside)
    out = model(**x) - x["theta"]
    torch.testing.assert_close(out[:, token0], inside[:, token0], atol=0.05, rtol=0.05)
    # ... and a change orthogonal to them does not
    basis = model.skip_basis[0, :, :4]  # [16, 4]: 2 real directions + 2 from the null space
    ortho = torch.randn(3, 16, generator=g)
    ortho = ortho - (ortho @ basis) @ basis.T
    x["x_t"] = x["theta"].clone()
    x["x_t"][:, token0] += ortho
    x["x_t"] = model.signal_rate[0] * x["x_t"]
    assert (model(**x) - x["theta"])[:, token0].abs().max() < 1e-4
    with pytest.raises(ConfigError, match="precondition"):
        build_generator(TOY, GptConfig(d_model=4, n_layers=1, n_heads=2, subspace_skip=True))


# ---------------------------------------------------------------------------------- neuron tokens

NEURON = Layout((("fc1.weight", (6, 5)), ("fc1.bias", (6,)), ("fc2.weight", (3, 6)), ("fc2.bias", (3,))),
                scheme="neuron")  # 6 unit tokens of 5 + 1 + 3 and one of 3


def permute_units(flat: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The toy MLP's hidden units reordered by ``perm`` (the same function)."""
    p = NEURON.unflatten(flat)
    return NEURON.flatten([p["fc1.weight"][:, perm], p["fc1.bias"][:, perm], p["fc2.weight"][..., perm],
                           p["fc2.bias"]])


def neuron_model(**changes) -> Gpt:
    from learned_opt.diffusion import DiffusionConfig

    torch.manual_seed(0)
    config = dataclasses.replace(GptConfig(d_model=8, n_layers=2, n_heads=2), **changes)
    return build_generator(NEURON, config, DiffusionConfig(num_steps=100) if config.precondition else None)


def test_neuron_generator_shares_weights_within_a_layer_and_fuses_theta_with_x_t():
    model = neuron_model()
    assert model.theta_encoder.weight.shape == (2, 9, 8) and model.decoder.weight.shape == (2, 8, 9)
    assert model.pos_embedding.shape == (1, 2 + 4, 8)
    x = inputs(NEURON, 3)
    assert torch.equal(model(**x), x["theta"])  # zero decoders: still θ exactly


@pytest.mark.parametrize("precondition", [False, True])
def test_neuron_generator_is_equivariant_to_hidden_unit_permutations(precondition):
    model = neuron_model(precondition=precondition, subspace_skip=precondition)
    if precondition:
        model.residual_scale.copy_(NEURON.group_rms(torch.rand(NEURON.num_params) + 0.1))
        model.init_encoders_from_updates(torch.randn(64, NEURON.num_params))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_()
    x = inputs(NEURON, 3)
    x["t"] = x["t"] % 100
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    moved = dict(x, x_t=permute_units(x["x_t"], perm), theta=permute_units(x["theta"], perm))
    out = model(**x)
    torch.testing.assert_close(model(**moved), permute_units(out, perm), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x["theta"])


def test_neuron_generator_points_each_shared_encoder_at_its_groups_update_directions():
    model = neuron_model(d_model=6)  # 6 < the units' 9 values: their encoder is set
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(9, 6, generator=g)).Q  # [9, 6]: unit j moves along column j only
    updates = torch.zeros(50, NEURON.num_params)
    for j, idx in enumerate(NEURON.token_indices[:6]):
        updates[:, list(idx)] = torch.randn(50, 1, generator=g) * directions[:, j]
    assert model.init_encoders_from_updates(updates) == [0]  # the 3-wide output bias fits d_model whole
    w = model.noised_encoder.weight[0]  # [9, 6]: pooled over the units, it spans all six directions
    torch.testing.assert_close(w @ (w.T @ directions), directions, atol=1e-5, rtol=0)


def test_neuron_generator_round_trips_through_a_manifest(tmp_path):
    from learned_opt.diffusion import DiffusionConfig
    from learned_opt.normalization import Normalization
    from learned_opt.pretrained import LoadedGenerator, load_generator, save_generator

    layout = tasks.get("mnist-mlp").layout(scheme="neuron")
    torch.manual_seed(0)
    model = build_generator(layout, GptConfig(d_model=8, n_layers=1, n_heads=2))
    with torch.no_grad():
        model.decoder.bias.normal_()
    manifest = save_generator(tmp_path, "neuron", model, DiffusionConfig(num_steps=10),
                              Normalization.from_stats(0.1, 0.0, 2.5), task="mnist-mlp", metric="test_loss",
                              best_prompt=0.1, corpus={}, training={})
    loaded = load_generator(manifest)
    saved = json.loads(manifest.read_text())
    assert saved["tokenisation"]["scheme"] == "neuron" and saved["format_version"] == 2
    assert loaded.model.layout == layout
    x = inputs(layout, 2)
    torch.testing.assert_close(loaded.model(**x), model(**x))
    assert isinstance(loaded, LoadedGenerator)


def test_neuron_generator_with_two_hidden_layers_is_equivariant_to_the_last_one():
    layout = Layout((("fc1.weight", (5, 4)), ("fc1.bias", (5,)), ("fc2.weight", (6, 5)), ("fc2.bias", (6,)),
                     ("fc3.weight", (2, 6)), ("fc3.bias", (2,))), scheme="neuron")
    torch.manual_seed(0)
    model = build_generator(layout, GptConfig(d_model=8, n_layers=2, n_heads=2))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_()

    def permute_last(flat, perm):
        p = layout.unflatten(flat)
        return layout.flatten([p["fc1.weight"], p["fc1.bias"], p["fc2.weight"][:, perm], p["fc2.bias"][:, perm],
                               p["fc3.weight"][..., perm], p["fc3.bias"]])

    x = inputs(layout, 2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    moved = dict(x, x_t=permute_last(x["x_t"], perm), theta=permute_last(x["theta"], perm))
    torch.testing.assert_close(model(**moved), permute_last(model(**x), perm), atol=1e-5, rtol=1e-5)
