"""Meta-training of the learned optimizer: exact resume, its outputs, and bad settings (tiny configs, fake data)."""

from __future__ import annotations

import json

import pytest
import torch

from learned_opt.errors import ConfigError, TrainingError
from learned_opt.lopt import load_rule
from learned_opt.tasks import ClassificationData
from pretrain.metatrain import MetaConfig, meta_train

TINY = dict(pairs=2, truncation=3, unroll=6, val_batch=16, holdout=40, image_size=7, widths=(4, 6), depths=(0, 1),
            batch_sizes=(8,), checkpoint_every=2)


def _data(n: int = 200) -> ClassificationData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 49, generator=g), torch.randint(10, (n,), generator=g)
    return ClassificationData(x, y, x[:50], y[:50])


def test_resume_equals_uninterrupted(tmp_path):
    whole = meta_train(MetaConfig(outer_steps=5, **TINY), _data(), tmp_path / "a", progress=False)
    meta_train(MetaConfig(outer_steps=3, **TINY), _data(), tmp_path / "b", progress=False, export=False)
    # outer step 3 is not a checkpoint step (every 2) but the last one: it was saved, resume from it
    resumed = meta_train(MetaConfig(outer_steps=5, **TINY), _data(), tmp_path / "b", resume=True, progress=False)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert [r["meta_loss"] for r in rows_a] == [r["meta_loss"] for r in rows_b]
    assert (tmp_path / "a" / "meta_loss.png").stat().st_size > 0
    rule = load_rule(tmp_path / "a" / "lopt.json")
    assert rule.manifest["meta_training"]["outer_steps"] == 5 and all(torch.isfinite(v).all() for v in rule.theta.values())


def test_resume_with_other_settings_refused(tmp_path):
    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, progress=False, export=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match="other settings.*sigma"):
        meta_train(MetaConfig(outer_steps=4, **{**TINY, "sigma": 0.5}), _data(), tmp_path, resume=True, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path, progress=False)
    with pytest.raises(TrainingError, match="no meta-training checkpoint"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path / "none", resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("bad", [dict(widths=()), dict(depths=()), dict(batch_sizes=()), dict(unroll=7),
                                 dict(pairs=0), dict(sigma=0.0), dict(image_size=5), dict(init_scales=(2.0, 1.0)),
                                 dict(outer_loss="median")])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        MetaConfig(**{**TINY, **bad})


def test_wrong_data_shape(tmp_path):
    with pytest.raises(ConfigError, match="flat images of 14x14"):
        meta_train(MetaConfig(), _data(), tmp_path, progress=False)


def test_cli_registers_meta_train():
    from learned_opt.cli import build_parser

    args = build_parser().parse_args(["meta-train", "--out", "x", "--widths", "8,16", "--outer-steps", "3"])
    assert args.widths == (8, 16) and args.outer_steps == 3


def test_non_finite_rule_is_never_checkpointed(tmp_path, monkeypatch):
    from pretrain.metatrain import trainer

    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, progress=False, export=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(trainer, "_adam_step", lambda theta, *a, **k: {k2: v * float("nan") for k2, v in theta.items()})
    with pytest.raises(TrainingError, match="non-finite"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
