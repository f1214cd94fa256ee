import subprocess
import sys

import pytest

from learned_opt import cli


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "corpus" in out and "train" in out


def test_runtime_package_works_without_pretrain():
    # learned_opt must import and run with the `pretrain` package absent: block it and use the CLI.
    code = (
        "import sys; sys.modules['pretrain'] = None\n"
        "import learned_opt, torch\n"
        "from learned_opt import cli, tasks, GptOptimizer\n"
        "parser = cli.build_parser()\n"
        "print('commands:', sorted(parser._subparsers._group_actions[0].choices))\n"
        "print(tasks.get('mnist-mlp').num_params)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    commands = run.stdout.splitlines()[0]
    assert "corpus" not in commands and "train" not in commands and "7960" in run.stdout


def test_unknown_task_is_one_line_and_exit_code_2(capsys, tmp_path):
    code = cli.main(["corpus", "--task", "nope", "--runs", "1", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown task 'nope'" in err


def eval_raising(monkeypatch, error: BaseException) -> int:
    """``learned-opt eval`` whose work raises ``error``: the CLI's exit code (or what it lets through)."""
    import importlib

    def fail(args):
        raise error

    monkeypatch.setattr(importlib.import_module(cli.COMMANDS["eval"][0]), "main", fail)
    return cli.main(["eval", "--generator", "g", "--out", "o"])


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                 "you tried to allocate 12499999999992 bytes."),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_and_other_errors_propagate(monkeypatch, capsys, error):
    assert eval_raising(monkeypatch, error) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err and "lower the sizes or counts" in err
    with pytest.raises(RuntimeError, match="a bug"):
        eval_raising(monkeypatch, RuntimeError("a bug, not memory"))


def test_a_file_that_cannot_be_written_mid_job_is_one_line(monkeypatch, capsys):
    assert eval_raising(monkeypatch, OSError(28, "No space left on device", "runs/x/.eval.json.tmp")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "free space, then run" in err
    with pytest.raises(FileNotFoundError):  # not a full disk or a permission: a traceback, as any bug
        eval_raising(monkeypatch, FileNotFoundError(2, "No such file or directory", "a path a bug made up"))


@pytest.mark.parametrize("command", [["eval", "--generator", "mnist-mlp"], ["bench", "--generator", "mnist-mlp"],
                                     ["tune-sampling", "--generator", "mnist-mlp"], ["tune-head", "--generator", "mnist-mlp"],
                                     ["demo"]])
def test_an_out_folder_that_cannot_be_written_is_refused_before_any_work(monkeypatch, capsys, tmp_path, command):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    assert cli.main([*command, "--out", str(locked / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be written (nor can it be made in" in err, err
    assert not (locked / "new").exists()
