"""One generative update from a fresh init against the optimizer steps it replaces, side by side.

Run::

    .venv/bin/python -m pytest benchmarks/test_one_update_speed.py -s

MNIST: a reduced ``learned-opt eval`` with the shipped ``mnist-mlp`` generator and its own sampler, on
``LEARNED_OPT_BENCH_INITS`` unseen inits (default 5; seeds 1,000,000 + i), once with one sample per
update and once with ``--candidates 8`` at sampling temperature 0.5 (the best of 8 by the
cross-entropy on the last 5,000 training examples, as ``GptOptimizer(candidates=8,
sampling_temperature=0.5)`` with a held-out closure; at the generator's own temperature 0 the 8
samples would be one); and the shipped
``mnist-cnn`` generator with one sample. For each: the median test error after the update, the Adam
steps (lr 1e-3, batch 128) the same inits need to reach the update's test loss (on a 1-2-3-5 grid up
to 11,700 steps for ``mnist-mlp``, 3,000 for ``mnist-cnn``: the first grid step at or below it, so the ratio can double between two grid
steps), the update's wall time as a number of Adam steps (grid-free), and against the steps that
reach it (Adam's seconds per step timed in the same run): ``median_speedup_vs_adam`` above 1 means
the update is cheaper.

CartPole: the same with the shipped ``cartpole-mlp`` generator and one sample per update: the
median greedy return after the update, the share of inits at 475 or more (CartPole-v1's solved
threshold), the environment steps PPO (default hyperparameters) needs from the same inits to reach
the update's return and to reach 475 (up to 100,000), and the update's wall time against PPO's for
the steps to the update's return (PPO's seconds per env step timed in the same run).

``LEARNED_OPT_BENCH_THREADS`` torch threads (2). Each test is skipped while its generator does not
ship.
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


def _shipped(name: str) -> None:
    if name not in {g["name"] for g in list_pretrained()}:
        pytest.skip(f"no {name} generator is shipped")


def _mnist(name: str):
    _shipped(name)
    root = os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data"
    try:
        return tasks.get(name).load_data(root)
    except DataNotFoundError as exc:
        pytest.skip(f"MNIST not found: {exc}")


# (generator, candidates, their sampling temperature (None: the generator's own), the Adam steps searched
# for the update's loss: about where its runs end)
MNIST_CASES = [("mnist-mlp", 1, None, 11_700), ("mnist-mlp", 8, 0.5, 11_700), ("mnist-cnn", 1, None, 3000)]


@pytest.mark.parametrize("name,candidates,temperature,max_steps", MNIST_CASES)
def test_one_update_against_adam_steps(benchmark, name, candidates, temperature, max_steps):
    config = EvalConfig(generator=name, out=str(OUT / f"{name}-candidates-{candidates}"), inits=INITS,
                        candidates=candidates, temperature=temperature, max_steps=max_steps, prompts=2, repeats=1,
                        progress=False, plots=False)
    r = benchmark.pedantic(evaluate_generator, args=(config, _mnist(name)), rounds=1, iterations=1)
    t, one = r["timing"], r["one_step"]["summary"]
    benchmark.group = "one update vs Adam"
    benchmark.extra_info.update(
        generator=name, candidates=candidates, inits=INITS, threads=THREADS, sampler=r["sampler"],
        test_error_before=one["before_test_error"]["median"], test_error_after=one["after_test_error"]["median"],
        adam_steps_to_reach=r["baselines"]["summary"]["adam_steps_to_reach"]["median"],
        update_seconds=t["update_seconds"], adam_seconds_per_step=t["adam_seconds_per_step"],
        median_speedup_vs_adam=t["median_speedup_vs_adam"],
    )
    steps, speedup = r["baselines"]["summary"]["adam_steps_to_reach"]["median"], t["median_speedup_vs_adam"]
    reach = (f"Adam needs {steps} steps (1-2-3-5 grid): {speedup:.2f}x" if speedup is not None
             else f"Adam does not reach it within {max_steps} steps")
    print(f"\n{name}, candidates={candidates}: test error {one['before_test_error']['median']:.1f}% -> "
          f"{one['after_test_error']['median']:.1f}%; update {t['update_seconds'] * 1e3:.1f} ms = the wall time of "
          f"{t['update_seconds'] / t['adam_seconds_per_step']:.0f} Adam steps ({t['adam_seconds_per_step'] * 1e3:.3f} ms); "
          f"{reach}")
    assert one["after_test_error"]["median"] < one["before_test_error"]["median"]


def test_one_update_against_ppo_env_steps(benchmark):
    _shipped("cartpole-mlp")
    config = EvalConfig(generator="cartpole-mlp", out=str(OUT / "cartpole"), inits=INITS, max_env_steps=100_000,
                        prompts=2, repeats=1, progress=False, plots=False)
    task = tasks.get("cartpole-mlp")
    r = benchmark.pedantic(evaluate_generator, args=(config, task.load_data()), rounds=1, iterations=1)
    t, one, ppo = r["timing"], r["one_step"]["summary"], r["baselines"]["summary"]
    solved = r["one_step"]["solved"]["share"]["1"]
    benchmark.group = "one update vs PPO"
    benchmark.extra_info.update(
        inits=INITS, threads=THREADS, sampler=r["sampler"],
        return_before=one["before_return"]["median"], return_after=one["after_return"]["median"], solved_share=solved,
        ppo_env_steps_to_reach=ppo["ppo_steps_to_reach"]["median"], ppo_env_steps_to_solve=ppo["ppo_steps_to_solve"]["median"],
        update_seconds=t["update_seconds"], ppo_seconds_per_env_step=t["ppo_seconds_per_env_step"],
        median_speedup_vs_ppo=t["median_speedup_vs_ppo"],
    )
    print(f"\ncartpole: return {one['before_return']['median']:.1f} -> {one['after_return']['median']:.1f} "
          f"({solved:.0%} at >= {task.solved_return:g}); PPO needs {ppo['ppo_steps_to_reach']['median']} env steps to reach it "
          f"and {ppo['ppo_steps_to_solve']['median']} to reach {task.solved_return:g}; update {t['update_seconds'] * 1e3:.1f} ms vs "
          f"{t['ppo_seconds_per_env_step'] * 1e6:.0f} us/env step: {t['median_speedup_vs_ppo']:.2f}x")
    assert one["after_return"]["median"] > one["before_return"]["median"]
