"""Tasks named by file or module: what works, and every way a user's task can be wrong.

Each bad input is one line on stderr, exit code 2, and nothing already written is lost.
"""

from __future__ import annotations

import textwrap

import pytest

from learned_opt import cli, tasks
from learned_opt.errors import UnknownTaskError

GOOD = """
from torch import nn
from learned_opt.tasks import SupervisedTask, load_mnist

class Mnist16(SupervisedTask):
    name = "user-mnist-16"
    def build_model(self):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    def load_data(self, root=None, *, download=False):
        return load_mnist(root, download=download)
"""


def write(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def corpus(tmp_path, task: str, out: str = "c", *extra: str) -> list[str]:
    return ["corpus", "--task", task, "--runs", "1", "--epochs", "1", "--train-examples", "128", "--checkpoints", "3",
            "--out", str(tmp_path / out), "--no-progress", *extra]


def one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_task_file_is_loaded_registered_and_found_again(tmp_path, mnist_root):
    ref = f"{write(tmp_path, 'good.py', GOOD)}:Mnist16"
    task = tasks.get(ref)
    assert task.name == "user-mnist-16" and task.kind == "supervised" and task.num_params == 784 * 16 + 16 + 170
    assert tasks.get("user-mnist-16").num_params == task.num_params  # registered under its name
    assert tasks.source_of(task).endswith("good.py:Mnist16")
    assert tasks.get("learned_opt.tasks.mnist_cnn:MnistCNN").name == "mnist-cnn"  # module:Class


@pytest.mark.parametrize("body, ref, message", [
    (None, "missing.py:Task", "does not exist"),
    (GOOD, "{path}:Nope", "has no class 'Nope'; tasks defined there: Mnist16"),
    ("raise RuntimeError('broken on purpose')\n", "{path}:Task", "raised on import: RuntimeError: broken on purpose"),
    (GOOD, "no.such.module:Task", "cannot import task module 'no.such.module'"),
    ("class NotATask:\n    pass\n", "{path}:NotATask", "is not a learned_opt.tasks.Task subclass"),
    (GOOD.replace('    name = "user-mnist-16"', '    name = "user-mnist-16"\n\n    def __init__(self):\n'
                  '        raise ValueError("no config file")'),
     "{path}:Mnist16", "raised when created: ValueError: no config file; fix its __init__"),
    (GOOD.replace('name = "user-mnist-16"', 'name = "../../elsewhere"'), "{path}:Mnist16",
     "is named '../../elsewhere': a task's name becomes a file name"),
    (GOOD.replace('name = "user-mnist-16"', 'name = "user-broken-model"').replace(
        "return nn.Sequential(", "raise RuntimeError('boom')\n        return nn.Sequential("), "{path}:Mnist16",
     "build_model() raised RuntimeError: boom; fix it and run again"),
])
def test_a_task_reference_that_cannot_be_loaded_is_one_line(tmp_path, capsys, body, ref, message):
    path = write(tmp_path, "t.py", body) if body else tmp_path / "missing.py"
    err = one_line_error(capsys, corpus(tmp_path, ref.format(path=path)))
    assert message in err
    assert not (tmp_path / "c").exists()  # nothing created


def test_a_task_file_that_is_not_python_is_one_line(tmp_path, capsys):
    path = write(tmp_path, "task.txt", GOOD)
    assert "is not a .py file" in one_line_error(capsys, corpus(tmp_path, f"{path}:Mnist16"))


def test_a_user_task_may_not_take_a_registered_name(tmp_path, capsys):
    body = GOOD.replace('name = "user-mnist-16"', 'name = "mnist-mlp"')
    err = one_line_error(capsys, corpus(tmp_path, f"{write(tmp_path, 'clash.py', body)}:Mnist16"))
    assert "'mnist-mlp', which is already a registered task; give your task another name" in err
    with pytest.raises(UnknownTaskError):
        tasks.get(f"{tmp_path / 'clash.py'}:Mnist16")
    assert tasks.get("mnist-mlp").num_params == 7960  # the registered task is untouched


@pytest.mark.parametrize("model, message", [
    ("nn.Sequential(nn.Flatten(), nn.Linear(100, 10))", "the model's forward or loss fails on the task's data"),
    ("nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))", "holds buffers"),
    ("frozen()", "do not require grad"),
])
def test_a_model_the_corpus_cannot_train_is_one_line(tmp_path, capsys, mnist_root, model, message):
    body = GOOD.replace(
        "        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))",
        f"        return {model}",
    ) + textwrap.dedent("""
        def frozen():
            m = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
            m[1].bias.requires_grad_(False)
            return m
    """)
    err = one_line_error(capsys, corpus(tmp_path, f"{write(tmp_path, 'bad_model.py', body)}:Mnist16",
                                        "c", "--data-root", str(mnist_root)))
    assert message in err


def test_neuron_tokens_of_an_unsupported_module_say_which(tmp_path):
    from learned_opt.symmetry import module_symmetry
    from torch import nn

    with pytest.raises(Exception, match="unsupported module LayerNorm at '2'"):
        module_symmetry(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))


def test_a_store_of_another_task_is_refused_and_kept(tmp_path, capsys, mnist_root):
    ref = f"{write(tmp_path, 'good.py', GOOD)}:Mnist16"
    assert cli.main(corpus(tmp_path, ref, "c", "--data-root", str(mnist_root))) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "c" / "runs").iterdir())
    err = one_line_error(capsys, corpus(tmp_path, "mnist-mlp", "c", "--data-root", str(mnist_root)))
    assert "is a store of task 'user-mnist-16', not 'mnist-mlp'" in err
    assert sorted(p.name for p in (tmp_path / "c" / "runs").iterdir()) == runs  # nothing lost


def test_installed_packages_register_tasks_through_entry_points(monkeypatch):
    from importlib import metadata

    from learned_opt.tasks import registry

    point = metadata.EntryPoint(name="acrobot-from-a-package", value="acrobot_task:AcrobotMLP",
                                group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if not k.startswith("__")})
    assert "acrobot-from-a-package" in tasks.names()
    task = tasks.get("acrobot-from-a-package")
    assert task.kind == "control" and task.env_id == "Acrobot-v1"
