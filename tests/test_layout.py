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
