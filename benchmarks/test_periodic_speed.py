"""Periodic mode against its base optimizer: steps and seconds to the base's target, side by side.

Run::

    .venv/bin/python -m pytest benchmarks/test_periodic_speed.py -s

One reduced ``learned-opt bench --mode periodic`` run with the shipped ``mnist-mlp`` generator:
``LEARNED_OPT_BENCH_INITS`` inits (default 3), ``LEARNED_OPT_BENCH_STEPS`` steps (1000), Adam alone
and Adam inside ``GptOptimizer(every=LEARNED_OPT_BENCH_EVERY)`` (100), run init by init in one
process, so that load on a shared machine hits both alike; ``LEARNED_OPT_BENCH_THREADS`` torch
threads (1). The closure measures the held-out slice of the training set (5,000 examples), the
test loss is measured every 50 steps, untimed. Prints the ratio table (steps and seconds to the
target over the base alone's: below 1 is faster) and keeps ``bench.json`` and ``periodic.png`` in
``LEARNED_OPT_BENCH_OUT`` (default ``.benchmarks/periodic``). Skipped while no ``mnist-mlp``
generator is shipped (``learned_opt.list_pretrained()``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from learned_opt import tasks
from learned_opt.errors import DataNotFoundError
from learned_opt.pretrained import list_pretrained
from pretrain.bench import BenchConfig, format_summary, run_bench

REPO = Path(__file__).resolve().parents[1]
INITS = int(os.environ.get("LEARNED_OPT_BENCH_INITS", "3"))
STEPS = int(os.environ.get("LEARNED_OPT_BENCH_STEPS", "1000"))
EVERY = int(os.environ.get("LEARNED_OPT_BENCH_EVERY", "100"))
THREADS = int(os.environ.get("LEARNED_OPT_BENCH_THREADS", "1"))
OUT = Path(os.environ.get("LEARNED_OPT_BENCH_OUT", REPO / ".benchmarks" / "periodic"))


def _shipped_generator() -> str | None:
    """The shipped generator for ``mnist-mlp`` (the one named after the task first), or None."""
    found = [g["name"] for g in list_pretrained() if g["task"] == "mnist-mlp"]
    return "mnist-mlp" if "mnist-mlp" in found else (found[0] if found else None)


def test_periodic_against_adam(benchmark):
    name = _shipped_generator()
    if name is None:
        pytest.skip("no mnist-mlp generator is shipped yet (learned_opt.list_pretrained() lists none); "
                    "run `learned-opt bench --generator PATH.json` with a trained one instead")
    root = os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data"
    try:
        data = tasks.get("mnist-mlp").load_data(root)
    except DataNotFoundError as exc:
        pytest.skip(f"MNIST not found: {exc}")
    config = BenchConfig(generator=name, out=str(OUT), inits=INITS, steps=STEPS, bases=("adam",), every=(EVERY,),
                         progress=False)
    result = benchmark.pedantic(run_bench, args=(config, data), rounds=1, iterations=1)
    print("\n" + format_summary(result))
    s = result["bases"]["adam"]["configs"][f"every={EVERY}"]["summary"]
    benchmark.extra_info.update(
        generator=name, inits=INITS, steps=STEPS, every=EVERY, threads=THREADS,
        target=result["bases"]["adam"]["target"], curve_steps_ratio=s["curve_steps_ratio"],
        curve_wall_ratio=s["curve_wall_ratio"], steps_ratio=s["steps_ratio"], wall_ratio=s["wall_ratio"],
        reached=s["reached"], never_worse=s["never_worse"], acceptance_rate=s["acceptance_rate"],
    )
    assert s["attempted"] == INITS * (STEPS // EVERY)
