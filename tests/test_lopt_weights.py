"""Learned-optimizer weights: save/load, the registry with both kinds, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from learned_opt import LearnedOptimizer, list_pretrained, pretrained
from learned_opt.errors import OptimizerStateError, WeightsError
from learned_opt.lopt import hand_set_theta, load_rule, save_rule
from learned_opt.lopt import weights as lopt_weights

META = {"tasks": "tests", "outer_steps": 0}


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_rule(tmp_path, "lopt-test", hand_set_theta(seed=3), meta_training=META)


def test_round_trip(saved):
    rule = load_rule(saved)
    ref = hand_set_theta(seed=3)
    assert rule.name == "lopt-test" and all(torch.equal(rule.theta[k], ref[k]) for k in ref)
    m = json.loads(saved.read_text())
    assert m["kind"] == "learned-optimizer" and m["meta_training"] == META and m["architecture"]["hidden"] == [32, 32]
    assert load_rule(saved.with_suffix(".safetensors")).sha256 == rule.sha256 == m["weights_sha256"]
    w = torch.ones(3, requires_grad=True)
    assert LearnedOptimizer([w], weights=str(saved)).rule.sha256 == rule.sha256


def test_the_same_weights_save_to_the_same_file(tmp_path):
    theta = hand_set_theta(seed=3)
    shas = {json.loads(save_rule(tmp_path / str(i), "lopt-test", theta, meta_training=META).read_text())["weights_sha256"]
            for i in range(8)}
    assert len(shas) == 1


def test_a_state_loads_wherever_the_same_weights_do(saved):
    """An optimizer's state names its weights by their content: the same weights from a file, from a
    dict or from another save of them take it; other weights do not."""
    model = torch.nn.Linear(3, 2)
    opt = LearnedOptimizer(model.parameters(), weights=str(saved))
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for weights in (hand_set_theta(seed=3), load_rule(saved), str(saved)):
        LearnedOptimizer(model.parameters(), weights=weights).load_state_dict(state)
    legacy = {**state, "rule_sha256": load_rule(saved).sha256}  # as saved before: the file's sha256
    LearnedOptimizer(model.parameters(), weights=str(saved)).load_state_dict(legacy)
    with pytest.raises(OptimizerStateError, match="load the same weights first"):
        LearnedOptimizer(model.parameters(), weights=hand_set_theta(seed=4)).load_state_dict(state)


def test_registry_lists_both_kinds(saved, monkeypatch):
    folder = Path(pretrained._weights_dir())
    for f in folder.iterdir():
        (saved.parent / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(pretrained, "_weights_dir", lambda: saved.parent)
    monkeypatch.setattr(lopt_weights, "_weights_dir", lambda: saved.parent)
    rows = {r["name"]: r for r in list_pretrained()}
    assert rows["lopt-test"]["kind"] == "learned-optimizer" and "tests" in rows["lopt-test"]["task"]
    assert rows["lopt-test"]["architecture"]["num_tensors"] == 6
    for n, r in rows.items():  # the shipped generators, and any shipped learned optimizer, with their own kind
        kind = json.loads((saved.parent / f"{n}.json").read_text()).get("kind", "generator")
        assert r["kind"] == kind
    assert {r["kind"] for r in rows.values()} == {"generator", "learned-optimizer"}
    assert load_rule("lopt-test").name == "lopt-test"
    with pytest.raises(WeightsError, match="shipped: .*lopt-test"):
        load_rule("nope")


def test_generator_manifest_refused():
    generator = Path(pretrained._weights_dir()) / "mnist-mlp.json"
    with pytest.raises(WeightsError, match="generator's manifest.*GptOptimizer"):
        LearnedOptimizer([torch.ones(2, requires_grad=True)], weights=str(generator))


def _edit(path: Path, **changes) -> None:
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("damage", ["hash", "truncated", "features", "hidden", "version", "json", "escape"])
def test_bad_files_raise_weights_error(saved, damage):
    weights = saved.with_suffix(".safetensors")
    if damage == "hash":
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 1
        weights.write_bytes(bytes(blob))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "features":
        _edit(saved, features={"betas": [0.9]})
    elif damage == "hidden":
        _edit(saved, architecture={"hidden": [10**9]})
    elif damage == "version":
        _edit(saved, format_version=99)
    elif damage == "json":
        saved.write_text("{not json")
    else:
        _edit(saved, weights_file="../x.safetensors")
    with pytest.raises(WeightsError):
        load_rule(saved)


def test_nan_weights_refused_on_save(tmp_path):
    bad = {k: v.clone() for k, v in hand_set_theta().items()}
    bad["b0"][0] = float("nan")
    with pytest.raises(WeightsError, match="NaN"):
        save_rule(tmp_path, "x", bad, meta_training=META)
    assert not list(tmp_path.iterdir())


def test_learned_optimizer_given_to_load_generator(saved):
    from learned_opt import load_generator

    with pytest.raises(WeightsError, match="learned optimizer's weights.*LearnedOptimizer"):
        load_generator(saved)


def test_hand_set_by_name():
    rule = load_rule("hand-set")
    assert rule.name == "hand-set" and torch.equal(rule.theta["w0"], hand_set_theta()["w0"])


def test_shipped_rule_is_the_default_and_trains():
    rows = [r for r in list_pretrained() if r["kind"] == "learned-optimizer"]
    if not rows:
        pytest.skip("no learned optimizer shipped")
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = LearnedOptimizer(model.parameters())
    assert opt.rule.name == lopt_weights.SHIPPED and opt.rule.sha256 == rows[0]["sha256"]
    first = None
    for _ in range(200):  # fitting 64 random labels: Adam(1e-3) takes the loss from 1.14 to 0.78 here
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.8 * first
