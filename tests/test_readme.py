"""The README's Python example runs as it is (so it can never rot), and its test command is the one
``.ci/run`` runs."""

import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -q -c constraints.txt -e ".[dev]" && python -m pytest -q'


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_stays_a_front_door():
    assert len(README.splitlines()) <= 260
    assert "learned-opt demo" in README and "docs/your-own-model.md" in README
    assert "OMP_NUM_THREADS" in README and "torch.set_num_threads" in README


def test_readme_and_ci_run_the_same_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in README
    assert 'pip install -q -c constraints.txt -e ".[dev]" && python -m pytest -q' in ci


def run_example(example: str, tmp_path: Path, mnist_root) -> subprocess.CompletedProcess:
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    env = {**os.environ, "LEARNED_OPT_DATA": str(mnist_root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_readme_has_two_examples():
    assert len(python_blocks(README)) == 2  # "Use it" (mnist-mlp), then mnist-cnn under the generators


def test_the_readme_example_runs_as_it_is(tmp_path, mnist_root):
    done = run_example(python_blocks(README)[0], tmp_path, mnist_root)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("random init:") and "one generative update (accepted" in lines[1], done.stdout
    after_update = float(re.search(r"([\d.]+)% test error", lines[1]).group(1))
    assert after_update < 20.0, done.stdout  # the shipped generator: about 10% from ~90%
    assert lines[2].startswith("after 300 Adam steps:")


def test_the_readme_cnn_example_runs_as_it_is(tmp_path, mnist_root):
    done = run_example(python_blocks(README)[1], tmp_path, mnist_root)
    assert done.stdout.strip() == "mnist-cnn, one update: accepted", done.stdout
