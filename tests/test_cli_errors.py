"""Bad command-line values are one-line errors (exit code 2) that write nothing and lose nothing."""

from __future__ import annotations

import sys

import pytest
import torch
from train_helpers import make_store

from learned_opt import cli
from learned_opt.errors import ConfigError
from learned_opt.options import parse_device
from pretrain.train import CHECKPOINT_NAME

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors") / "store"
    make_store(root, runs=4, checkpoints=5)
    return root


def one_line_error(argv, capsys, command: str, match: str) -> None:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"learned-opt {command}: error: ") and err.count("\n") == 1, err
    assert match in err, err


def test_device_validator_accepts_cpu_and_auto_and_refuses_the_rest():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    for bad in ("nonsense", "meta", "mps", "", "cuda:99"):
        if bad == "cuda:99" and NO_CUDA:
            continue
        with pytest.raises(ConfigError, match="--device"):
            parse_device(bad)


CORPUS_CASES = [
    (["--device", "nonsense"], "unknown --device 'nonsense'"),
    (["--device", "meta"], "--device 'meta' is not supported"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
    (["--seed", str(2**64)], "--seed must be an integer from 0"),
    (["--seed", "-1"], "--seed must be an integer from 0"),
    (["--seed", str(2**63 - 1)], "--seed must be an integer from 0"),  # run 1 would need 2**63
    (["--epochs", "100000000000"], "--epochs 100,000,000,000 is more than this builder plans: at most 10,000"),
    (["--runs", "1000000000"], "--runs 1,000,000,000 is more than this builder plans: at most 1,000,000"),
    (["--checkpoints", "1"], "--checkpoints >= 2"),  # a store records these: the fixed command would be refused
    (["--batch-runs", "0"], "--batch-runs >= 1"),
    (["--train-examples", "0"], "--train-examples must be at least 1"),
    (["--eval-examples", "0"], "--eval-examples must be at least 1"),
]


@pytest.mark.parametrize("extra, match", CORPUS_CASES)
def test_corpus_refuses_bad_values_before_creating_the_store(tmp_path, capsys, extra, match):
    out = tmp_path / "store"
    argv = ["corpus", "--task", "mnist-mlp", "--runs", "2", "--epochs", "1", "--train-examples", "64",
            "--checkpoints", "3", "--out", str(out), "--no-progress", "--data-root", str(tmp_path / "no-data")]
    one_line_error(argv + extra, capsys, "corpus", match)
    assert not out.exists()


def test_a_control_corpus_refuses_an_unknown_device_in_one_line(tmp_path, capsys):
    out = tmp_path / "store"
    one_line_error(["corpus", "--task", "cartpole-mlp", "--runs", "2", "--out", str(out), "--device", "bogus"],
                   capsys, "corpus", "unknown --device 'bogus'")
    assert not out.exists()


@pytest.mark.parametrize("argv, command, match", [
    (["train", "--out", "x", "--steps", "abc"], "train", "argument --steps: invalid int value: 'abc'"),
    (["eval", "--generator", "g", "--out", "o", "--bogus", "3"], "eval", "unrecognized arguments: --bogus 3"),
    (["no-such-command"], None, "invalid choice: 'no-such-command'"),
])
def test_usage_errors_are_one_line_that_points_to_the_help(capsys, argv, command, match):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    prog = "learned-opt" + (f" {command}" if command else "")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and match in err and err.endswith(f"(see {prog} -h)\n"), err


TRAIN_CASES = [
    (["--device", "nonsense"], "unknown --device"),
    (["--device", "meta"], "not supported"),
    (["--seed", str(2**64)], "--seed must be an integer from 0"),
    (["--seed", "-1"], "--seed must be an integer from 0"),
    (["--batch-size", "100000000"], "--batch-size 100,000,000 of"),
    (["--name", "../escape"], "--name '../escape' must be a plain file name"),
    (["--name", ".hidden"], "must be a plain file name"),
    (["--eval-batches", "0"], "--eval-batches must be a positive integer"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
]


@pytest.mark.parametrize("extra, match", TRAIN_CASES)
def test_train_refuses_bad_values_before_writing(store_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    argv = ["train", "--store", str(store_dir), "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--diffusion-steps", "50"]
    one_line_error(argv + extra, capsys, "train", match)
    assert not out.exists()


def test_train_and_eval_refuse_an_out_that_is_a_file_and_leave_it_alone(store_dir, tmp_path, capsys):
    file = tmp_path / "passwd"
    file.write_text("keep me\n")
    one_line_error(["train", "--store", str(store_dir), "--out", str(file), "--steps", "2"], capsys, "train",
                   "exists and is not a folder")
    one_line_error(["train", "--store", str(store_dir), "--out", str(file / "sub"), "--steps", "2"], capsys,
                   "train", "which is not a folder")
    one_line_error(["eval", "--generator", "mnist-mlp", "--out", str(file)], capsys, "eval",
                   "exists and is not a folder")
    assert file.read_text() == "keep me\n"


@pytest.mark.parametrize("extra, match", [
    (["--device", "nonsense"], "unknown --device 'nonsense'"),
    (["--device", "meta"], "not supported"),
    (["--seed", "-1"], "--seed must be an integer from 0"),
])
def test_eval_refuses_bad_values_before_loading_anything(tmp_path, capsys, extra, match):
    out = tmp_path / "eval"
    one_line_error(["eval", "--generator", "no-such-generator", "--out", str(out)] + extra, capsys, "eval", match)
    assert not out.exists()


def test_a_bad_name_is_refused_on_resume_and_at_export_before_any_step(store_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["train", "--store", str(store_dir), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--diffusion-steps", "50", "--no-export"]
    assert cli.main(base + ["--stop-after", "2"]) == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    one_line_error(base + ["--resume", "--name", "../escape"], capsys, "train", "must be a plain file name")
    one_line_error(["train", "--out", str(out), "--export-only", "--name", "a/b"], capsys, "train",
                   "must be a plain file name")
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    assert not (tmp_path / "escape.json").exists()


@pytest.mark.parametrize("extra, match", [
    (["--threads", "0"], "--threads must be between 1 and this machine's"),
    (["--threads", "100000"], "--threads must be between 1 and this machine's"),
    (["--seed", str(2**70)], "--seed must be an integer from 0"),
    (["--sigma", "inf"], "sigma must be a finite number > 0"),
    (["--sigma", "1e308"], "sigma must be at most 1"),
    (["--outer-lr", "nan"], "outer_lr must be a finite number > 0"),
    (["--name", "a/b"], "invalid learned-optimizer name 'a/b'"),
    (["--outer-weights", "nowhere.json"], "give --outer-optimizer learned too"),  # ignored, then saved, then refused
])
def test_meta_train_refuses_bad_values_before_any_work(tmp_path, capsys, extra, match):
    out = tmp_path / "lopt"
    argv = ["meta-train", "--out", str(out), "--data-root", str(tmp_path / "no-data"), "--outer-steps", "1"]
    one_line_error(argv + extra, capsys, "meta-train", match)
    assert not out.exists()


def test_meta_train_refuses_an_out_that_is_a_file_and_leaves_it_alone(tmp_path, capsys):
    file = tmp_path / "passwd"
    file.write_text("keep me\n")
    one_line_error(["meta-train", "--out", str(file), "--data-root", str(tmp_path)], capsys, "meta-train",
                   "exists and is not a folder")
    assert file.read_text() == "keep me\n"


@pytest.mark.parametrize("argv, command", [
    (["bench", "--generator", "mnist-mlp", "--inits", "2"], "bench"),
    (["bench", "--mode", "lopt", "--inits", "2"], "bench"),
    (["tune-sampling", "--generator", "mnist-mlp", "--inits", "2"], "tune-sampling"),
    (["tune-head", "--generator", "mnist-mlp", "--groups", "2", "--check-groups", "1"], "tune-head"),
    (["demo"], "demo"),
])
def test_the_result_commands_check_seed_and_out_before_any_work(tmp_path, capsys, argv, command):
    file = tmp_path / "passwd"
    file.write_text("keep me\n")
    one_line_error(argv + ["--out", str(file)], capsys, command, "exists and is not a folder")
    assert file.read_text() == "keep me\n"
    out = tmp_path / "out"
    one_line_error(argv + ["--out", str(out), "--seed", "-5"], capsys, command, "--seed must be an integer from 0")
    one_line_error(argv + ["--out", str(out), "--seed", str(2**63)], capsys, command, "--seed must be an integer")
    assert not out.exists()


@pytest.mark.parametrize("argv, command, option", [
    (["bench", "--generator", "mnist-mlp", "--inits", "2"], "bench", "--no-plots"),
    (["tune-sampling", "--generator", "mnist-mlp", "--inits", "2"], "tune-sampling", "--no-plots"),
    (["tune-head", "--generator", "mnist-mlp", "--groups", "2", "--check-groups", "1"], "tune-head", "--no-plots"),
    (["eval", "--generator", "mnist-mlp", "--inits", "2"], "eval", "--no-plots"),
    (["demo"], "demo", "--no-plot"),
])
def test_the_commands_that_draw_refuse_before_any_work_where_matplotlib_is_missing(tmp_path, capsys, monkeypatch,
                                                                                   argv, command, option):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a runtime install, which has no matplotlib
    out = tmp_path / "out"
    one_line_error(argv + ["--out", str(out), "--data-root", str(tmp_path)], capsys, command,
                   f"or 'learned-opt[dev]'), or pass {option}\n")
    assert not out.exists()


def test_train_and_meta_train_refuse_to_export_over_weights_they_did_not_write(store_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    out.mkdir()
    for name in ("toy.json", "toy.safetensors", "lopt.json"):  # another job's outputs, e.g. tune-head's
        (out / name).write_text(f"{name} of another job\n")
    base = ["train", "--store", str(store_dir), "--steps", "2", "--batch-size", "4", "--diffusion-steps", "50",
            "--name", "toy"]
    one_line_error(base + ["--out", str(out)], capsys, "train", "holds weights that this job did not write")
    assert cli.main(base + ["--out", str(tmp_path / "gen")]) == 0
    capsys.readouterr()
    src = tmp_path / "src"  # a generator alone in its folder, fine-tuned into that folder
    src.mkdir()
    for suffix in (".json", ".safetensors"):
        (src / f"toy{suffix}").write_bytes((tmp_path / "gen" / f"toy{suffix}").read_bytes())
    one_line_error(base + ["--out", str(src), "--init-from", str(src / "toy.json")], capsys,
                   "train", "is what this job starts from")
    assert (src / "toy.json").read_bytes() == (tmp_path / "gen" / "toy.json").read_bytes()
    one_line_error(["meta-train", "--out", str(out), "--data-root", str(tmp_path / "no-data"), "--outer-steps", "1"],
                   capsys, "meta-train", "holds weights that this job did not write")
    assert all((out / n).read_text() == f"{n} of another job\n" for n in ("toy.json", "toy.safetensors", "lopt.json"))
    assert sorted(p.name for p in out.iterdir()) == ["lopt.json", "toy.json", "toy.safetensors"]


@pytest.mark.parametrize("argv, command, match", [
    (["corpus", "--task", "mnist-mlp", "--runs", "1", "--out", ""], "corpus", "--out is empty"),
    (["eval", "--generator", "mnist-mlp", "--out", " "], "eval", "--out is empty"),
    (["demo", "--out", ""], "demo", "--out is empty"),
    (["demo", "--steps", "-1"], "demo", "--steps and --eval-every must be >= 1"),
    (["train", "--out", "somewhere", "--export-only", "--no-export"], "train", "give one of them"),
])
def test_contradictions_and_empty_folders_are_refused_in_one_line(tmp_path, capsys, monkeypatch, argv, command, match):
    monkeypatch.chdir(tmp_path)
    one_line_error(argv, capsys, command, match)
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
