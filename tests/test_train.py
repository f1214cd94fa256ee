"""Generator training: exact resume, bad input that loses nothing, export, schedule, EMA, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
from train_helpers import file_hash, make_store, state_hash, tiny_config

from learned_opt import cli
from learned_opt.errors import ConfigError, DataNotFoundError, StoreError, TrainingError, WeightsError
from learned_opt.diffusion import Diffusion
from learned_opt.layout import Layout
from learned_opt.pretrained import load_generator, sha256_file
from pretrain.dataset import PairDataset
from pretrain.store import RunRecord, Store
from pretrain.train import (
    CHECKPOINT_NAME,
    LOG_NAME,
    Ema,
    TrainConfig,
    export_checkpoint,
    load_checkpoint,
    lr_factor,
    train,
)
from pretrain.train import finetune, optim, outputs

TIMING_KEYS = {"samples_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "store"
    make_store(root, runs=4, checkpoints=5)
    return root


tiny = tiny_config


def log_without_timing(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in outputs.read_jsonl(out / LOG_NAME)]


def assert_same_training_state(a, b) -> None:
    """Checkpoints ``a`` and ``b`` hold bitwise identical model, EMA, optimizer and schedule."""
    sa, sb = load_checkpoint(a / CHECKPOINT_NAME), load_checkpoint(b / CHECKPOINT_NAME)
    assert sa["step"] == sb["step"]
    for key in ("model", "ema"):
        assert sa[key].keys() == sb[key].keys()
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key}.{name} differs"
    for pid, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][pid][k]), f"optimizer state {pid}.{k} differs"
    assert sa["scheduler"] == sb["scheduler"]


# ------------------------------------------------------------------------------ exact resume


@pytest.fixture(scope="module")
def straight(store_dir, tmp_path_factory):
    """An uninterrupted 6-step run (shared by the resume tests)."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    result = train(tiny(store_dir, out))
    return out, result


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(store_dir, straight, tmp_path):
    out, result = straight
    first = train(tiny(store_dir, tmp_path, stop_after=3))
    assert first.step == 3 and any("--resume" in n for n in first.notes)
    resumed = train(tiny(store_dir, tmp_path, resume=True))
    assert resumed.step == 6
    assert state_hash(resumed.model) == state_hash(result.model)
    assert state_hash(resumed.ema) == state_hash(result.ema)
    assert_same_training_state(out, tmp_path)
    assert log_without_timing(tmp_path) == log_without_timing(out)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["commands"][-1]


def test_killed_run_resumes_from_its_last_checkpoint_and_equals_an_uninterrupted_one(
    store_dir, straight, tmp_path, monkeypatch
):
    out, _ = straight
    calls, original = [0], PairDataset.batch

    def dies_at_step_5(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # steps 1-3, the held-out batch at step 3, step 4, then step 5
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PairDataset, "batch", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(store_dir, tmp_path))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3
    assert max(r["step"] for r in outputs.read_jsonl(tmp_path / LOG_NAME)) == 4  # logged past the checkpoint
    monkeypatch.setattr(PairDataset, "batch", original)
    train(tiny(store_dir, tmp_path, resume=True))
    assert_same_training_state(out, tmp_path)
    assert log_without_timing(tmp_path) == log_without_timing(out)  # no step logged twice


def test_checkpoint_is_plain_tensors_and_containers(straight):
    out, _ = straight
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "rng", "config", "corpus", "normalization"} <= set(state)
    assert state["corpus"]["split"]["train"] and state["step"] == 6
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_training_leaves_the_callers_global_rng_alone(store_dir, tmp_path):
    torch.manual_seed(1234)
    cpu = torch.get_rng_state()
    train(tiny(store_dir, tmp_path, steps=2, checkpoint_every=2))
    assert torch.equal(torch.get_rng_state(), cpu)


def test_log_and_plot_rewrites_that_fail_keep_the_old_files_and_leave_no_temporary_file(tmp_path, monkeypatch):
    log, png = tmp_path / LOG_NAME, tmp_path / "loss.png"
    for step in (1, 2, 3):
        outputs.append_jsonl(log, {"step": step, "loss": 1.0 / step})
    png.write_bytes(b"old picture")
    before = log.read_bytes()

    def refuse(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="no space"):
        outputs.truncate_log(log, 2)
    with pytest.raises(OSError, match="no space"):
        outputs.plot_losses(log, png)
    assert log.read_bytes() == before and png.read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOG_NAME, "loss.png"])
    monkeypatch.undo()
    outputs.truncate_log(log, 2)
    assert [r["step"] for r in outputs.read_jsonl(log)] == [1, 2]
    assert outputs.plot_losses(log, png) is None and png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOG_NAME, "loss.png"])


# ------------------------------------------------------------------------------ bad input loses nothing


def test_a_second_job_on_one_training_folder_is_refused(store_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    holder = subprocess.Popen(  # another process holding the folder, as a running job does
        [sys.executable, "-c", "import sys; from pathlib import Path; from pretrain.store_lock import acquire_writer; "
         "acquire_writer(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=f"another process \\(pid {holder.pid}\\) is writing the training folder"):
            train(tiny(store_dir, tmp_path, steps=2))
        assert not (tmp_path / LOG_NAME).exists()  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert train(tiny(store_dir, tmp_path, steps=2)).step == 2  # the lock went with the process


def test_a_resume_on_a_store_built_with_other_settings_is_refused(tmp_path):
    same, other = make_store(tmp_path / "a"), make_store(tmp_path / "b")  # the same runs, as far as ids go
    for store, seed in ((same, 0), (other, 1)):
        store.record_settings({"seed": seed, "epochs": None})
    train(tiny(tmp_path / "a", tmp_path / "run", stop_after=2))
    with pytest.raises(StoreError, match="built with other settings"):
        train(tiny(tmp_path / "b", tmp_path / "run", resume=True))
    assert train(tiny(tmp_path / "a", tmp_path / "run", resume=True)).step == 6


def test_existing_checkpoint_without_resume_is_refused_and_kept(store_dir, straight):
    out, _ = straight
    before = {p.name: file_hash(p) for p in out.iterdir()}
    with pytest.raises(TrainingError, match="pass --resume"):
        train(tiny(store_dir, out))
    assert {p.name: file_hash(p) for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"preset": "small"}, "preset='tiny' \\(asked: 'small'\\)"),
        ({"chunk_size": 500}, "chunk_size=1000 \\(asked: 500\\)"),
        ({"metric": "train_loss"}, "metric='test_loss' \\(asked: 'train_loss'\\)"),
        ({"task": "cartpole-mlp"}, "task='mnist-mlp'"),
        ({"lr": 1e-3}, "lr=0.0004"),
    ],
)
def test_resume_with_another_configuration_is_refused_and_changes_nothing(store_dir, straight, change, message):
    out, _ = straight
    before = {p.name: file_hash(p) for p in out.iterdir()}
    with pytest.raises(TrainingError, match=message):
        train(tiny(store_dir, out, resume=True, steps=8, **change))
    assert {p.name: file_hash(p) for p in out.iterdir()} == before


def test_bad_stores_are_refused_before_anything_is_written(store_dir, tmp_path):
    make_store(tmp_path / "cp", task="cartpole-mlp", runs=2, checkpoints=3)
    with pytest.raises(StoreError, match="holds runs of task 'cartpole-mlp', not 'mnist-mlp'"):
        train(tiny(tmp_path / "cp", tmp_path / "a", task="mnist-mlp"))
    from pretrain.store import Store

    Store.create(tmp_path / "empty", "mnist-mlp")
    with pytest.raises(StoreError, match="holds no runs"):
        train(tiny(tmp_path / "empty", tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_run_file_on_resume_keeps_the_checkpoint(tmp_path):
    store = make_store(tmp_path / "s", runs=3, checkpoints=4)
    out = tmp_path / "out"
    train(tiny(tmp_path / "s", out, stop_after=3))
    before = {p.name: file_hash(p) for p in out.iterdir()}
    path = store.run_path(store.run_ids()[0])
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(StoreError, match="is truncated"):
        train(tiny(tmp_path / "s", out, resume=True))
    assert {p.name: file_hash(p) for p in out.iterdir()} == before


def test_corrupt_checkpoint_is_refused(store_dir, tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="corrupt"):
        train(tiny(store_dir, tmp_path, resume=True))
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize(
    "change",
    [{"batch_size": 0}, {"preset": "huge"}, {"lr": -1.0}, {"ema_decay": 1.0}, {"store": ""},
     {"heldout_fraction": 1.0}, {"device": "tpu:0"}, {"workers": -3}, {"workers": 10 ** 6}] + ([] if torch.cuda.is_available() else [{"device": "cuda"}]),
)
def test_invalid_settings_are_refused(store_dir, tmp_path, change):
    with pytest.raises(ConfigError):
        train(tiny(store_dir, tmp_path, **change))


# ------------------------------------------------------------------------------ export


def test_export_writes_the_ema_weights_with_a_complete_manifest(store_dir, straight, tmp_path):
    out, result = straight
    manifest_path = export_checkpoint(out / CHECKPOINT_NAME, tmp_path, name="probe")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["weights_sha256"] == sha256_file(tmp_path / "probe.safetensors")
    assert manifest["task"] == "mnist-mlp" and manifest["metric"] == "test_loss"
    assert manifest["corpus"]["runs_train"] + manifest["corpus"]["runs_heldout"] == 4
    assert manifest["training"]["steps"] == 6 and manifest["training"]["weights"] == "ema"
    assert manifest["training"]["final_loss"] == pytest.approx(result.last["loss"])
    assert manifest["tokenisation"] == {"scheme": "chunk", "chunk_size": 1000, "num_tokens": 11}
    loaded = load_generator(manifest_path)
    assert state_hash(loaded.model) == state_hash(result.ema) != state_hash(result.model)
    lo, hi = loaded.metric_range
    assert lo < hi and loaded.normalization.param_scale > 0
    assert loaded.best_prompt == lo > 0  # a loss of 0 is the ideal; the best prompt is the best the corpus saw
    theta = torch.randn(2, 7960) * 0.1
    gen = torch.Generator().manual_seed(0)
    new = loaded.sample(theta, torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5]), steps=2, generator=gen)
    assert new.shape == theta.shape and torch.isfinite(new).all()


def test_training_to_the_end_exports_and_export_only_reproduces_it(store_dir, tmp_path):
    cfg = tiny(store_dir, tmp_path, steps=2, log_every=1, checkpoint_every=2, export=True, name="end")
    result = train(cfg)
    assert result.manifest == tmp_path / "end.json" and (tmp_path / "loss.png").stat().st_size > 0
    first = json.loads(result.manifest.read_text())["weights_sha256"]
    (tmp_path / "end.safetensors").unlink()
    assert cli.main(["train", "--out", str(tmp_path), "--export-only", "--name", "end"]) == 0
    assert json.loads((tmp_path / "end.json").read_text())["weights_sha256"] == first


# ------------------------------------------------------------------------------ pieces


def test_lr_warms_up_linearly_then_follows_a_cosine():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[20] == pytest.approx(0.1) and f[12] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_optimizer_decays_matrices_only(store_dir):
    from learned_opt.generator import build_generator
    from learned_opt.layout import Layout
    from pretrain.store import Store

    model = build_generator(Layout(Store.open(store_dir).signature), "tiny")
    opt, sched = optim.make_optimizer(model, tiny(store_dir, "unused", steps=10))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.param_groups[0]["lr"] == pytest.approx(4e-4 * 0.5)  # first warmup step of 2


def test_ema_ramps_in_and_follows_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = Ema(model, decay=0.9999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**7) == 0.9999
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)
    d = ema.decay_at(1)
    torch.testing.assert_close(ema.module.weight, d * before + (1 - d) * model.weight)
    assert not ema.module.weight.requires_grad


@pytest.mark.slow
def test_training_lowers_the_diffusion_loss(store_dir, tmp_path):
    cfg = tiny(store_dir, tmp_path, steps=120, batch_size=8, lr=2e-3, warmup=10, log_every=20,
               eval_every=120, checkpoint_every=120)
    train(cfg)
    log = outputs.read_jsonl(tmp_path / LOG_NAME)
    assert log[-1]["loss"] < 0.85 * log[0]["loss"], [r["loss"] for r in log]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_command_line_resume_takes_the_checkpoints_settings(store_dir, tmp_path, capsys):
    args = ["train", "--store", str(store_dir), "--out", str(tmp_path), "--steps", "4", "--batch-size", "4",
            "--warmup", "1", "--log-every", "2", "--checkpoint-every", "2", "--diffusion-steps", "50",
            "--no-export", "--stop-after", "2", "--no-progress"]
    assert cli.main(args) == 0
    assert "train:" not in capsys.readouterr().err  # no progress bar
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # as written when --workers took any negative
    state["config"] = {**state["config"], "workers": -3}
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    assert cli.main(["train", "--store", str(store_dir), "--out", str(tmp_path), "--resume"]) == 0
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 4
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--preset", "small"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("learned-opt train: error: cannot resume") and "preset='tiny'" in err


def test_config_round_trips_through_a_dict():
    cfg = TrainConfig(store="s", out="o", preset="small", stop_after=5)
    assert TrainConfig(**dataclasses.asdict(cfg)) == cfg


def test_batch_workers_do_not_change_what_the_model_sees(store_dir, straight, tmp_path):
    out, result = straight
    parallel = train(tiny(store_dir, tmp_path, workers=2))
    assert state_hash(parallel.model) == state_hash(result.model)
    assert log_without_timing(tmp_path) == log_without_timing(out)


# ------------------------------------------------------------------------------ preconditioned generator


def test_residual_scale_is_the_per_parameter_rms_of_the_sampled_pairs(store_dir):
    from pretrain.dataset import PairSampler, open_pairs

    corpus = open_pairs(store_dir)
    sampler = PairSampler(len(corpus.train), 4, seed=0, task=corpus.task)
    scale = optim.residual_scale_estimate(optim.sample_updates(corpus.train, sampler, count=12))
    diffs = []
    for b in range(3):
        indices, perms = sampler.global_batch(b, stream="residual-std")
        batch = corpus.train.batch(indices, perms)
        diffs.append(batch.theta_next - batch.theta)
    rms = torch.cat(diffs).square().mean(0).sqrt()
    floor = optim.RESIDUAL_FLOOR * rms.square().mean().sqrt()
    torch.testing.assert_close(scale, rms.clamp(min=floor.item()))
    assert (scale > 0).all()


def test_preconditioned_training_exports_its_residual_scale_and_loads(store_dir, tmp_path):
    cfg = tiny(store_dir, tmp_path, steps=3, export=True, name="pre", precondition=True, init_fraction=0.5,
               pca_init=True, subspace_skip=True, snr_window=(-4.0, 6.0))
    result = train(cfg)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    scale = state["model"]["residual_scale"]
    assert scale.shape == (7960,) and (scale > 0).all() and scale.std() > 0  # measured, not the constant
    assert state["model_config"]["residual_std"] == pytest.approx(scale.square().mean().sqrt().item(), rel=1e-5)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["model_config"]["precondition"] is True
    assert manifest["training"]["init_fraction"] == 0.5
    loaded = load_generator(result.manifest)
    assert torch.equal(loaded.model.residual_scale, scale)
    new = loaded.sample(torch.randn(2, 7960) * 0.1, torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5]), steps=2,
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(new).all()


NEW_OPTIONS = dict(precondition=True, pca_init=True, subspace_skip=True, snr_window=(-4.0, 6.0), init_fraction=0.5)


def test_resumed_run_with_every_new_option_equals_an_uninterrupted_one(store_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result = train(tiny(store_dir, whole, **NEW_OPTIONS))
    train(tiny(store_dir, parts, stop_after=3, **NEW_OPTIONS))
    resumed = train(tiny(store_dir, parts, resume=True, **NEW_OPTIONS))  # the same Python config as at the start
    assert resumed.step == 6
    assert state_hash(resumed.model) == state_hash(result.model) and state_hash(resumed.ema) == state_hash(result.ema)
    assert_same_training_state(whole, parts)
    assert log_without_timing(parts) == log_without_timing(whole)
    state = load_checkpoint(parts / CHECKPOINT_NAME)
    assert state["config"]["residual_std"] is None  # what was asked; the measured σ lives in the model
    assert state["model_config"]["residual_std"] > 0 and state["model_config"]["subspace_skip"] is True


def test_new_options_change_what_training_does(store_dir, tmp_path):
    plain = train(tiny(store_dir, tmp_path / "plain", precondition=True))
    windowed = train(tiny(store_dir, tmp_path / "windowed", precondition=True, snr_window=(-1.0, 1.0)))
    focused = train(tiny(store_dir, tmp_path / "focused", precondition=True, init_fraction=1.0))
    late = train(tiny(store_dir, tmp_path / "late", precondition=True, late_fraction=1.0))
    short = train(tiny(store_dir, tmp_path / "short", precondition=True, late_fraction=1.0, late_max_gap=1))
    assert len({state_hash(m.model) for m in (plain, windowed, focused, late, short)}) == 5


def test_checkpoint_from_before_the_new_options_still_resumes(store_dir, tmp_path):
    train(tiny(store_dir, tmp_path, stop_after=3))
    path = tmp_path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    for key in ("init_fraction", "late_fraction", "late_max_gap", "precondition", "residual_std", "pca_init",
                "subspace_skip", "snr_window"):
        del state["config"][key]
    for key in ("precondition", "residual_std", "subspace_skip"):
        del state["model_config"][key]
    outputs.atomic_torch_save(state, path)  # a new file: the loaded state still maps the old one
    assert train(tiny(store_dir, tmp_path, resume=True)).step == 6


def test_residual_std_needs_precondition(store_dir, tmp_path):
    with pytest.raises(ConfigError, match="--precondition"):
        train(tiny(store_dir, tmp_path, residual_std=0.3))
    assert not any(tmp_path.iterdir())


def test_neuron_token_training_ties_scales_across_units_exports_and_loads(store_dir, tmp_path):
    cfg = tiny(store_dir, tmp_path, steps=3, export=True, name="units", tokens="neuron", **NEW_OPTIONS)
    result = train(cfg)
    manifest = json.loads(result.manifest.read_text())
    assert manifest["tokenisation"] == {"scheme": "neuron", "chunk_size": None, "num_tokens": 11}
    loaded = load_generator(result.manifest)
    layout = loaded.model.layout
    assert layout.scheme == "neuron" and loaded.model.theta_encoder.weight.shape[0] == 2
    units = layout.to_tokens(loaded.model.residual_scale)[:10]  # one σ per position, shared by the 10 units
    torch.testing.assert_close(units, units[:1].expand(10, -1))
    new = loaded.sample(torch.randn(2, 7960) * 0.1, torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.5]), steps=2,
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(new).all()
    with pytest.raises(TrainingError, match="tokens='neuron' \\(asked: 'chunk'\\)"):
        train(tiny(store_dir, tmp_path, steps=6, resume=True, name="units", **NEW_OPTIONS))


def test_layer_balance_gives_every_layer_the_same_share_and_may_change_on_resume(store_dir, tmp_path):
    layout = Layout(make_store(tmp_path / "s", runs=1, checkpoints=2).signature)
    off, half, full = (optim.layer_weights(layout, a)[0] for a in (0.0, 0.5, 1.0))
    assert torch.equal(off, torch.ones(7960))
    for w in (half, full):
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    shares = torch.stack([full[a:b].sum() for a, b in zip(layout.offsets[:-1], layout.offsets[1:])])
    torch.testing.assert_close(shares, torch.full((4,), 7960 / 4))
    assert half[0] < 1 < half[-1]  # between: the small layers count for more, not for all
    train(tiny(store_dir, tmp_path / "run", stop_after=3, precondition=True))
    seen = []
    real_loss = Diffusion.training_loss

    def spy(self, model, x0, cond, *, weight=None, **kw):
        if weight is not None:  # training steps; the held-out loss is unweighted
            seen.append(weight(torch.zeros(x0.shape[0], dtype=torch.long)))
        return real_loss(self, model, x0, cond, weight=weight, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Diffusion, "training_loss", spy)
        resumed = train(tiny(store_dir, tmp_path / "run", resume=True, precondition=True, layer_balance=1.0))
    assert resumed.step == 6 and load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["config"]["layer_balance"] == 1.0
    expected = resumed.model.loss_weight(torch.zeros(1, dtype=torch.long)) * full  # the model's weights times the balance
    assert len(seen) == 3 and all(torch.allclose(w, expected) for w in seen)
    assert any("--layer-balance changed from 0 to 1 at step 3" in n for n in resumed.notes)
    with pytest.raises(ConfigError, match="--layer-balance"):
        train(tiny(store_dir, tmp_path / "bad", layer_balance=2.0))


@pytest.fixture(scope="module")
def source(store_dir, tmp_path_factory):
    """A small exported generator (neuron tokens, preconditioned) to fine-tune."""
    out = tmp_path_factory.mktemp("source")
    return train(tiny(store_dir, out, steps=3, export=True, name="src", tokens="neuron", **NEW_OPTIONS)).manifest


def test_fine_tune_starts_at_the_source_in_its_units_and_records_where_it_came_from(store_dir, source, tmp_path):
    src = load_generator(source)
    # a learning rate too small to move anything: what the run starts from is what it ends with
    still = train(tiny(store_dir, tmp_path / "still", steps=1, lr=1e-30, init_from=str(source)))
    for (name, a), b in zip(src.model.state_dict().items(), still.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
    result = train(tiny(store_dir, tmp_path / "ft", steps=4, lr=1e-2, export=True, init_from=str(source),
                        init_fraction=1.0))
    manifest = json.loads(result.manifest.read_text())
    src_manifest = json.loads(source.read_text())
    assert result.manifest.name == "src.json"  # the source's name unless --name says otherwise
    assert manifest["model_config"] == src_manifest["model_config"]
    assert manifest["tokenisation"] == src_manifest["tokenisation"]
    assert manifest["normalization"] == src_manifest["normalization"]
    assert manifest["corpus"]["split"]["heldout"] == src_manifest["corpus"]["split"]["heldout"]
    assert manifest["training"]["init_from"]["sha256"] == src.sha256
    assert manifest["training"]["init_from"]["training"]["steps"] == 3
    source_corpus = {k: v for k, v in src_manifest["corpus"].items() if k != "split"}
    assert manifest["training"]["init_from"]["corpus"] == source_corpus
    assert manifest["training"]["init_fraction"] == 1.0
    tuned = load_generator(result.manifest)
    moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, src.model.state_dict()[k])]
    assert moved and "residual_scale" not in moved  # trained weights moved; σ_p stayed the source's


def test_a_chain_of_fine_tunes_names_the_last_tuned_choice_once():
    sampler = {"method": "ddim", "steps": 2, "t_min": 5}
    tuned = {**sampler, "chosen_by": "a sweep"}
    first = finetune.inherited_sampling({"name": "a", "sha256": "1" * 64, "sampling": tuned})
    second = finetune.inherited_sampling({"name": "b", "sha256": "2" * 64, "sampling": first})
    assert {k: second[k] for k in sampler} == sampler
    assert second["chosen_by"].startswith("inherited from 'b' (sha256 22222222…)")
    assert second["chosen_by"].count("inherited") == 1 and second["chosen_by"].endswith("(chosen by: a sweep)")
    nested = ("inherited from 'b' (sha256 2…), x (the source's: inherited from 'a' (sha256 1…), x "
              "(the source's: a sweep (32 inits)))")  # as older exports wrote it
    assert finetune.first_choice(nested) == "a sweep (32 inits)"
    assert finetune.first_choice("a sweep") == "a sweep" and finetune.first_choice(None) is None


def test_fine_tune_samples_as_its_source_did_until_tuned(store_dir, source, tmp_path):
    assert "sampling" not in json.loads(source.read_text())  # an untuned source: nothing to inherit
    plain = train(tiny(store_dir, tmp_path / "plain", steps=1, export=True, init_from=str(source)))
    assert "sampling" not in json.loads(plain.manifest.read_text())
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    for f in source.parent.glob("src.*"):
        shutil.copy(f, tuned_dir / f.name)
    manifest = json.loads((tuned_dir / "src.json").read_text())
    manifest["sampling"] = {"method": "ddim", "steps": 2, "t_min": 5, "chosen_by": "a sweep"}
    (tuned_dir / "src.json").write_text(json.dumps(manifest))
    result = train(tiny(store_dir, tmp_path / "ft", steps=1, export=True, init_from=str(tuned_dir / "src.json")))
    entry = json.loads(result.manifest.read_text())["sampling"]
    assert {k: entry[k] for k in ("method", "steps", "t_min")} == {"method": "ddim", "steps": 2, "t_min": 5}
    assert entry["chosen_by"].startswith("inherited from 'src'") and "a sweep" in entry["chosen_by"]
    loaded = load_generator(result.manifest)
    assert (loaded.sampling["method"], loaded.sampling["steps"], loaded.sampling["t_min"]) == ("ddim", 2, 5)


def test_fine_tune_resumes_exactly(store_dir, source, tmp_path):
    whole = train(tiny(store_dir, tmp_path / "whole", init_from=str(source)))
    moved = tmp_path / "src"
    moved.mkdir()
    for f in source.parent.glob("src.*"):
        shutil.copy(f, moved / f.name)
    train(tiny(store_dir, tmp_path / "parts", init_from=str(moved / "src.json"), stop_after=3))
    shutil.rmtree(moved)  # a resume needs only the checkpoint
    parts = train(tiny(store_dir, tmp_path / "parts", init_from=str(moved / "src.json"), resume=True))
    assert parts.step == whole.step == 6 and parts.manifest is None
    assert state_hash(parts.ema) == state_hash(whole.ema)
    assert load_checkpoint(tmp_path / "parts" / CHECKPOINT_NAME)["init_from"]["sha256"] == load_generator(source).sha256


def test_fine_tune_keeps_the_sources_held_out_runs_out_of_training():
    src = type("Src", (), {"manifest": {"corpus": {"split": {"train": [0, 1, 3], "heldout": [2, 5],
                                                             "heldout_fraction": 0.4, "seed": 7}}}})()
    split = finetune.source_split(src, [0, 1, 2, 3, 4, 5, 6], TrainConfig())
    assert split.heldout == (2, 5) and split.train == (0, 1, 3, 4, 6)  # new runs train


def test_fine_tune_refuses_settings_it_takes_from_its_source(store_dir, source, tmp_path):
    with pytest.raises(ConfigError, match=r"takes schedule.*schedule='linear'.*leave --schedule out"):
        train(tiny(store_dir, tmp_path / "a", init_from=str(source), schedule="cosine"))
    with pytest.raises(ConfigError, match="leave --diffusion-steps out"):
        train(tiny(store_dir, tmp_path / "b", init_from=str(source), diffusion_steps=100))
    assert not any((tmp_path / d).exists() for d in "ab")
    train(tiny(store_dir, tmp_path / "c", steps=1, init_from=str(source), tokens="neuron"))  # the same value is fine
    train(tiny(store_dir, tmp_path / "c", steps=2, init_from=str(source), resume=True))
    with pytest.raises(TrainingError, match="schedule='linear' \\(asked: 'cosine'\\)"):
        train(tiny(store_dir, tmp_path / "c", steps=3, init_from=str(source), resume=True, schedule="cosine"))


def test_fine_tune_notes_a_store_that_is_not_its_sources_corpus():
    src = type("Src", (), {"name": "g", "manifest": {"corpus": {"store": "/x/mnist-corpus"}}})()
    notes = []
    split = finetune.source_split(src, list(range(20)), TrainConfig(store="/y/other"), notes)
    assert len(split.train) + len(split.heldout) == 20
    assert any("not the corpus /x/mnist-corpus" in n for n in notes) and any("no train/held-out split" in n for n in notes)


def test_fine_tune_of_a_generator_for_another_task_or_metric_is_refused_before_writing(store_dir, source, tmp_path):
    with pytest.raises(ConfigError, match="not 'test_error'"):
        train(tiny(store_dir, tmp_path / "a", init_from=str(source), metric="test_error"))
    with pytest.raises(ConfigError, match="not 'cartpole-mlp'"):
        train(tiny(store_dir, tmp_path / "b", init_from=str(source), task="cartpole-mlp"))
    with pytest.raises(WeightsError):
        train(tiny(store_dir, tmp_path / "c", init_from=str(tmp_path / "missing.json")))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_command_line_fine_tune_resumes_without_repeating_its_source(store_dir, source, tmp_path):
    args = ["train", "--store", str(store_dir), "--out", str(tmp_path), "--init-from", str(source), "--steps", "4",
            "--batch-size", "4", "--warmup", "1", "--log-every", "2", "--checkpoint-every", "2", "--stop-after", "2"]
    assert cli.main(args) == 0
    assert cli.main(["train", "--store", str(store_dir), "--out", str(tmp_path), "--resume"]) == 0
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 4 and state["config"]["tokens"] == "neuron" and (tmp_path / "src.json").is_file()


def test_output_matching_adds_the_divergence_of_predicted_outputs_and_resumes_exactly(store_dir, mnist_root, tmp_path):
    opts = dict(output_matching=1.0, matching_examples=16, data_root=str(mnist_root))
    plain = train(tiny(store_dir, tmp_path / "plain"))
    whole = train(tiny(store_dir, tmp_path / "whole", **opts))
    assert state_hash(whole.ema) != state_hash(plain.ema)  # the extra term changes what is learned
    records = [json.loads(line) for line in (tmp_path / "whole" / LOG_NAME).read_text().splitlines()]
    assert all(r["output_divergence"] > 0 for r in records)
    assert "output_divergence" not in json.loads((tmp_path / "plain" / LOG_NAME).read_text().splitlines()[0])
    train(tiny(store_dir, tmp_path / "parts", stop_after=3, **opts))
    parts = train(tiny(store_dir, tmp_path / "parts", resume=True, **opts))
    assert state_hash(parts.ema) == state_hash(whole.ema)  # the inputs drawn are a function of the step


def test_output_matching_without_data_or_on_a_task_without_outputs_is_refused_before_writing(store_dir, tmp_path):
    with pytest.raises(ConfigError, match="--output-matching"):
        train(tiny(store_dir, tmp_path / "a", output_matching=-1.0))
    with pytest.raises(DataNotFoundError):
        train(tiny(store_dir, tmp_path / "b", output_matching=1.0, data_root=str(tmp_path / "nowhere")))
    assert not any((tmp_path / d).exists() for d in "ab")


def test_the_label_hinge_trains_beside_output_matching_is_logged_and_resumes_exactly(store_dir, mnist_root, tmp_path):
    opts = dict(output_matching=1.0, label_hinge=4.0, matching_examples=16, data_root=str(mnist_root))
    matching = train(tiny(store_dir, tmp_path / "matching", **{**opts, "label_hinge": 0.0}))
    whole = train(tiny(store_dir, tmp_path / "whole", **opts))
    assert state_hash(whole.ema) != state_hash(matching.ema)  # the hinge changes what is learned
    records = [json.loads(line) for line in (tmp_path / "whole" / LOG_NAME).read_text().splitlines()]
    assert all(r["output_divergence"] > 0 and r["label_excess"] >= 0 for r in records)
    assert any(r["label_excess"] > 0 for r in records)  # an untrained model predicts worse networks than θ′
    assert "label_excess" not in json.loads((tmp_path / "matching" / LOG_NAME).read_text().splitlines()[0])
    alone = train(tiny(store_dir, tmp_path / "alone", **{**opts, "output_matching": 0.0}))
    first = json.loads((tmp_path / "alone" / LOG_NAME).read_text().splitlines()[0])
    assert "label_excess" in first and "output_divergence" not in first and alone.step == whole.step
    train(tiny(store_dir, tmp_path / "parts", stop_after=3, **opts))
    parts = train(tiny(store_dir, tmp_path / "parts", resume=True, **opts))
    assert state_hash(parts.ema) == state_hash(whole.ema)


def test_the_label_hinge_is_refused_where_it_cannot_work_before_anything_is_written(store_dir, tmp_path):
    cartpole = make_store(tmp_path / "cp", task="cartpole-mlp", runs=2, checkpoints=3)
    with pytest.raises(ConfigError, match="--label-hinge"):
        train(tiny(cartpole.root, tmp_path / "a", steps=2, label_hinge=1.0, data_root="/nowhere"))
    with pytest.raises(ConfigError, match="--label-hinge"):
        train(tiny(store_dir, tmp_path / "b", label_hinge=float("nan")))
    assert not any((tmp_path / d).exists() for d in "ab")


def test_output_matching_on_cartpole_compares_policies_without_a_dataset(tmp_path):
    cartpole = make_store(tmp_path / "cp", task="cartpole-mlp", runs=2, checkpoints=3)
    train(tiny(cartpole.root, tmp_path / "run", steps=2, output_matching=1.0, matching_examples=8, data_root="/nowhere"))
    assert all(json.loads(r)["output_divergence"] > 0 for r in (tmp_path / "run" / LOG_NAME).read_text().splitlines())


def test_a_recipe_sets_its_options_and_the_command_line_overrides_them(tmp_path):
    from learned_opt import cli as cli_mod
    from pretrain.train.cli import config_from_args

    parser = cli_mod.build_parser()
    args = parser.parse_args(["train", "--store", "s", "--out", str(tmp_path / "o"), "--recipe", "neuron", "--steps", "7"])
    config = config_from_args(args)
    assert config.tokens == "neuron" and config.precondition and config.snr_window == (-4.0, 6.0)
    assert config.steps == 7 and config.lr == 1e-3  # given beats the recipe, the recipe beats the defaults
    assert config_from_args(parser.parse_args(["train", "--store", "s", "--out", "o", "--recipe", "gpt"])) == TrainConfig(
        store="s", out="o")
    ranked = config_from_args(parser.parse_args(["train", "--store", "s", "--out", "o", "--recipe", "self-ranking",
                                                 "--init-from", "g", "--data-root", "d"]))
    assert (ranked.prompt_dropout, ranked.property_head, ranked.output_matching, ranked.lr) == (0.1, 1.0, 2.0, 1e-4)
    late = config_from_args(parser.parse_args(["train", "--store", "s", "--out", "o", "--recipe", "late-pairs",
                                               "--init-from", "g", "--data-root", "d"]))
    assert (late.prompt_dropout, late.output_matching, late.init_fraction, late.late_fraction, late.steps) == (
        0.1, 16.0, 0.5, 0.4, 1500)
    hinge = config_from_args(parser.parse_args(["train", "--store", "s", "--out", "o", "--recipe", "label-hinge",
                                                "--init-from", "g", "--data-root", "d"]))
    assert (hinge.output_matching, hinge.label_hinge, hinge.late_fraction, hinge.steps) == (64.0, 64.0, 0.4, 2000)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--store", "s", "--out", "o", "--recipe", "nope"])


def test_fine_tune_on_runs_past_its_sources_range_may_be_prompted_there(store_dir, source, tmp_path):
    """Runs added to the corpus that reach a lower loss than any the source trained on (warm-started
    runs) widen the prompts the fine-tune takes; its normalisation stays the source's."""
    src = load_generator(source)
    extended = tmp_path / "store"
    shutil.copytree(store_dir, extended)
    make_store(extended, runs=1, seed=5, first_run=50)  # metrics from 2.3 down: below the source's lowest...
    store = Store.open(extended)
    low = src.metric_range[0] / 2
    record = store.read_run(50)
    store.run_path(50).unlink()
    store.write_run(50, RunRecord(record.params, record.steps, {k: v * 0 + low for k, v in record.metrics.items()},
                                  record.hparams, seed=50))  # ...a run that stays at half the source's lowest loss
    result = train(tiny(extended, tmp_path / "ft", steps=2, export=True, init_from=str(source)))
    tuned = load_generator(result.manifest)
    assert tuned.normalization == src.normalization
    assert tuned.metric_range == pytest.approx((low, src.metric_range[1]))
    assert tuned.best_prompt == pytest.approx(low)  # the task's ideal (a loss of 0), clamped to the range
    # on the source's corpus the range is the normalisation's, as before
    assert src.metric_range == (src.normalization.metric_lo, src.normalization.metric_hi)
