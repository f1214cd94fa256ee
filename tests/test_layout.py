import pytest
import torch
from torch import nn

from learned_opt import ArchitectureMismatchError, Layout, compare_signatures, signature_of
from learned_opt.layout import check_signature, signature_from_json, signature_to_json


def mlp(*sizes):
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 1000, None])
def test_flat_and_token_round_trip_is_exact(chunk):
    model = mlp(5, 7, 3)
    layout = Layout.of(model, chunk)
    flat = layout.flatten_module(model)
    assert flat.shape == (layout.num_params,) == (5 * 7 + 7 + 7 * 3 + 3,)
    tokens = layout.to_tokens(flat)
    assert tokens.shape == (layout.num_tokens, layout.token_dim)
    assert torch.equal(layout.from_tokens(tokens), flat)
    batch = torch.randn(4, layout.num_params)
    assert torch.equal(layout.from_tokens(layout.to_tokens(batch)), batch)
    assert (layout.to_tokens(batch)[:, ~layout.token_mask] == 0).all()


def test_tokens_never_cross_layers():
    layout = Layout.of(mlp(5, 7, 3), chunk_size=10)
    # layers of 35, 7, 21, 3 values -> 4 + 1 + 3 + 1 tokens
    assert layout.num_tokens == 9
    bounds = set(layout.offsets)
    for a, b in layout.token_spans:
        assert not any(a < o < b for o in bounds)


def test_mnist_token_count_matches_gpt():
    from learned_opt import tasks

    layout = tasks.get("mnist-mlp").layout(chunk_size=1000)
    assert layout.num_params == 7960
    assert layout.num_tokens == 11  # G.pt: 11 parameter tokens per MNIST MLP


def test_load_into_copies_in_place():
    model = mlp(4, 3, 2)
    layout = Layout.of(model)
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    new = torch.randn(layout.num_params)
    layout.load_into(new, params)
    assert [p.data_ptr() for p in params] == ptrs
    assert torch.equal(layout.flatten_module(model), new)


def test_signature_json_round_trip():
    sig = signature_of(mlp(4, 3, 2))
    assert signature_from_json(signature_to_json(sig)) == sig


def test_signature_differences_are_all_named():
    expected = signature_of(mlp(4, 3, 2))
    assert compare_signatures(expected, expected) == []
    wider = signature_of(mlp(4, 5, 2))
    diffs = compare_signatures(expected, wider)
    assert len(diffs) == 3 and all("shape" in d for d in diffs)
    extra = signature_of(mlp(4, 3, 2, 2))
    assert any("unexpected parameter '2.weight'" in d for d in compare_signatures(expected, extra))
    missing = compare_signatures(extra, expected)
    assert any("missing parameter '2.bias'" in d for d in missing)
    reordered = tuple(reversed(expected))
    assert any("order" in d for d in compare_signatures(expected, reordered))
    with pytest.raises(ArchitectureMismatchError, match="3 difference"):
        check_signature(expected, wider)


def test_bad_flat_length_is_refused():
    layout = Layout.of(mlp(4, 3))
    with pytest.raises(ArchitectureMismatchError, match="has 15"):
        layout.unflatten(torch.zeros(16))


# ---------------------------------------------------------------------------------- neuron tokens


def test_neuron_tokens_hold_each_units_weights_and_every_parameter_once():
    model = mlp(5, 7, 3)
    layout = Layout.of(model, scheme="neuron")
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    tokens = layout.to_tokens(layout.flatten_module(model))
    assert layout.num_tokens == 8 and layout.token_dim == 5 + 1 + 3 and layout.token_groups == (0,) * 7 + (1,)
    for j in range(7):  # hidden unit j: incoming weights, bias, outgoing weights
        assert torch.equal(tokens[j], torch.cat([w1[j], b1[j : j + 1], w2[:, j]]))
    assert torch.equal(tokens[7, :3], b2) and (tokens[7, 3:] == 0).all()
    assert sorted(i for idx in layout.token_indices for i in idx) == list(range(layout.num_params))
    batch = torch.randn(4, layout.num_params)
    assert torch.equal(layout.from_tokens(layout.to_tokens(batch)), batch)


def test_neuron_tokens_of_a_deeper_chain_put_outgoing_weights_with_the_last_hidden_layer():
    layout = Layout.of(mlp(4, 6, 5, 2), scheme="neuron")  # CartPole's shape, smaller
    widths = [len(idx) for idx in layout.token_indices]
    assert widths == [4 + 1] * 6 + [6 + 1 + 2] * 5 + [2]
    assert layout.token_groups == (0,) * 6 + (1,) * 5 + (2,)
    assert layout.num_groups == 3


def test_permuting_the_last_hidden_layer_permutes_its_neuron_tokens():
    from learned_opt import tasks

    task = tasks.get("mnist-mlp")
    layout = task.layout(scheme="neuron")
    flat = torch.randn(1, layout.num_params)
    perm = torch.randperm(10)
    tokens, permuted = layout.to_tokens(flat)[0], layout.to_tokens(task.permute(flat, [perm[None]]))[0]
    assert torch.equal(permuted[:10], tokens[perm]) and torch.equal(permuted[10], tokens[10])


def test_neuron_tokens_refuse_what_is_not_a_chain_of_layers():
    conv_mismatch = (("w", (4, 3, 3, 3)), ("b", (4,)), ("w2", (2, 6)), ("b2", (2,)))
    lone = (("w", (4, 3)), ("b", (4,)))
    linear_mismatch = (("w", (4, 3)), ("b", (4,)), ("w2", (2, 8)), ("b2", (2,)))  # a multiple only after a conv
    layernorm = (("w", (4, 3)), ("b", (4,)), ("ln.weight", (4,)), ("ln.bias", (4,)), ("w2", (2, 4)), ("b2", (2,)))
    for sig in [conv_mismatch, lone, linear_mismatch, layernorm]:
        with pytest.raises(ArchitectureMismatchError, match="chain of at least two linear or convolutional"):
            Layout(sig, scheme="neuron")
    with pytest.raises(ValueError, match="token scheme"):
        Layout(signature_of(mlp(3, 2)), scheme="rows")


def test_group_rms_ties_values_across_a_groups_tokens():
    layout = Layout.of(mlp(5, 7, 3), scheme="neuron")
    values = torch.rand(layout.num_params) + 0.1
    tied = layout.to_tokens(layout.group_rms(values))
    raw = layout.to_tokens(values)
    torch.testing.assert_close(tied[:7], raw[:7].square().mean(0, keepdim=True).sqrt().expand(7, -1))
    torch.testing.assert_close(tied[7], raw[7])  # a group of one is unchanged
    chunked = Layout.of(mlp(5, 7, 3), chunk_size=4)
    torch.testing.assert_close(chunked.group_rms(values), values)  # chunk tokens: every token its own group
