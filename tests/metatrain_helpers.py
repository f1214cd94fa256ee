"""Run a tiny meta-training on fake data; under torchrun, every rank writes its weights' hash.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/metatrain_helpers.py OUT STEPS [--resume]
[--disk-full]``. With ``--disk-full`` rank 0 alone cannot write its checkpoint: every rank must stop
with an error (written to ``stopped-rankN.txt``) instead of waiting in the next collective.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys

import torch
from torchrun_helpers import end_worker

from learned_opt.tasks import ClassificationData
from pretrain.metatrain import MetaConfig, meta_train, trainer

TINY = dict(pairs=2, truncation=3, unroll=6, val_batch=16, holdout=40, image_size=7, widths=(4, 6), depths=(0, 1),
            batch_sizes=(8,), checkpoint_every=2)


def fake_data(n: int = 200) -> ClassificationData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 49, generator=g), torch.randint(10, (n,), generator=g)
    return ClassificationData(x, y, x[:50], y[:50])


def digest(theta: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(theta):
        h.update(theta[k].numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    out, steps, resume = sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv
    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    if "--disk-full" in sys.argv:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        if rank == "0":
            trainer.save_checkpoint = full
        try:
            meta_train(MetaConfig(outer_steps=steps, **TINY), fake_data(), out, resume=resume, progress=False)
        except Exception as exc:  # noqa: BLE001 (the test reads what each rank raised)
            with open(os.path.join(out, f"stopped-rank{rank}.txt"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        end_worker()
    theta = meta_train(MetaConfig(outer_steps=steps, **TINY), fake_data(), out, resume=resume, progress=False)
    with open(os.path.join(out, f"theta-rank{rank}.pt"), "wb") as f:
        torch.save(theta, f)
    with open(os.path.join(out, f"hash-rank{rank}.txt"), "w") as f:
        f.write(digest(theta))
    end_worker()
