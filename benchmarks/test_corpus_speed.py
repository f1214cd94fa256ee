"""Corpus throughput: the batched builder against one model at a time (G.pt's way), side by side.

For each task in ``LEARNED_OPT_BENCH_TASKS`` (``mnist-mlp,mnist-cnn``), every side trains the same
runs (G.pt's recipe, same seeds, inits, data orders and saved steps), evaluates every saved
checkpoint with the task's metrics and writes each run to a store:

* ``one-at-a-time``: ``nn.Module`` + ``torch.optim`` SGD-Nesterov + a per-epoch cosine schedule, one
  run after another (``pretrain.corpus.train_run_reference``), each checkpoint evaluated on its
  own (``task.evaluate`` on one parameter vector);
* ``batched``: ``pretrain.corpus.build_corpus`` (all runs trained together, checkpoints evaluated
  together; gradients by the trainer's default: the hand-written path for ReLU MLPs, else the
  faster ``torch.func`` strategy);
* ``batched-functional`` (ReLU MLPs only): the same with ``--gradient vmap``, the generic path,
  to measure what the hand-written one is worth.

``test_checkpoint_evaluation`` times evaluating one run's checkpoints on the full test set.

Run::

    .venv/bin/python -m pytest benchmarks/test_corpus_speed.py -s

Sizes from the environment: ``LEARNED_OPT_BENCH_RUNS`` (8), ``LEARNED_OPT_BENCH_EPOCHS`` (25, G.pt's recipe;
``LEARNED_OPT_BENCH_CNN_EPOCHS``, 1, for convolutional tasks),
``LEARNED_OPT_BENCH_CHECKPOINTS`` (200), ``LEARNED_OPT_BENCH_THREADS`` (2; both sides use the same
number of torch threads). On a machine shared with other jobs, tiny single-model steps suffer most
from OpenMP threads waiting on a busy core; compare with ``LEARNED_OPT_BENCH_THREADS=1`` to see how
much of a ratio is that effect (the load average is recorded with the results). Results (runs/minute of each side and their ratio,
training and evaluation seconds, checkpoints/s, bytes/checkpoint) are printed and written as JSON
to ``LEARNED_OPT_BENCH_OUT`` (default ``.benchmarks/corpus_speed.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from learned_opt import tasks
from pretrain.corpus import CorpusConfig, batched_gradient, build_corpus, plan_runs, train_run_reference
from pretrain.store import RunRecord, Store

REPO = Path(__file__).resolve().parents[1]
RUNS = int(os.environ.get("LEARNED_OPT_BENCH_RUNS", "8"))
EPOCHS = int(os.environ.get("LEARNED_OPT_BENCH_EPOCHS", "25"))  # G.pt recipe
CNN_EPOCHS = int(os.environ.get("LEARNED_OPT_BENCH_CNN_EPOCHS", "1"))  # a CNN run costs ~30x an MLP's
TASKS = os.environ.get("LEARNED_OPT_BENCH_TASKS", "mnist-mlp,mnist-cnn").split(",")
CHECKPOINTS = int(os.environ.get("LEARNED_OPT_BENCH_CHECKPOINTS", "200"))
THREADS = int(os.environ.get("LEARNED_OPT_BENCH_THREADS", "2"))  # torch intra-op threads, both sides
OUT = Path(os.environ.get("LEARNED_OPT_BENCH_OUT", REPO / ".benchmarks" / "corpus_speed.json"))
RESULTS: dict[str, dict[str, dict]] = {}  # task -> builder -> result


def epochs_of(task) -> int:
    with torch.device("meta"):
        convolutional = any(isinstance(m, torch.nn.Conv2d) for m in task.build_model().modules())
    return CNN_EPOCHS if convolutional else EPOCHS


@pytest.fixture(scope="module")
def mnist():
    root = os.environ.get("LEARNED_OPT_DATA") or REPO.parent / "shared" / "data"
    return tasks.get("mnist-mlp").load_data(root)


class TimedTask:
    """Wraps a task's ``evaluate`` to add up the seconds spent evaluating."""

    def __init__(self, name: str):
        self.task = tasks.get(name)
        self.seconds = 0.0
        inner = self.task.evaluate

        def evaluate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self.task.evaluate = evaluate


def one_at_a_time(out: Path, data, timed: TimedTask) -> dict:
    """G.pt's way: one model, one torch.optim optimizer, one run after another."""
    task = timed.task
    store = Store.create(out, task)
    plans = plan_runs(range(RUNS), base_seed=0, num_examples=len(data.train_x), gpt_recipe=True,
                      epochs=epochs_of(task), num_checkpoints=CHECKPOINTS)
    checkpoints = nbytes = 0
    for plan in plans:
        params = train_run_reference(task, plan, data.train_x, data.train_y)  # [K, P]
        per_ckpt = [task.evaluate(params[k : k + 1], data) for k in range(params.shape[0])]
        metrics = {m: torch.cat([e[m] for e in per_ckpt]) for m in per_ckpt[0]}
        store.write_run(plan.run_id, RunRecord(params, plan.checkpoint_steps(), metrics, plan.hparams, plan.seed))
        checkpoints += params.shape[0]
        nbytes += store.run_path(plan.run_id).stat().st_size
    return {"runs": len(plans), "checkpoints": checkpoints, "bytes": nbytes}


def batched(out: Path, data, timed: TimedTask, gradient: str = "auto") -> dict:
    config = CorpusConfig(task=timed.task, runs=RUNS, out=str(out), gpt_recipe=True, epochs=epochs_of(timed.task),
                          checkpoints=CHECKPOINTS, batch_runs=max(RUNS, 1), progress=False, gradient=gradient)
    s = build_corpus(config, data=data)
    return {"runs": s.written + s.dropped, "checkpoints": s.checkpoints, "bytes": s.bytes}


def batched_functional(out: Path, data, timed: TimedTask) -> dict:
    return batched(out, data, timed, gradient="vmap")


BUILDERS = {"one-at-a-time": one_at_a_time, "batched": batched, "batched-functional": batched_functional}


@pytest.mark.benchmark(group="corpus-throughput")
@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("name", TASKS)
def test_corpus_throughput(benchmark, name, builder, mnist, tmp_path):
    timed = TimedTask(name)
    if builder == "batched-functional" and batched_gradient(timed.task, mnist.train_x[:2], mnist.train_y[:2]).name != "mlp":
        pytest.skip("the default path is already the functional one")
    fn = BUILDERS[builder]
    epochs = epochs_of(timed.task)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    done = benchmark.pedantic(fn, args=(tmp_path / builder, mnist, timed), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    assert done["runs"] == RUNS and len(Store.open(tmp_path / builder)) == RUNS
    result = {
        **done,
        "seconds": seconds,
        "eval_seconds": timed.seconds,
        "train_seconds": seconds - timed.seconds,  # training + writing
        "runs_per_minute": 60.0 * RUNS / seconds,
        "checkpoints_per_s": done["checkpoints"] / seconds,
        "bytes_per_checkpoint": done["bytes"] / done["checkpoints"],
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute load before and after
    }
    benchmark.extra_info.update(result)
    results = RESULTS.setdefault(name, {})
    results[builder] = result
    print(f"\n{name} {builder}: {RUNS} runs x {epochs} epochs, {result['runs_per_minute']:.2f} runs/min, "
          f"{result['checkpoints_per_s']:.1f} checkpoints/s, {result['bytes_per_checkpoint']:,.0f} bytes/checkpoint, "
          f"train {result['train_seconds']:.1f} s + eval {result['eval_seconds']:.1f} s")
    if "one-at-a-time" in results and "batched" in results:
        base, fast = results["one-at-a-time"], results["batched"]
        summary = {
            "runs": RUNS, "epochs": epochs, "checkpoints_per_run": CHECKPOINTS, "threads": THREADS, "cpus": os.cpu_count(),
            "ratio_runs_per_minute": fast["runs_per_minute"] / base["runs_per_minute"],
            "ratio_training": base["train_seconds"] / fast["train_seconds"],
            "ratio_evaluation": base["eval_seconds"] / fast["eval_seconds"],
            "target_ratio": 3.0,
            **{k.replace("-", "_"): v for k, v in results.items()},
        }
        if "batched-functional" in results:  # the hand-written MLP path against the generic one
            summary["ratio_training_mlp_path_vs_functional"] = (
                results["batched-functional"]["train_seconds"] / fast["train_seconds"])
        benchmark.extra_info["ratio_runs_per_minute"] = summary["ratio_runs_per_minute"]
        everything = json.loads(OUT.read_text()) if OUT.exists() else {}
        everything = everything if "tasks" in everything else {"tasks": {}}
        everything["tasks"][name] = summary
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(everything, indent=1) + "\n")
        print(f"{name} batched / one-at-a-time: {summary['ratio_runs_per_minute']:.2f}x runs per minute "
              f"(training {summary['ratio_training']:.2f}x, evaluation {summary['ratio_evaluation']:.2f}x; "
              f"target 3x) -> {OUT}")
        if "ratio_training_mlp_path_vs_functional" in summary:
            print(f"{name} hand-written MLP path vs torch.func vmap: {summary['ratio_training_mlp_path_vs_functional']:.2f}x "
                  "faster training (kept above 1.3x)")


@pytest.mark.benchmark(group="checkpoint-evaluation")
@pytest.mark.parametrize("name", TASKS)
def test_checkpoint_evaluation(benchmark, name, mnist):
    """Seconds to evaluate one run's ``CHECKPOINTS`` checkpoints (all metrics, full test set)."""
    task = tasks.get(name)
    torch.manual_seed(0)
    flat = torch.stack([task.layout().flatten_module(task.build_model()) for _ in range(CHECKPOINTS)])
    start = time.perf_counter()
    benchmark.pedantic(task.evaluate, args=(flat, mnist), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    benchmark.extra_info["seconds_per_run"] = seconds
    print(f"\n{name}: evaluating {CHECKPOINTS} checkpoints on {len(mnist.test_x):,} test and "
          f"{task.train_loss_examples:,} training images: {seconds:.1f} s per run")
