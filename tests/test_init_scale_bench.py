"""benchmarks/init_scale.py: one update from scaled inits, generators side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_demo import save_tiny_mnist_generator

ROOT = Path(__file__).resolve().parents[1]


def test_every_generator_updates_the_same_scaled_inits(mnist_root, tmp_path):
    a = save_tiny_mnist_generator(tmp_path / "a", seed=0)
    b = save_tiny_mnist_generator(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "init_scale.py"), "--generators", str(a), str(b),
                           "--data-root", str(mnist_root), "--out", str(out), "--inits", "2", "--scales", "1,3"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    r = json.loads((out / "init_scale.json").read_text())
    first, second = r["generators"].values()
    assert r["scales"] == [1.0, 3.0] and first["sha256"] != second["sha256"]
    for s in ("1.0", "3.0"):  # one set of inits for both generators, scaled as the corpus scales them
        assert first["scales"][s]["before"] == second["scales"][s]["before"]
        assert first["scales"][s]["after"] != second["scales"][s]["after"]
    loss = first["scales"]["3.0"]["before"]["test_loss"]
    assert all(x > y for x, y in zip(loss, first["scales"]["1.0"]["before"]["test_loss"]))  # wider: a worse start
    assert (out / "init_scale.png").stat().st_size > 1000
