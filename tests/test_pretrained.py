"""The weights format: save/load round trip, the registry, and every way a weights file can be bad."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from learned_opt import pretrained, tasks
from learned_opt.diffusion import DiffusionConfig
from learned_opt.errors import WeightsError
from learned_opt.generator import build_generator
from learned_opt.normalization import Normalization
from learned_opt.pretrained import (
    MANIFEST_FORMAT_VERSION,
    LoadedGenerator,
    list_pretrained,
    load_generator,
    save_generator,
    sha256_file,
)

NORM = Normalization.from_stats(0.1, 0.0, 2.5)
DIFF = DiffusionConfig(num_steps=100)


def _save(folder: Path, name: str = "mnist-tiny", perturb: bool = True) -> Path:
    torch.manual_seed(0)
    model = build_generator(tasks.get("mnist-mlp").layout(), "tiny")
    if perturb:
        with torch.no_grad():
            model.decoder.bias.normal_(0, 0.01)
    return save_generator(
        folder, name, model, DIFF, NORM, task="mnist-mlp", metric="test_loss", best_prompt=0.0,
        corpus={"runs": 3}, training={"epochs": 1}, extra={"note": "test"},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def copy_of(saved, tmp_path):
    """A fresh copy of the saved pair, safe to damage."""
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"mnist-tiny{suffix}").write_bytes(saved.with_suffix(suffix).read_bytes())
    return tmp_path / "mnist-tiny.json"


def test_save_writes_manifest_with_every_field(saved):
    m = json.loads(saved.read_text())
    for key in pretrained.REQUIRED_KEYS + ("corpus", "training", "created", "package_version", "extra"):
        assert key in m, key
    assert m["format_version"] == 1  # chunk tokens: readable by releases before neuron tokens
    assert m["num_params"] == 7960 and m["metric_direction"] == "min"
    assert m["metric_range"] == [0.0, 2.5] and m["tokenisation"] == {"scheme": "chunk", "chunk_size": 1000, "num_tokens": 11}
    assert m["weights_sha256"] == sha256_file(saved.with_name(m["weights_file"]))
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_same_weights_and_samples(saved):
    a = load_generator(saved)
    b = load_generator(saved.with_suffix(".safetensors"))
    assert load_generator(a) is a
    assert a.sha256 == b.sha256 and a.metric_name == "test_loss" and a.metric_range == (0.0, 2.5)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    theta = torch.randn(2, 7960) * 0.1
    metric, prompt = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.5])
    sa = a.sample(theta, metric, prompt, steps=3, generator=torch.Generator().manual_seed(1))
    sb = b.sample(theta, metric, prompt, steps=3, generator=torch.Generator().manual_seed(1))
    assert sa.shape == (2, 7960) and torch.equal(sa, sb) and not torch.equal(sa, theta)


def test_untrained_generator_returns_theta(tmp_path):
    gen = load_generator(_save(tmp_path, perturb=False))
    theta = torch.randn(1, 7960) * 0.05
    out = gen.sample(theta, torch.tensor([1.0]), torch.tensor([0.0]), steps=2, generator=torch.Generator())
    torch.testing.assert_close(out, theta)


def test_registry_lists_and_loads_by_name(saved, monkeypatch):
    monkeypatch.setattr(pretrained, "_weights_dir", lambda: saved.parent)
    (listed,) = list_pretrained()
    assert listed["name"] == "mnist-tiny" and listed["task"] == "mnist-mlp" and listed["metric"] == "test_loss"
    assert listed["architecture"]["num_params"] == 7960 and "fc1.weight[10, 784]" in listed["architecture"]["signature"]
    assert listed["sha256"] == load_generator("mnist-tiny").sha256


def test_unknown_name_lists_known_ones(saved, monkeypatch):
    monkeypatch.setattr(pretrained, "_weights_dir", lambda: saved.parent)
    with pytest.raises(WeightsError, match="unknown generator 'nope'.*mnist-tiny"):
        load_generator("nope")


def _check_registry_folder(folder) -> None:
    """``list_pretrained`` lists exactly the folder's manifests, each beside a weights file whose
    sha256 matches (without reading a manifest twice or skipping one with a warning)."""
    manifests = sorted(e.name for e in folder.iterdir() if e.name.endswith(".json")) if folder.is_dir() else []
    listed = list_pretrained()
    assert sorted(f"{g['name']}.json" for g in listed) == manifests
    for g in listed:
        m = json.loads((folder / f"{g['name']}.json").read_text(encoding="utf-8"))
        weights = folder / m["weights_file"]
        assert weights.is_file(), f"{g['name']}: weights file {m['weights_file']} is missing"
        assert pretrained.sha256_bytes(weights.read_bytes()) == g["sha256"], f"{g['name']}: sha256 mismatch"


def test_shipped_generators_are_complete_and_all_listed():
    _check_registry_folder(pretrained._weights_dir())


def test_registry_folder_check_catches_bad_entries(copy_of, monkeypatch):
    monkeypatch.setattr(pretrained, "_weights_dir", lambda: copy_of.parent)
    _check_registry_folder(copy_of.parent)
    _corrupt(copy_of)
    with pytest.raises(AssertionError, match="sha256 mismatch"):
        _check_registry_folder(copy_of.parent)
    _bad_json(copy_of)  # skipped by list_pretrained with a warning: no longer listed
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(AssertionError):
        _check_registry_folder(copy_of.parent)


# ---------------------------------------------------------------------- bad files


def _rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def _corrupt(p: Path) -> None:
    data = bytearray(p.with_suffix(".safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.with_suffix(".safetensors").write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    w = p.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:1000])


def _wrong_hash(p: Path) -> None:
    _rewrite_manifest(p, weights_sha256="0" * 64)


def _wrong_version(p: Path) -> None:
    _rewrite_manifest(p, format_version=MANIFEST_FORMAT_VERSION + 1)


def _nan_weights(p: Path) -> None:
    """NaN inside a well-formed file whose hash the manifest matches: only the NaN check can catch it."""
    w = p.with_suffix(".safetensors")
    tensors = load_generator(p).model.state_dict()
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}
    tensors["decoder.bias"][0, 0] = float("nan")
    save_file(tensors, str(w))
    _rewrite_manifest(p, weights_sha256=sha256_file(w))


def _missing_weights(p: Path) -> None:
    p.with_suffix(".safetensors").unlink()


def _bad_json(p: Path) -> None:
    p.write_text("{not json")


def _missing_key(p: Path) -> None:
    m = json.loads(p.read_text())
    del m["signature"]
    p.write_text(json.dumps(m))


def _garbage_with_matching_hash(p: Path) -> None:
    w = p.with_suffix(".safetensors")
    w.write_bytes(struct.pack("<Q", 10**9) + b"junk")
    _rewrite_manifest(p, weights_sha256=sha256_file(w))


def _wrong_config(p: Path) -> None:
    m = json.loads(p.read_text())
    m["model_config"]["d_model"] = 64
    p.write_text(json.dumps(m))


def _bad_sampling(p: Path) -> None:
    _rewrite_manifest(p, sampling={"method": "ddim", "steps": 4, "t_min": 5000})


@pytest.mark.parametrize(
    "damage, message",
    [
        (_bad_sampling, "does not fit"),
        (lambda p: _rewrite_manifest(p, sampling={"t-min": 300}), "unknown keys"),
        (lambda p: _rewrite_manifest(p, sampling={"steps": 1, "t_min": 30}), "one step"),
        (_corrupt, "sha256"),
        (_truncate, "sha256"),
        (_wrong_hash, "sha256"),
        (_wrong_version, "format_version"),
        (_nan_weights, "NaN"),
        (_missing_weights, "missing"),
        (_bad_json, "not valid JSON"),
        (_missing_key, "lacks"),
        (_garbage_with_matching_hash, "safetensors"),
        (_wrong_config, "does not match"),
    ],
)
def test_bad_files_raise_weights_error_and_change_nothing(copy_of, damage, message):
    damage(copy_of)
    before = {p.name: p.read_bytes() for p in copy_of.parent.iterdir()}
    with pytest.raises(WeightsError, match=message):
        load_generator(copy_of)
    assert {p.name: p.read_bytes() for p in copy_of.parent.iterdir()} == before


def test_hash_checked_before_parsing(copy_of, monkeypatch):
    import safetensors.torch

    _corrupt(copy_of)
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: pytest.fail("parsed before the hash check"))
    with pytest.raises(WeightsError, match="sha256"):
        load_generator(copy_of)


def test_never_calls_torch_load(saved, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert isinstance(load_generator(saved), LoadedGenerator)


def test_missing_manifest_and_bad_source(tmp_path):
    with pytest.raises(WeightsError, match="no generator manifest"):
        load_generator(tmp_path / "absent.json")
    with pytest.raises(WeightsError, match="cannot load a generator from int"):
        load_generator(3)


def test_save_refuses_nan_and_bad_names(tmp_path):
    model = build_generator(tasks.get("mnist-mlp").layout(), "tiny")
    kw = dict(task="mnist-mlp", metric="test_loss", best_prompt=0.0, corpus={}, training={})
    with pytest.raises(ValueError, match="invalid generator name"):
        save_generator(tmp_path, "../x", model, DIFF, NORM, **kw)
    with torch.no_grad():
        model.decoder.bias.fill_(float("nan"))
    with pytest.raises(WeightsError, match="non-finite"):
        save_generator(tmp_path, "nan", model, DIFF, NORM, **kw)
    assert list(tmp_path.iterdir()) == []


def test_load_to_device_and_overwrite(tmp_path):
    first = _save(tmp_path)
    sha = json.loads(first.read_text())["weights_sha256"]
    torch.manual_seed(1)
    model = build_generator(tasks.get("mnist-mlp").layout(), "tiny")
    save_generator(tmp_path, "mnist-tiny", model, DIFF, NORM, task="mnist-mlp", metric="test_loss",
                   best_prompt=0.0, corpus={}, training={})
    gen = load_generator(first, device="cpu")
    assert gen.sha256 != sha and gen.device.type == "cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-tiny.json", "mnist-tiny.safetensors"]


def test_summaries_are_made_json_or_refused_before_writing(tmp_path):
    model = build_generator(tasks.get("mnist-mlp").layout(), "tiny")
    kw = dict(task="mnist-mlp", metric="test_loss", best_prompt=0.0, training={"loss": torch.tensor(0.5)})
    path = save_generator(tmp_path, "ok", model, DIFF, NORM, corpus={"root": tmp_path}, **kw)
    m = json.loads(path.read_text())
    assert m["corpus"] == {"root": str(tmp_path)} and m["training"] == {"loss": 0.5}
    with pytest.raises(TypeError, match="JSON-able"):
        save_generator(tmp_path / "bad", "bad", model, DIFF, NORM, corpus={"x": object()}, **kw)
    assert not (tmp_path / "bad" / "bad.safetensors").exists()


def test_shipped_cartpole_generator_loads_and_makes_an_update():
    """The shipped ``cartpole-mlp`` generator: its manifest, and a short update of two fresh policies."""
    from learned_opt import tasks

    gen = load_generator("cartpole-mlp")
    assert (gen.task, gen.metric_name, gen.best_prompt) == ("cartpole-mlp", "return", 500.0)
    assert gen.manifest["training"]["complete"] and gen.manifest["corpus"]["runs_total"] >= 1000
    task = tasks.get("cartpole-mlp")
    theta = torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(2)])
    before = theta.clone()
    out = gen.sample(theta, torch.tensor([9.0, 20.0]), torch.full((2,), 500.0), steps=5,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == theta.shape and torch.isfinite(out).all()
    assert torch.equal(theta, before)  # the input is not modified
    assert (out - theta).norm(dim=1).min() > 0.1  # a real update, not the identity


def test_shipped_mnist_generator_loads_and_makes_an_update():
    """The shipped ``mnist-mlp`` generator: its manifest, and a short update of two fresh networks."""
    from learned_opt import tasks

    gen = load_generator("mnist-mlp")
    assert (gen.task, gen.metric_name) == ("mnist-mlp", "test_loss")
    assert gen.layout.scheme == "neuron" and gen.manifest["format_version"] == 2
    assert gen.manifest["training"]["complete"]
    # trained on the full corpus, or fine-tuned from (a fine-tune of) a generator that was: each
    # fine-tune records the generator it started from, with that one's corpus and training
    runs, record = [gen.manifest["corpus"]["runs_total"]], gen.manifest["training"]
    while record.get("init_from"):
        runs.append(record["init_from"]["corpus"]["runs_total"])
        record = record["init_from"]["training"]
    assert max(runs) >= 1000
    task = tasks.get("mnist-mlp")
    theta = torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(2)])
    before = theta.clone()
    out = gen.sample(theta, torch.tensor([2.3, 2.3]), torch.full((2,), gen.best_prompt), steps=5,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == theta.shape and torch.isfinite(out).all()
    assert torch.equal(theta, before)
    assert (out - theta).norm(dim=1).min() > 0.1  # a real update, not the identity


def test_manifest_sampling_entry_sets_the_default_sampler(copy_of, monkeypatch):
    assert load_generator(copy_of).sampling == {"method": "ddim", "steps": 50, "t_min": 0, "guidance": 1.0,
                                                "temperature": 1.0, "guidance_taper": False}  # none recorded
    _rewrite_manifest(copy_of, sampling={"method": "dpm++2m", "steps": 4, "t_min": 30, "chosen_by": "a sweep"})
    gen = load_generator(copy_of)
    assert gen.sampling == {"method": "dpm++2m", "steps": 4, "t_min": 30, "guidance": 1.0, "temperature": 1.0,
                            "guidance_taper": False}
    seen = []
    sample = gen.diffusion.sample
    monkeypatch.setattr(gen.diffusion, "sample", lambda *a, **kw: seen.append(kw) or sample(*a, **kw))
    theta = torch.randn(2, gen.layout.num_params, generator=torch.Generator().manual_seed(0))
    gen.sample(theta, torch.ones(2), torch.zeros(2), generator=torch.Generator().manual_seed(1))
    gen.sample(theta, torch.ones(2), torch.zeros(2), steps=2, generator=torch.Generator().manual_seed(1))
    assert [(kw["method"], kw["steps"], kw["t_min"]) for kw in seen] == [("dpm++2m", 4, 30), ("dpm++2m", 2, 30)]


def test_a_fine_tunes_lineage_is_written_on_one_line_and_reads_back_the_same():
    from learned_opt.saving import manifest_json

    lineage = None
    for generation in range(30):  # each fine-tune holds its source's record, one level deeper
        lineage = {"name": f"g{generation}", "training": {"steps": generation, "init_from": lineage}}
    manifest = {"name": "g", "training": {"steps": 1, "init_from": lineage}, "sampling": {"method": "ddim"}}
    text = manifest_json(manifest)
    assert json.loads(text) == manifest
    assert len(text) < 1.3 * len(json.dumps(manifest))  # indentation no longer grows with the generations
    assert manifest_json({"name": "g", "training": {"steps": 1}}) == json.dumps(
        {"name": "g", "training": {"steps": 1}}, indent=2) + "\n"
