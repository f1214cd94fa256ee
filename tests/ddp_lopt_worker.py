"""torchrun worker for tests/test_lopt_ddp.py: two gloo ranks train one DDP model with LearnedOptimizer.

Each rank sees different data; DDP averages the gradients, and the learned rule (deterministic,
no RNG) must then take the same step on every rank. Writes ``{out}/rank{r}.pt`` (final parameters
and the optimizer's state) for the test to compare.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from learned_opt import LearnedOptimizer
from torchrun_helpers import end_worker


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same init on every rank (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    opt = LearnedOptimizer(model.parameters(), weights="hand-set")
    g = torch.Generator().manual_seed(100 + rank)  # rank-specific data
    first = None
    for _ in range(5):
        x, y = torch.randn(32, 8, generator=g), torch.randint(3, (32,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict(),
                "first_loss": first}, f"{out}/rank{rank}.pt")
    dist.barrier()  # every rank has written its file
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
