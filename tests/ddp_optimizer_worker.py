"""torchrun worker for tests/test_ddp_optimizer.py: two gloo ranks, one GptOptimizer each.

Each rank sees different data and uses a different sampling seed, so only the optimizer's
broadcast of rank 0's θ′ and accept decision can leave the ranks with identical parameters.
Writes ``{out}/rank{r}.pt`` (final parameters and counters) for the test to compare.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_helpers import FnGenerator, tiny_generator, toy_data, toy_loss, toy_model  # noqa: E402
from torchrun_helpers import end_worker  # noqa: E402

from learned_opt.optimizer import GptOptimizer  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    data = toy_data(seed=10 + rank)  # rank-specific data: different grads and metrics
    model = DistributedDataParallel(toy_model())
    opt = GptOptimizer(
        model.parameters(), tiny_generator(perturb=0.05), lr=1e-2, seed=rank, sampling_steps=3,
        every=3, metric_closure=lambda: toy_loss(model, data), max_update_ratio=100.0,
    )
    for _ in range(6):  # two periodic updates, guarded by rank-specific metrics
        opt.zero_grad()
        toy_loss(model, data).backward()
        opt.step()
    report = opt.generate(metric=1.0 + rank)  # unguarded, different conditioning per rank
    assert report.accepted, report

    # A generator that fails on rank 1 only: every rank skips the update (and nobody hangs).
    def flaky(theta):
        if rank == 1:
            raise RuntimeError("rank 1 fails")
        return theta + 0.01

    opt.generator = FnGenerator(flaky, base=opt.generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = opt.generate(metric=1.0)
    assert report.failed and not report.accepted, report

    # keep_if_met follows rank 0's metric: the ranks disagree on whether the prompt is met
    opt.generator = FnGenerator(lambda theta: theta + 0.01, base=opt.generator)
    report = opt.generate(metric=2.0 if rank == 0 else 0.5, prompt=1.0)  # rank 0 has not met it: all sample
    assert report.accepted and not report.kept, report
    report = opt.generate(metric=0.5 if rank == 0 else 2.0, prompt=1.0)  # rank 0 has: all keep θ
    assert report.kept and not report.accepted, report

    # a line search from θ that differs across ranks: every rank moves along rank 0's line
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(0.001 * rank)
    opt.step_sizes, opt.guard = (1.0, 0.5), False
    report = opt.generate(lambda: toy_loss(model, data), metric=2.0)
    assert report.accepted and report.step_size in (1.0, 0.5), report
    params = [p.detach().clone() for p in model.module.parameters()]
    torch.save({"params": params, "counters": opt.counters}, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # every rank has written its file
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
