"""Tiny synthetic corpora for dataset and training tests, and the torchrun entry of the DDP test.

``make_store`` writes random-walk parameter trajectories with decreasing synthetic metrics through
the real ``Store`` API: no network is trained. Run as a script (under torchrun) it trains a tiny
generator and writes a sha256 of each rank's final model and EMA weights.
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import torch

from pretrain.store import RunRecord, Store
from pretrain.train import TrainConfig


def tiny_config(store_dir, out, **kw) -> TrainConfig:
    """A training job of a few steps on a store from :func:`make_store` (``kw`` overrides)."""
    base = dict(store=str(store_dir), out=str(out), steps=6, batch_size=4, warmup=2, log_every=2,
                eval_every=3, eval_batches=1, checkpoint_every=3, diffusion_steps=50, export=False)
    return TrainConfig(**{**base, **kw})


def file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_store(root: Path, task: str = "mnist-mlp", runs: int = 4, checkpoints: int = 6, seed: int = 0,
               first_run: int = 0) -> Store:
    """A store of ``runs`` random-walk runs of ``checkpoints`` checkpoints each."""
    store = Store.create(root, task)
    gen = torch.Generator().manual_seed(seed)
    for r in range(first_run, first_run + runs):
        theta = torch.randn(store.num_params, generator=gen) * 0.1  # [P]
        params = [theta]
        for _ in range(checkpoints - 1):
            params.append(params[-1] + 0.02 * torch.randn(store.num_params, generator=gen))
        k = torch.arange(checkpoints, dtype=torch.float32)
        base = 2.3 * torch.exp(-k / 3) + 0.1 * r / max(runs, 1)  # [K] decreasing
        metrics = {name: base * (1 + i) for i, name in enumerate(store.metric_names or ("test_loss",))}
        store.write_run(r, RunRecord(torch.stack(params), torch.arange(checkpoints) * 10, metrics,
                                     {"optimizer": "sgd", "lr": 0.1}, seed=r))
    return store


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and raw bytes), order-independent of dict layout."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ddp_main(store: str, out: str, data_root: str | None = None, auxiliary: str | None = None) -> None:
    import torch.distributed as dist

    from pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(store=store, out=out, steps=4, batch_size=4, warmup=1, log_every=2, eval_every=2,
                      eval_batches=1, checkpoint_every=2, diffusion_steps=50, chunk_size=1000, export=True)
    if data_root:  # with output matching: each rank draws its own inputs
        cfg.output_matching, cfg.matching_examples, cfg.data_root = 1.0, 8, data_root
    if auxiliary:  # prompt dropout (each rank draws its own) and the property head's loss
        cfg.prompt_dropout, cfg.property_head = 0.5, 1.0
    result = train(cfg)
    rank = int(__import__("os").environ["RANK"])
    Path(out, f"hash-rank{rank}.txt").write_text(f"{state_hash(result.model)} {state_hash(result.ema)}\n")
    assert not dist.is_initialized()  # train() tears down the group it made
    assert math.isfinite(result.last["loss"])


if __name__ == "__main__":
    _ddp_main(*sys.argv[1:5])
