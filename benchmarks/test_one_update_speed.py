"""One generative update from a fresh init against the Adam steps it replaces, side by side.

Run::

    .venv/bin/python -m pytest benchmarks/test_one_update_speed.py -s

A reduced ``learned-opt eval`` with the shipped ``mnist-mlp`` generator and its own sampler, on
``LEARNED_OPT_BENCH_INITS`` unseen inits (default 5; seeds 1,000,000 + i), once with one sample per
update and once with ``--candidates 8`` (the best of 8 by the cross-entropy on the last 5,000
training examples, as ``GptOptimizer(candidates=8)`` with a held-out closure). For each: the
median test error after the update, the Adam steps (lr 1e-3, batch 128) the same inits need to
reach the update's test loss (on a 1-2-3-5 grid up to 1,000 steps), and the update's wall time
against those steps' (Adam's seconds per step timed in the same run): ``median_speedup_vs_adam``
above 1 means the update is cheaper. ``LEARNED_OPT_BENCH_THREADS`` torch threads (2). Skipped
while no ``mnist-mlp`` generator ships.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from learned_opt import tasks
from learned_opt.errors import DataNotFoundError
from learned_opt.pretrained import list_pretrained
from pretrain.evaluate import EvalConfig, evaluate_generator

REPO = Path(__file__).resolve().parents[1]
INITS = int(os.environ.get("LEARNED_OPT_BENCH_INITS", "5"))
THREADS = int(os.environ.get("LEARNED_OPT_BENCH_THREADS", "2"))
OUT = Path(os.environ.get("LEARNED_OPT_BENCH_OUT", REPO / ".benchmarks" / "one-update"))


@pytest.fixture(scope="module")
def mnist():
    if "mnist-mlp" not in {g["name"] for g in list_pretrained()}:
        pytest.skip("no mnist-mlp generator is shipped")
    root = os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data"
    try:
        return tasks.get("mnist-mlp").load_data(root)
    except DataNotFoundError as exc:
        pytest.skip(f"MNIST not found: {exc}")


@pytest.mark.parametrize("candidates", [1, 8])
def test_one_update_against_adam_steps(benchmark, mnist, candidates):
    config = EvalConfig(generator="mnist-mlp", out=str(OUT / f"candidates-{candidates}"), inits=INITS,
                        candidates=candidates, max_steps=1000, prompts=2, repeats=1, progress=False, plots=False)
    r = benchmark.pedantic(evaluate_generator, args=(config, mnist), rounds=1, iterations=1)
    t, one = r["timing"], r["one_step"]["summary"]
    benchmark.group = "one update vs Adam"
    benchmark.extra_info.update(
        candidates=candidates, inits=INITS, threads=THREADS, sampler=r["sampler"],
        test_error_before=one["before_test_error"]["median"], test_error_after=one["after_test_error"]["median"],
        adam_steps_to_reach=r["baselines"]["summary"]["adam_steps_to_reach"]["median"],
        update_seconds=t["update_seconds"], adam_seconds_per_step=t["adam_seconds_per_step"],
        median_speedup_vs_adam=t["median_speedup_vs_adam"],
    )
    print(f"\ncandidates={candidates}: test error {one['before_test_error']['median']:.1f}% -> "
          f"{one['after_test_error']['median']:.1f}%; Adam needs "
          f"{r['baselines']['summary']['adam_steps_to_reach']['median']} steps; update {t['update_seconds'] * 1e3:.1f} ms "
          f"vs {t['adam_seconds_per_step'] * 1e3:.3f} ms/step: {t['median_speedup_vs_adam']:.2f}x")
    assert one["after_test_error"]["median"] < one["before_test_error"]["median"]
