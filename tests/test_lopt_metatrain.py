"""Meta-training of the learned optimizer: exact resume, its outputs, and bad settings (tiny configs, fake data)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from learned_opt.errors import ConfigError, TrainingError, WeightsError
from learned_opt.lopt import load_rule
from pretrain.metatrain import MetaConfig, meta_train

from metatrain_helpers import TINY
from metatrain_helpers import fake_data as _data


def test_resume_equals_uninterrupted(tmp_path):
    whole = meta_train(MetaConfig(outer_steps=5, **TINY), _data(), tmp_path / "a", progress=False)
    meta_train(MetaConfig(outer_steps=3, **TINY), _data(), tmp_path / "b", progress=False, export=False)
    # outer step 3 is not a checkpoint step (every 2) but the last one: it was saved, resume from it
    # how often to checkpoint is bookkeeping: a resume may change it
    resumed = meta_train(MetaConfig(outer_steps=5, **{**TINY, "checkpoint_every": 1}), _data(), tmp_path / "b",
                         resume=True, progress=False)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert [r["meta_loss"] for r in rows_a] == [r["meta_loss"] for r in rows_b]
    assert (tmp_path / "a" / "meta_loss.png").stat().st_size > 0
    rule = load_rule(tmp_path / "a" / "lopt.json")
    assert rule.manifest["meta_training"]["outer_steps"] == 5 and all(torch.isfinite(v).all() for v in rule.theta.values())


def test_a_log_line_cut_short_by_a_kill_does_not_block_the_resume(tmp_path, monkeypatch):
    meta_train(MetaConfig(outer_steps=3, **TINY), _data(), tmp_path, progress=False, export=False)
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"outer_step": 4, "meta_lo')  # the kill came mid-line
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a runtime install: no matplotlib, no plot
    (tmp_path / "meta_loss.png").unlink()
    meta_train(MetaConfig(outer_steps=5, **TINY), _data(), tmp_path, resume=True, progress=False, export=False)
    assert [json.loads(line)["outer_step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "meta_loss.png").exists()


def test_a_rerun_without_resume_is_told_to_resume_before_anything_about_its_export(tmp_path):
    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, progress=False)  # exported lopt.json
    before = (tmp_path / "lopt.json").read_bytes()
    with pytest.raises(TrainingError, match="checkpoint.pt exists: pass --resume"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path, progress=False)
    assert (tmp_path / "lopt.json").read_bytes() == before


def test_resume_with_other_settings_refused(tmp_path):
    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, progress=False, export=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match="other settings.*holdout.*only --outer-lr and --sigma may change"):
        meta_train(MetaConfig(outer_steps=4, **{**TINY, "holdout": 30}), _data(), tmp_path, resume=True, progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes(before[: len(before) // 2])  # a copy cut short
    with pytest.raises(TrainingError, match="not a readable meta-training checkpoint.*move it aside"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), cut, resume=True, progress=False)


def test_resume_with_no_checkpoint_yet_starts_afresh_but_never_over_weights_not_its_own(tmp_path, capsys):
    fresh = meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path / "a", progress=False)
    resumed = meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path / "b", resume=True, progress=False)
    assert all(torch.equal(fresh[k], resumed[k]) for k in fresh)  # a preemptible job's first start
    assert "no checkpoint in" in capsys.readouterr().err  # said, in case --out was mistyped
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "lopt.json").write_text("another job's\n")
    with pytest.raises(ConfigError, match="holds weights that this job did not write"):
        meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path / "c", resume=True, progress=False)


@pytest.mark.parametrize("bad", [dict(widths=()), dict(depths=()), dict(batch_sizes=()), dict(unroll=7),
                                 dict(pairs=0), dict(sigma=0.0), dict(sigma=2.0), dict(image_size=5), dict(init_scales=(2.0, 1.0)),
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
    monkeypatch.setattr(trainer.OuterOptimizer, "step",
                        lambda self, theta, *a, **k: {k2: v * float("nan") for k2, v in theta.items()})
    with pytest.raises(TrainingError, match="non-finite.*--resume from it with a lower --outer-lr or --sigma"):
        meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    monkeypatch.undo()  # the advice can be followed: a lower --outer-lr and --sigma resume, and are recorded
    lower = {**TINY, "sigma": 0.05, "outer_lr": 1e-4}
    with pytest.raises(ConfigError, match="no step would run with the new --outer-lr and --sigma"):  # export only
        meta_train(MetaConfig(outer_steps=2, **lower), _data(), tmp_path, resume=True, progress=False)
    meta_train(MetaConfig(outer_steps=4, **lower), _data(), tmp_path, resume=True, progress=False)
    changed = load_rule(tmp_path / "lopt.json").manifest["meta_training"]["settings_changed"]
    assert changed == [{"outer_step": 2, "outer_lr": [MetaConfig().outer_lr, 1e-4], "sigma": [TINY.get("sigma", MetaConfig().sigma), 0.05]}]


def test_a_resume_under_another_name_does_not_replace_weights_it_did_not_write(tmp_path):
    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, progress=False, export=False)
    theirs = tmp_path / "keep.json"
    theirs.write_text("another job's weights\n")
    for name in ("keep", "unused"):
        with pytest.raises(ConfigError, match="exports as 'lopt': pass --name lopt"):
            meta_train(MetaConfig(outer_steps=3, **TINY), _data(), tmp_path, resume=True, progress=False, name=name)
    assert theirs.read_text() == "another job's weights\n" and not (tmp_path / "unused.json").exists()
    meta_train(MetaConfig(outer_steps=3, **TINY), _data(), tmp_path, resume=True, progress=False)  # its own name
    assert load_rule(tmp_path / "lopt.json").manifest["meta_training"]["outer_steps"] == 3
    with pytest.raises(ConfigError, match="at outer step 3 already: pass --outer-steps 3"):
        meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path, resume=True, progress=False)


def test_learned_outer_optimizer_trains_the_rule_itself_and_resumes_exactly(tmp_path):
    cfg = {**TINY, "outer_optimizer": "learned", "outer_lr": 1e-3}
    whole = meta_train(MetaConfig(outer_steps=4, **cfg), _data(), tmp_path / "a", progress=False)
    meta_train(MetaConfig(outer_steps=2, **cfg), _data(), tmp_path / "b", progress=False, export=False)
    resumed = meta_train(MetaConfig(outer_steps=4, **cfg), _data(), tmp_path / "b", resume=True, progress=False)
    start = MetaConfig(**cfg)  # where the rule starts: its hidden sizes and seed
    for k in whole:
        assert torch.equal(whole[k], resumed[k])
    moved = meta_train(MetaConfig(outer_steps=1, **cfg), _data(), tmp_path / "c", progress=False, export=False)
    from learned_opt.lopt.model import hand_set_theta

    assert any(not torch.equal(moved[k], v) for k, v in hand_set_theta(start.hidden, seed=start.seed).items())
    manifest = json.loads((tmp_path / "a" / "lopt.json").read_text())
    assert "trains itself" in manifest["meta_training"]["method"]
    with pytest.raises(TrainingError, match="outer_optimizer"):  # the outer optimizer is a setting of the run
        meta_train(MetaConfig(outer_steps=6, **TINY), _data(), tmp_path / "b", resume=True, progress=False)


def test_learned_outer_optimizer_with_other_weights_and_bad_ones(tmp_path):
    theta = meta_train(MetaConfig(outer_steps=2, **{**TINY, "outer_optimizer": "learned", "outer_weights": "hand-set"}),
                       _data(), tmp_path, progress=False, export=False)
    assert all(torch.isfinite(v).all() for v in theta.values())
    with pytest.raises(WeightsError, match="nowhere.json"):
        MetaConfig(**{**TINY, "outer_optimizer": "learned", "outer_weights": "nowhere.json"})
    with pytest.raises(ConfigError, match="outer_optimizer"):
        MetaConfig(**{**TINY, "outer_optimizer": "sgd"})


def test_pairs_must_divide_among_processes():
    from pretrain.metatrain.shard import shard_of

    assert (shard_of(8, 1, 4).lo, shard_of(8, 1, 4).hi) == (2, 4)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        shard_of(3, 0, 2)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_checkpoint_rank_0_cannot_write_stops_every_rank(tmp_path):
    """Rank 0 alone writes files; if that fails, rank 1 must stop too, not wait in a collective."""
    from pathlib import Path

    from torchrun_helpers import run_two_processes

    run_two_processes(Path(__file__).with_name("metatrain_helpers.py"), tmp_path, 4, "--disk-full", timeout=120)
    assert (tmp_path / "stopped-rank0.txt").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp_path / "stopped-rank1.txt").read_text() == \
        "TrainingError: writing the checkpoint failed on rank 0; its error says why"
    assert [json.loads(line)["outer_step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "lopt.json").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_population_shared_out_over_two_torchrun_processes(tmp_path):
    """Two gloo ranks, one antithetic pair each, take the same outer steps as one process with both
    pairs (to float rounding of the sum), write one log, and their checkpoint resumes in one process."""
    from pathlib import Path

    from torchrun_helpers import run_two_processes

    two = tmp_path / "two"
    run_two_processes(Path(__file__).with_name("metatrain_helpers.py"), two, 4)
    assert (two / "hash-rank0.txt").read_text() == (two / "hash-rank1.txt").read_text()
    rows = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["outer_step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((two / "lopt.json").read_text())["meta_training"]["processes"] == 2

    one = meta_train(MetaConfig(outer_steps=4, **TINY), _data(), tmp_path / "one", progress=False)
    sharded = torch.load(two / "theta-rank0.pt", weights_only=True)
    for k in one:
        torch.testing.assert_close(sharded[k], one[k], rtol=1e-4, atol=1e-6)
    ones = [json.loads(line)["meta_loss"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["meta_loss"] for r in rows] == pytest.approx(ones, rel=1e-4)

    resumed = meta_train(MetaConfig(outer_steps=6, **TINY), _data(), two, resume=True, progress=False)
    longer = meta_train(MetaConfig(outer_steps=6, **TINY), _data(), tmp_path / "one6", progress=False)
    for k in longer:
        torch.testing.assert_close(resumed[k], longer[k], rtol=1e-4, atol=1e-6)


def test_tasks_pooled_per_task_and_bounded_in_size():
    from pretrain.metatrain.family import MnistMlpFamily

    family = MnistMlpFamily(28, widths=(8, 64), depths=(1, 2), pools=(1, 2), max_params=20_000)
    gen = torch.Generator().manual_seed(0)
    specs = [family.sample(gen) for _ in range(200)]
    assert {s.sizes[0] for s in specs} == {784, 196}
    assert max(s.num_params for s in specs) <= 20_000
    x = torch.randn(5, 784)
    small = next(s for s in specs if s.sizes[0] == 196)
    assert small.inputs(x).shape == (5, 196) and torch.allclose(small.inputs(x)[:, 0], x.view(5, 28, 28)[:, :2, :2].mean((1, 2)))
    with pytest.raises(ConfigError, match="yields no task within max_params"):
        MnistMlpFamily(28, widths=(64,), depths=(1,), max_params=100)
    with pytest.raises(ConfigError, match="pool factors"):
        MnistMlpFamily(28, pools=(3,))


def test_meta_training_on_tasks_of_two_resolutions(tmp_path):
    cfg = {**TINY, "image_size": 14, "pools": (1, 2), "max_params": 2000}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 196, generator=g), torch.randint(10, (200,), generator=g)
    from learned_opt.tasks import ClassificationData

    meta_train(MetaConfig(outer_steps=4, **cfg), ClassificationData(x, y, x[:50], y[:50]), tmp_path, progress=False)
    assert "14x14, 7x7" in json.loads((tmp_path / "lopt.json").read_text())["meta_training"]["tasks"]


def test_a_resume_with_another_sigma_starts_a_new_unroll(tmp_path):
    import shutil

    meta_train(MetaConfig(outer_steps=1, **TINY), _data(), tmp_path / "same", progress=False, export=False)
    shutil.copytree(tmp_path / "same", tmp_path / "lower")  # stopped half way through an unroll of 6 steps
    sigma = MetaConfig().sigma
    meta_train(MetaConfig(outer_steps=2, **TINY), _data(), tmp_path / "same", resume=True, progress=False, export=False)
    meta_train(MetaConfig(outer_steps=2, **{**TINY, "sigma": sigma / 10}), _data(), tmp_path / "lower", resume=True,
               progress=False, export=False)
    rows = {k: [json.loads(line) for line in (tmp_path / k / "log.jsonl").read_text().splitlines()] for k in ("same", "lower")}
    assert rows["same"][1]["inner_step"] == 6 and rows["lower"][1]["inner_step"] == 3  # a new unroll, not the old one's rest
    # the old unroll's perturbations, divided by the new sigma squared, made the estimate 100 times too large
    assert rows["lower"][1]["grad_norm"] < 5 * rows["same"][1]["grad_norm"]


def test_a_resume_whose_outer_rule_file_now_holds_other_weights_is_refused(tmp_path):
    from learned_opt.lopt import save_rule
    from learned_opt.lopt.model import hand_set_theta

    rule = save_rule(tmp_path / "rule", "outer", hand_set_theta(), meta_training={"method": "hand-set"})
    cfg = {**TINY, "outer_optimizer": "learned", "outer_weights": str(rule)}
    meta_train(MetaConfig(outer_steps=1, **cfg), _data(), tmp_path / "m", progress=False, export=False)
    meta_train(MetaConfig(outer_steps=2, **cfg), _data(), tmp_path / "m", resume=True, progress=False, export=False)
    save_rule(tmp_path / "rule", "outer", {k: v * 2 for k, v in hand_set_theta().items()},
              meta_training={"method": "hand-set, doubled"})  # the same path, other weights
    with pytest.raises(TrainingError, match="outer_weights_sha256"):
        meta_train(MetaConfig(outer_steps=3, **cfg), _data(), tmp_path / "m", resume=True, progress=False)
    configured = MetaConfig(outer_steps=1, **cfg)  # the file read here, then replaced before the run reads it
    save_rule(tmp_path / "rule", "outer", hand_set_theta(), meta_training={"method": "hand-set"})
    with pytest.raises(ConfigError, match="changed while the run was being set up"):
        meta_train(configured, _data(), tmp_path / "n", progress=False, export=False)


CLI_TINY = ["--widths", "4", "--depths", "1", "--image-size", "7", "--pairs", "2", "--truncation", "2", "--unroll", "4",
            "--no-progress"]


def test_a_cli_resume_takes_the_checkpoint_settings_that_are_not_given(tmp_path, mnist_root):
    """`meta-train --resume` needs only what changes: the settings not given are the checkpoint's
    (its planned --outer-steps too), and the run equals an uninterrupted one."""
    from learned_opt.cli import main

    tiny = [*CLI_TINY, "--outer-lr", "1e-3", "--seed", "5", "--data-root", str(mnist_root)]
    assert main(["meta-train", "--out", str(tmp_path / "whole"), "--outer-steps", "4", *tiny]) == 0
    assert main(["meta-train", "--out", str(tmp_path / "part"), "--outer-steps", "2", *tiny]) == 0
    assert main(["meta-train", "--out", str(tmp_path / "part"), "--resume", "--outer-steps", "4", "--no-progress",
                 "--data-root", str(mnist_root)]) == 0
    whole, part = (load_rule(tmp_path / d / "lopt.json") for d in ("whole", "part"))
    assert part.content_sha256 == whole.content_sha256
    assert part.manifest["meta_training"]["config"]["outer_lr"] == 1e-3 and "settings_changed" not in part.manifest["meta_training"]
    # with nothing given, a resume runs to the planned total (here: already reached, so it exports)
    assert main(["meta-train", "--out", str(tmp_path / "part"), "--resume", "--no-progress",
                 "--data-root", str(mnist_root)]) == 0
    assert load_rule(tmp_path / "part" / "lopt.json").content_sha256 == whole.content_sha256


def test_a_cli_resume_keeps_the_checkpoint_cadence_and_finds_the_outer_rule_from_anywhere(tmp_path, mnist_root,
                                                                                          monkeypatch, capsys):
    from learned_opt.cli import main
    from learned_opt.lopt import hand_set_theta, save_rule
    from pretrain.metatrain.trainer import resume_settings

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_rule(tmp_path / "a" / "rules", "outer", hand_set_theta(seed=1), meta_training={})
    monkeypatch.chdir(tmp_path / "a")
    data = ["--data-root", str(mnist_root)]
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--outer-steps", "2", "--checkpoint-every", "1",
                 "--outer-optimizer", "learned", "--outer-weights", "rules/outer.json", *CLI_TINY, *data]) == 0
    assert resume_settings(tmp_path / "run" / "checkpoint.pt")["checkpoint_every"] == 1
    monkeypatch.chdir(tmp_path / "b")  # the outer rule's path was relative to a
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--resume", "--outer-steps", "3", "--no-progress",
                 *data]) == 0
    # another outer optimizer is another setting, named as such (not as an --outer-weights given alone)
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--resume", "--outer-steps", "4",
                 "--outer-optimizer", "adam", "--no-progress", *data]) == 2
    assert "cannot resume" in capsys.readouterr().err
    # a damaged checkpoint is said to be damaged, whatever options come with it
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--resume", "--unroll", "6", "--no-progress",
                 *data]) == 2
    assert "not a readable meta-training checkpoint" in capsys.readouterr().err
