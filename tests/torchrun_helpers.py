"""Start a script under ``torchrun`` with two CPU processes (gloo) and check that it succeeded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_two_processes(script: Path, *args, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 script args...``, one thread
    per process; fails the test with the tail of its output unless every process exited with 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def end_worker() -> None:
    """End a torchrun worker once every rank has written what the test reads: exit at once, without
    the interpreter's teardown, where a gloo group's threads now and then abort the process
    ("terminate called without an active exception", a torch teardown race that these tests are not about)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
