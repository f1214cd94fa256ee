"""The built wheel carries shipped generators and loads them from an installed copy (offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _tiny_into(weights_dir: Path) -> str:
    from learned_opt import tasks
    from learned_opt.diffusion import DiffusionConfig
    from learned_opt.generator import build_generator
    from learned_opt.normalization import Normalization
    from learned_opt.pretrained import save_generator

    torch.manual_seed(0)
    model = build_generator(tasks.get("mnist-mlp").layout(), "tiny")
    save_generator(
        weights_dir, "wheel-tiny", model, DiffusionConfig(), Normalization.from_stats(0.1, 0.0, 2.5),
        task="mnist-mlp", metric="test_loss", best_prompt=0.0, corpus={}, training={},
    )
    return json.loads((weights_dir / "wheel-tiny.json").read_text())["weights_sha256"]


@pytest.mark.slow
def test_wheel_ships_and_loads_generators(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    for package in ("learned_opt", "pretrain"):
        shutil.copytree(REPO / package, src / package, ignore=IGNORE)
    sha = _tiny_into(src / "learned_opt" / "weights")

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = dict(os.environ, PIP_NO_INDEX="1")
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("learned_opt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "learned_opt/weights/wheel-tiny.safetensors" in names and "learned_opt/weights/wheel-tiny.json" in names
    assert "learned_opt/py.typed" in names  # PEP 561: type checkers read the package's annotations

    # A fresh virtual environment. Its dependencies (torch, safetensors, ...) come from this
    # environment's site-packages through a .pth file; .pth files inside that folder (such as an
    # editable install of this checkout) are not processed, so learned_opt can only come from
    # the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (purelib / "_deps.pth").write_text("\n".join(deps) + "\n")
    # --target (not --prefix, which would uninstall this environment's own learned-opt first)
    install = subprocess.run(pip + ["install", "--no-deps", "--target", str(purelib), str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    probe = (
        "import json, learned_opt\n"
        "from learned_opt import list_pretrained, load_generator\n"
        "g = load_generator('wheel-tiny')\n"
        "print(json.dumps({'file': learned_opt.__file__, 'names': [x['name'] for x in list_pretrained()],"
        " 'sha': g.sha256, 'params': g.layout.num_params}))\n"
    )
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=run_env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(purelib.resolve())
    assert "wheel-tiny" in out["names"] and out["sha"] == sha and out["params"] == 7960
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "learned-opt = learned_opt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    cli = subprocess.run([str(py), "-m", "learned_opt.cli", "--help"], capture_output=True, text=True,
                         env=run_env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "corpus" in cli.stdout, cli.stderr[-2000:]
