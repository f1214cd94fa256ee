"""Speed of the G.pt generator: training throughput and the latency of one sampled update.

Run (CPU rows always; CUDA rows when a GPU is present, skipped otherwise)::

    .venv/bin/python -m pytest benchmarks/test_generator_speed.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,mean,rounds -s

Groups, all on the ``mnist-mlp`` layout (chunk size 1000: 11 parameter tokens, 26 in all):

* ``train: <device>`` — one training step (diffusion x0-MSE loss, backward, AdamW step) on a batch
  of 256, for the ``tiny`` and ``small`` presets (and ``base`` on a GPU), side by side with a plain
  ~7M-parameter ``nn.TransformerEncoder`` over 26 tokens (4 layers of width 384, pre-LayerNorm),
  the issue's reference (≈ 240 samples/s on 2 CPU cores). Reported as samples/s and as the ratio
  to the baseline measured in the same run.
* ``sample: <device>`` — one sampled update (batch 1) per preset: DDIM with 10 / 25 / 50 steps,
  DPM-Solver++(2M) with 25, and DDPM with all 1000 (DDPM only for ``tiny``/``small`` on CPU). Target: ``small`` DDIM-50 < 0.5 s on
  2 CPU cores.

Environment: ``LEARNED_OPT_BENCH_THREADS`` (2) intra-op threads; ``LEARNED_OPT_BENCH_OUT``
(``.benchmarks/generator_speed.json``) where the figures go as JSON, with the machine's load
average at the start and end (the CI machine is shared, so read the figures with the load).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from learned_opt import tasks
from learned_opt.diffusion import Diffusion
from learned_opt.generator import build_generator

REPO = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("LEARNED_OPT_BENCH_THREADS", "2"))
OUT = Path(os.environ.get("LEARNED_OPT_BENCH_OUT", REPO / ".benchmarks" / "generator_speed.json"))
LAYOUT = tasks.get("mnist-mlp").layout(chunk_size=1000)
TRAIN_BATCH = 256
NUM_TOKENS = 2 * LAYOUT.num_tokens + 4  # 26
RESULTS: dict[str, dict] = {"train": {}, "sample": {}}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def _threads_and_report():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()
    yield
    torch.set_num_threads(threads)
    for device, rows in RESULTS["train"].items():
        base = rows.get("baseline-7M", {}).get("samples_per_s")
        for row in rows.values():
            row["ratio_to_baseline"] = round(row["samples_per_s"] / base, 3) if base else None
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": THREADS,
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "layout": {"task": "mnist-mlp", "num_params": LAYOUT.num_params, "tokens": NUM_TOKENS},
        **RESULTS,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(f"\ngenerator speed figures written to {OUT}")
    print(json.dumps(RESULTS, indent=2))


# ---------------------------------------------------------------------------------- training


class BaselineTransformer(nn.Module):
    """The reference: a plain pre-LN ``nn.TransformerEncoder`` of ~7.1M parameters over 26 tokens."""

    def __init__(self, d_model: int = 384, n_layers: int = 4, n_heads: int = 6) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _baseline_step(device: str):
    torch.manual_seed(0)
    model = BaselineTransformer().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(TRAIN_BATCH, NUM_TOKENS, 384, device=device)
    y = torch.randn_like(x)

    def step():
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    return model, step


def _generator_step(preset: str, device: str):
    torch.manual_seed(0)
    model = build_generator(LAYOUT, preset).to(device).train()
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-4)
    diffusion = Diffusion()
    g = torch.Generator(device=device).manual_seed(0)
    b, p = TRAIN_BATCH, LAYOUT.num_params
    theta_next = 0.5 * torch.randn(b, p, device=device, generator=g)
    cond = {"theta": 0.5 * torch.randn(b, p, device=device, generator=g),
            "metric": torch.rand(b, device=device, generator=g), "target": torch.rand(b, device=device, generator=g)}

    def step():
        loss = diffusion.training_loss(model, theta_next, cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    return model, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["baseline-7M", "tiny", "small", "base"])
def test_training_throughput(benchmark, name, device):
    if name == "base" and device == "cpu":
        pytest.skip("the base preset is for a GPU")
    benchmark.group = f"train: {device}"
    model, step = _baseline_step(device) if name == "baseline-7M" else _generator_step(name, device)
    rounds = 20 if device == "cuda" else 5
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    num_params = sum(q.numel() for q in model.parameters())
    row = {"num_params": num_params, "batch": TRAIN_BATCH, "step_s": round(mean, 5),
           "samples_per_s": round(TRAIN_BATCH / mean, 1)}
    RESULTS["train"].setdefault(device, {})[name] = row
    benchmark.extra_info.update(row)


# ---------------------------------------------------------------------------------- sampling

SAMPLERS = [("ddim", 10), ("ddim", 25), ("ddim", 50), ("dpm++2m", 25), ("ddpm", 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, steps", SAMPLERS, ids=[f"{m}{s}" for m, s in SAMPLERS])
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_update_latency(benchmark, preset, method, steps, device):
    if device == "cpu" and preset == "base" and method == "ddpm":
        pytest.skip("base DDPM-1000 on CPU takes about a minute per update")
    benchmark.group = f"sample: {device}"
    torch.manual_seed(0)
    model = build_generator(LAYOUT, preset).to(device).eval()
    diffusion = Diffusion()
    g = torch.Generator(device=device).manual_seed(0)
    p = LAYOUT.num_params
    cond = {"theta": 0.5 * torch.randn(1, p, device=device, generator=g),
            "metric": torch.full((1,), 0.8, device=device), "target": torch.zeros(1, device=device)}

    def update():
        x = diffusion.sample(model, cond, (1, p), method=method, steps=steps, generator=g)
        _sync(device)
        return x

    slow = method == "ddpm" or (preset == "base" and device == "cpu")
    rounds = 3 if slow else 10
    benchmark.pedantic(update, rounds=rounds, iterations=1, warmup_rounds=1)
    row = {"seconds": round(benchmark.stats.stats.mean, 5), "median_s": round(benchmark.stats.stats.median, 5),
           "per_forward_ms": round(1e3 * benchmark.stats.stats.mean / steps, 3)}
    RESULTS["sample"].setdefault(device, {}).setdefault(preset, {})[f"{method}{steps}"] = row
    benchmark.extra_info.update(row)
