"""Property-based fuzzing of the files the package reads: a generator manifest and a store's
store.json. Every mutated document either loads or raises the package's own error (WeightsError,
StoreError): never another exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pretrained import _save

from learned_opt.errors import StoreError, WeightsError
from learned_opt.pretrained import LoadedGenerator, load_generator
from pretrain.store import STORE_FILE, Store

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    """Every key path into a JSON document (the root excluded)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _mutate(doc, data):
    """``doc`` with one value replaced, one key removed, or one number nudged, as ``data`` draws."""
    doc = json.loads(json.dumps(doc))
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "nudge"]))
    old = parent[path[-1]]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "nudge" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[path[-1]] = data.draw(st.sampled_from([old + 0.5, -old, old * 1000, 0, 10**9, float("nan")]))
    else:
        parent[path[-1]] = data.draw(JSON)
    return doc


@pytest.fixture(scope="module")
def generator_pair(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("fuzz-weights"))


@FUZZ
@given(data=st.data())
def test_mutated_manifests_load_or_raise_weights_error(generator_pair, data):
    original = json.loads(generator_pair.read_text())
    folder = generator_pair.parent / "mutated"
    folder.mkdir(exist_ok=True)
    weights = folder / original["weights_file"]
    if not weights.exists():
        shutil.copy(generator_pair.with_name(original["weights_file"]), weights)
    path = folder / "mnist-tiny.json"
    path.write_text(json.dumps(_mutate(original, data)))
    try:
        loaded = load_generator(path)
    except WeightsError:
        return
    assert isinstance(loaded, LoadedGenerator)


@FUZZ
@given(cut=st.integers(0, 4000), byte=st.integers(0, 255))
def test_damaged_manifest_bytes_load_or_raise_weights_error(generator_pair, cut, byte):
    text = bytearray(generator_pair.read_bytes())
    text[cut % len(text)] = byte
    folder = generator_pair.parent / "bytes"
    folder.mkdir(exist_ok=True)
    weights = folder / generator_pair.with_suffix(".safetensors").name
    if not weights.exists():
        shutil.copy(generator_pair.with_suffix(".safetensors"), weights)
    path = folder / "mnist-tiny.json"
    path.write_bytes(bytes(text))
    try:
        load_generator(path)
    except WeightsError:
        pass


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-store")
    Store.create(root, "mnist-mlp", settings={"seed": 0, "ranges": {"lr": [0.01, 0.3]}}).close()
    return root


@FUZZ
@given(data=st.data())
def test_mutated_store_json_opens_or_raises_store_error(store_root, data):
    original = json.loads((store_root / STORE_FILE).read_text())
    root = store_root / "mutated"
    root.mkdir(exist_ok=True)
    (root / STORE_FILE).write_text(json.dumps(_mutate(original, data)))
    try:
        store = Store.open(root)
    except StoreError:
        return
    assert store.num_params > 0 and len(store) == 0


@FUZZ
@given(cut=st.integers(0, 20000), byte=st.integers(0, 255))
def test_damaged_store_json_bytes_open_or_raise_store_error(store_root, cut, byte):
    text = bytearray((store_root / STORE_FILE).read_bytes())
    text[cut % len(text)] = byte
    root = store_root / "bytes"
    root.mkdir(exist_ok=True)
    (root / STORE_FILE).write_bytes(bytes(text))
    try:
        Store.open(root)
    except StoreError:
        pass


@pytest.fixture(scope="module")
def rule_pair(tmp_path_factory) -> Path:
    from learned_opt.lopt import hand_set_theta, save_rule

    folder = tmp_path_factory.mktemp("fuzz-rule")
    save_rule(folder, "lopt-tiny", hand_set_theta(), meta_training={"tasks": "none", "outer_steps": 0})
    return folder / "lopt-tiny.json"


def _rule_copy(pair: Path, sub: str) -> Path:
    folder = pair.parent / sub
    folder.mkdir(exist_ok=True)
    weights = folder / pair.with_suffix(".safetensors").name
    if not weights.exists():
        shutil.copy(pair.with_suffix(".safetensors"), weights)
    return folder / pair.name


@FUZZ
@given(data=st.data())
def test_mutated_learned_optimizer_manifests_load_or_raise_weights_error(rule_pair, data):
    from learned_opt.lopt import LoadedRule, load_rule

    path = _rule_copy(rule_pair, "mutated")
    path.write_text(json.dumps(_mutate(json.loads(rule_pair.read_text()), data)))
    try:
        loaded = load_rule(path)
    except WeightsError:
        return
    assert isinstance(loaded, LoadedRule) and all(v.isfinite().all() for v in loaded.theta.values())


@FUZZ
@given(cut=st.integers(0, 4000), byte=st.integers(0, 255))
def test_damaged_learned_optimizer_manifest_bytes_load_or_raise_weights_error(rule_pair, cut, byte):
    from learned_opt.lopt import load_rule

    text = bytearray(rule_pair.read_bytes())
    text[cut % len(text)] = byte
    path = _rule_copy(rule_pair, "bytes")
    path.write_bytes(bytes(text))
    try:
        load_rule(path)
    except WeightsError:
        pass
