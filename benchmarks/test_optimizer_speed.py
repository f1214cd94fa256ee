"""Speed of GptOptimizer against plain Adam, and the cost of one generative update.

Run (prints one table per group; the numbers in parentheses are ratios to the fastest row)::

    python -m pytest benchmarks/test_optimizer_speed.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,mean,rounds

Groups:

* ``step: iteration`` — zero_grad + forward + backward + step of the MNIST MLP (784-10-10) on one
  batch of 128 real MNIST training images (random images of the same shape when MNIST is not
  found; ``extra_info["data"]`` says which), Adam vs GptOptimizer(every=None), one thread.
  Target: ≤ 5%.
* ``step: ..., interleaved`` — each pair above alternated in one loop; ``extra_info["ratio"]`` is
  the ratio of their medians (the fairest figure on a busy machine; printed with ``-s``).
* ``step: optimizer only`` — ``opt.step()`` alone with fixed gradients: the wrapper's own cost.
* ``generative update`` — one ``generate(metric=...)`` (DDIM, 50 steps) with untrained ``tiny``
  and ``small`` generators for the MNIST MLP, on CPU (one thread, and all threads) and (when
  present) CUDA. ``extra_info``
  holds the update's peak extra memory in MiB: from the CPU profiler's allocation events
  (torch's CPU allocator is not visible to tracemalloc) or ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from learned_opt import tasks
from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import build_generator
from learned_opt.normalization import Normalization
from learned_opt.optimizer import GptOptimizer
from learned_opt.pretrained import LoadedGenerator

TASK = tasks.get("mnist-mlp")
_DEFAULT_THREADS = torch.get_num_threads()
BATCH = 128
SAMPLING_STEPS = 50


def _generator(preset: str = "tiny") -> LoadedGenerator:
    torch.manual_seed(0)
    model = build_generator(TASK.layout(), preset)
    return LoadedGenerator.from_model(
        model, DiffusionConfig(), Normalization.from_stats(0.1, 0.0, 2.5),
        name=f"bench-{preset}", task=TASK.name, metric="test_loss", best_prompt=0.0,
    )


@pytest.fixture
def one_thread():
    """Step benchmarks use one intra-op thread: an 8k-parameter MLP gains nothing from more, and
    on a shared machine extra threads mostly add spin-wait noise to both sides."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, str]:
    root = Path(os.environ.get("LEARNED_OPT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    try:
        data = TASK.load_data(root)
        return data.train_x[:BATCH].clone(), data.train_y[:BATCH].clone(), "mnist"
    except Exception:  # no MNIST here: the step cost does not depend on the pixel values
        g = torch.Generator().manual_seed(0)
        return torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g), "random"


def _optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return GptOptimizer(model.parameters(), _generator(), lr=1e-3, every=None)


@pytest.mark.parametrize("kind", ["adam", "gpt"])
def test_step_iteration(benchmark, batch, kind, one_thread):
    x, y, source = batch
    torch.manual_seed(0)
    model = TASK.build_model()
    opt = _optimizer(kind, model)

    def iteration() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    benchmark.group = "step: iteration"
    benchmark.extra_info["data"] = source
    benchmark.pedantic(iteration, rounds=2000, iterations=1, warmup_rounds=50)


@pytest.mark.parametrize("kind", ["adam", "gpt"])
def test_step_optimizer_only(benchmark, batch, kind, one_thread):
    x, y, _ = batch
    torch.manual_seed(0)
    model = TASK.build_model()
    opt = _optimizer(kind, model)
    F.cross_entropy(model(x), y).backward()  # fixed gradients; the parameters keep moving
    benchmark.group = "step: optimizer only"
    benchmark.pedantic(opt.step, rounds=3000, iterations=1, warmup_rounds=50)


@pytest.mark.parametrize("what", ["iteration", "optimizer only"])
def test_step_interleaved(benchmark, batch, one_thread, what):
    """Adam and GptOptimizer alternated in one loop, so that load on a shared machine hits both
    alike; ``extra_info`` holds the median of each and their ratio (GptOptimizer / Adam)."""
    import statistics
    import time

    x, y, source = batch
    pairs = []
    for kind in ("adam", "gpt"):
        torch.manual_seed(0)
        model = TASK.build_model()
        opt = _optimizer(kind, model)
        F.cross_entropy(model(x), y).backward()
        pairs.append((model, opt))
    times: tuple[list[float], list[float]] = ([], [])

    def both() -> None:
        for (model, opt), out in zip(pairs, times):
            start = time.perf_counter()
            if what == "iteration":
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
            opt.step()
            out.append(time.perf_counter() - start)

    benchmark.group = f"step: {what}, interleaved"
    benchmark.pedantic(both, rounds=3000, iterations=1, warmup_rounds=50)
    adam, gpt = (statistics.median(t) for t in times)
    benchmark.extra_info.update(data=source, adam_median_us=adam * 1e6, gpt_median_us=gpt * 1e6, ratio=gpt / adam)
    print(f"\ninterleaved {what} medians: adam {adam * 1e6:.1f} us, gpt {gpt * 1e6:.1f} us, ratio {gpt / adam:.3f}")


def _peak_extra_mib(fn, device: torch.device) -> float:
    """Peak memory allocated by ``fn`` beyond what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:  # allocations are attributed to ops, frees appear as "[memory]" events
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("threads", ["1", "all"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_generative_update(benchmark, preset, device, threads):
    device = torch.device(device)
    if threads == "1":
        if device.type != "cpu":
            pytest.skip("thread count only matters on CPU")
        torch.set_num_threads(1)  # restored by the end of the test (see below)
    saved_threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = TASK.build_model().to(device)
    gen = _generator(preset)
    opt = GptOptimizer(model.parameters(), gen, lr=1e-3, sampling_steps=SAMPLING_STEPS)

    def update() -> None:
        report = opt.generate(metric=2.3)
        assert not report.failed, report.reason
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    update()  # warm-up (kernels, allocator)
    benchmark.group = "generative update"
    benchmark.extra_info.update(
        preset=preset,
        device=device.type,
        generator_params=sum(p.numel() for p in gen.model.parameters()),
        sampling_steps=SAMPLING_STEPS,
        peak_extra_mib=round(_peak_extra_mib(update, device), 3),
    )
    benchmark.extra_info["threads"] = saved_threads
    try:
        benchmark.pedantic(update, rounds=3 if device.type == "cpu" else 20, iterations=1)
    finally:
        torch.set_num_threads(_DEFAULT_THREADS)
