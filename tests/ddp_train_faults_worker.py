"""Run under torchrun by test_train_faults: rank 1 alone goes non-finite at step 3 (or, with
``disk-full``, rank 0 alone cannot write its checkpoint); every rank must stop with an error (a flag
reduced over ranks), not wait in a collective, writing what it raised to ``stopped-rankN.txt``."""

from __future__ import annotations

import errno
import math
import os
import sys
from pathlib import Path

import torch
from torchrun_helpers import end_worker

from learned_opt.errors import TrainingError
from pretrain.train import TrainConfig, train, trainer

real = trainer.Trainer.train_step


def train_step(self, batch):
    out = real(self, batch)
    if self.step == 3 and self.info.rank == 1:
        with torch.no_grad():
            next(self.model.parameters()).fill_(math.nan)
    return out


if __name__ == "__main__":
    store, out = sys.argv[1:3]
    torch.set_num_threads(1)
    if sys.argv[3:] == ["disk-full"]:
        if os.environ["RANK"] == "0":
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            trainer.atomic_torch_save = full
    else:
        trainer.Trainer.train_step = train_step
    cfg = TrainConfig(store=store, out=out, steps=4, batch_size=4, warmup=1, log_every=1, eval_every=2,
                      eval_batches=1, checkpoint_every=2, diffusion_steps=50, export=False)
    try:
        train(cfg)
    except (TrainingError, OSError) as exc:
        Path(out, f"stopped-rank{os.environ['RANK']}.txt").write_text(f"{type(exc).__name__}: {exc}")
    end_worker()  # what each rank raised is written
