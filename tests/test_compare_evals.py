"""benchmarks/compare_evals.py: paired per-init comparisons of two `learned-opt eval` results."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_evals.py"


def _result(folder: Path, sha: str, errors: list[float], seeds: list[int]) -> Path:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({
        "config": {"out": str(folder)}, "seeds": seeds, "generator": {"task": "mnist-cnn", "sha256": sha},
        "one_step": {"after": {"test_error": errors, "test_loss": [e / 30 for e in errors]}}}))
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_the_difference_is_taken_init_by_init(tmp_path):
    old = [30.0, 20.0, 25.0, 40.0]
    new = [29.0, 20.5, 24.0, 38.0]  # medians 27.5 and 26.5 barely differ; per init mostly lower
    a = _result(tmp_path / "new", "a" * 64, new, [1, 2, 3, 4])
    b = _result(tmp_path / "old", "b" * 64, old, [1, 2, 3, 4])
    done = _run(str(a), str(b / "eval.json"))
    assert done.returncode == 0, done.stderr
    row = json.loads((a / "compare.json").read_text())["one_update"]["test_error"]
    diff = [x - y for x, y in zip(new, old)]
    assert row["mean_difference"] == pytest.approx(statistics.fmean(diff))
    assert row["standard_error"] == pytest.approx(statistics.stdev(diff) / 2)
    assert (row["lower"], row["higher"], row["inits"]) == (3, 1, 4)
    assert "lower on 3 of 4" in done.stdout


def test_results_of_other_inits_are_refused(tmp_path):
    a = _result(tmp_path / "new", "a" * 64, [1.0, 2.0], [1, 2])
    b = _result(tmp_path / "old", "b" * 64, [1.0, 2.0], [1, 3])
    done = _run(str(a), str(b))
    assert done.returncode != 0 and "different inits" in done.stderr and "--seed" in done.stderr
    assert not (a / "compare.json").exists()


def test_a_pool_is_its_best_result_per_init_by_test_loss(tmp_path):
    old = _result(tmp_path / "old", "b" * 64, [30.0, 20.0, 25.0], [1, 2, 3])
    a = _result(tmp_path / "a", "a" * 64, [29.0, 21.0, 26.0], [1, 2, 3])
    c = _result(tmp_path / "c", "c" * 64, [31.0, 19.0, 27.0], [1, 2, 3])
    done = _run(str(a), str(old), "--pool", str(c), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    row = result["one_update"]["test_error"]
    best = [29.0, 19.0, 26.0]  # a, c, a: each init's lowest test loss (here test_error / 30)
    assert row["mean_difference"] == pytest.approx(statistics.fmean(b - o for b, o in zip(best, [30.0, 20.0, 25.0])))
    assert result["chosen"] == {str(a): 2, str(c): 1} and "pool of 2" in done.stdout
    # by test error where the test loss disagrees: c's first init has the lower error but the higher loss
    data = json.loads((c / "eval.json").read_text())
    data["one_step"]["after"].update(test_error=[28.0, 19.0, 27.0], test_loss=[9.0, 0.1, 9.0])
    (c / "eval.json").write_text(json.dumps(data))
    for by, first in (("test_loss", 29.0), ("test_error", 28.0)):
        done = _run(str(a), str(old), "--pool", str(c), "--by", by, "--out", str(tmp_path / by))
        assert done.returncode == 0, done.stderr
        row = json.loads((tmp_path / by / "compare.json").read_text())["one_update"]["test_error"]
        assert row["mean_difference"] == pytest.approx(statistics.fmean(
            x - o for x, o in zip([first, 19.0, 26.0], [30.0, 20.0, 25.0])))
    other = _result(tmp_path / "other", "d" * 64, [1.0, 2.0, 3.0], [1, 2, 4])
    done = _run(str(a), str(old), "--pool", str(other))
    assert done.returncode != 0 and "other inits" in done.stderr
