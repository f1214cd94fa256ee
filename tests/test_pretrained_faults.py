"""Hostile and damaged generator manifests: each refused with one WeightsError before anything
large is allocated, never another exception."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from test_pretrained import copy_of, saved  # noqa: F401 - the fixtures: a saved tiny generator, a copy

from learned_opt import manifest as manifest_module
from learned_opt.errors import WeightsError
from learned_opt.pretrained import load_generator


def _edit(path: Path, edit) -> None:
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _set(*keys, value):
    def edit(m):
        target = m
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set("tokenisation", value="chunk"), "tokenisation must be an object"),
        (_set("best_prompt", value="abc"), "best_prompt must be a finite number"),
        (_set("weights_file", value="mnist-tiny\0.safetensors"), "weights_file must be a non-empty string without NUL"),
        (_set("corpus", value={"split": {"train": [1, "2"], "heldout": []}}), "corpus.split.train must be a list of run ids"),
        (_set("corpus", value={"split": {"train": [1.5]}}), "corpus.split.train"),
        (_set("format_version", value=True), "format_version True"),
        (_set("signature", value=[["fc1.weight", [10, 784]], ["fc1.bias", [10.5]],
                                  ["fc2.weight", [10, 10]], ["fc2.bias", [10]]]), "positive integers"),
        (_set("tokenisation", "num_tokens", value=12), "num_tokens = 12.*give 11"),
        (_set("metric_direction", value="sideways"), "metric_direction must be 'min' or 'max'"),
        (_set("metric_range", value=[1, "x"]), "metric_range"),
        (_set("normalization", value={"param_scale": "x", "metric_lo": 0, "metric_hi": 1}), "normalization.param_scale"),
        (_set("model_config", "n_layers", value=2.5), "n_layers must be an integer"),
        (_set("model_config", "metric_max_log2_frequency", value=10**30), "metric_max_log2_frequency must be a number in"),
        (_set("model_config", "metric_max_log2_frequency", value=200.0), "metric_max_log2_frequency must be a number in"),
        (_set("diffusion_config", "num_steps", value=10**9), "num_steps must be an integer in"),
        (_set("num_params", value="abc"), "num_params must be an integer"),
        (_set("weights_sha256", value=5), "weights_sha256"),
        (_set("name", value=["x"]), "name must be a non-empty string"),
    ],
)
def test_a_bad_manifest_field_is_one_weights_error(copy_of, edit, message):
    _edit(copy_of, edit)
    with pytest.raises(WeightsError, match=message):
        load_generator(copy_of)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def _refused(path) -> None:
    with pytest.raises(WeightsError):
        load_generator(path)


def test_a_deeper_model_than_the_weights_is_refused_before_it_is_built(copy_of):
    _edit(copy_of, _set("model_config", "n_layers", value=200))
    assert _peak_mib(lambda: _refused(copy_of)) < 50
    with pytest.raises(WeightsError, match="n_layers is 200, the weights have 2 blocks"):
        load_generator(copy_of)


def test_a_wider_mlp_than_the_weights_is_refused_before_it_is_built(copy_of):
    _edit(copy_of, _set("model_config", "mlp_ratio", value=60.0))
    with pytest.raises(WeightsError, match=r"gives MLPs \[1920, 32\], the file \[128, 32\]"):
        load_generator(copy_of)


def test_a_widened_signature_is_refused_without_a_memory_error(copy_of):
    def widen(m):
        m["signature"][0][1] = [10, 2_000_000]
        m["num_params"] = 10 * 2_000_000 + 7960 - 7840
    _edit(copy_of, widen)
    assert _peak_mib(lambda: _refused(copy_of)) < 50
    with pytest.raises(WeightsError, match="num_params must be an integer in"):
        load_generator(copy_of)


def test_a_signature_that_does_not_fit_the_weights_is_refused_before_building(copy_of):
    def reshape(m):  # same parameter count, other tokens
        m["signature"] = [["a", [7960]]]
        m["tokenisation"].pop("num_tokens")
    _edit(copy_of, reshape)
    with pytest.raises(WeightsError, match="token encoders"):
        load_generator(copy_of)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_weights_file_that_is_a_symlink_to_dev_zero_is_refused(copy_of):
    weights = copy_of.with_suffix(".safetensors")
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(WeightsError, match="not a regular file"):
        load_generator(copy_of)


def test_a_weights_file_that_is_a_folder_or_fifo_is_refused(copy_of):
    weights = copy_of.with_suffix(".safetensors")
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(WeightsError, match="not a regular file"):
        load_generator(copy_of)
    weights.unlink()
    weights.mkdir()
    with pytest.raises(WeightsError, match="not a regular file"):
        load_generator(copy_of)


def test_a_manifest_that_is_a_device_or_too_large_is_refused(tmp_path, monkeypatch):
    link = tmp_path / "g.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(WeightsError, match="no generator manifest|not a regular file"):
        load_generator(link)
    big = tmp_path / "big.json"
    big.write_text(" " * 2048)
    monkeypatch.setattr("learned_opt.pretrained.MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(WeightsError, match="more than the 1024"):
        load_generator(big)


def test_a_symlink_to_a_real_weights_file_still_loads(copy_of, tmp_path):
    weights = copy_of.with_suffix(".safetensors")
    real = tmp_path / "elsewhere.bin"
    weights.rename(real)
    weights.symlink_to(real)
    assert load_generator(copy_of).layout.num_params == 7960


def test_bounds_are_above_the_shipped_generators():
    from learned_opt.pretrained import list_pretrained

    for g in (g for g in list_pretrained() if g["kind"] == "generator"):  # learned optimizers: test_lopt_weights
        load_generator(g["name"])  # the shipped generators keep loading
        assert g["architecture"]["num_params"] <= manifest_module.MAX_NETWORK_PARAMS
