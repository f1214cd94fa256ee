"""Peak memory of one optimizer step: LearnedOptimizer against Adam, side by side.

    OMP_NUM_THREADS=1 python benchmarks/lopt_memory.py --params 2000000 20000000

Each optimizer steps a fresh ``nn.Linear`` of about ``--params`` parameters in a process of its own
(a process's peak resident memory only grows, so one process per measurement; Linux, which reports
the current one in ``/proc/self/statm``). Measured: the process's peak during its first ``step()``
over its resident memory just before it, with the gradient in place: the optimizer's state
(Adam's two moments; the rule's four momenta and second moment) and what the step needs while it
runs, in bytes per parameter. Prints a table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROBE = """
import os, resource, sys, torch
from learned_opt import LearnedOptimizer
torch.manual_seed(0)
n = int(sys.argv[2])
model = torch.nn.Linear(n // 1000, 1000)
opt = LearnedOptimizer(model.parameters()) if sys.argv[1] == "learned" else torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(8, n // 1000)).square().mean().backward()
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(sum(p.numel() for p in model.parameters()), peak - before)
"""


def measure(kind: str, params: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, kind, str(params)], capture_output=True, text=True, check=True)
    numel, grown = (int(x) for x in out.stdout.split())
    return {"optimizer": kind, "params": numel, "peak_growth_bytes": grown, "bytes_per_param": grown / numel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, nargs="+", default=[2_000_000, 20_000_000],
                        help="model sizes to measure, each in its own pair of processes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for params in args.params:
        pair = [measure(kind, params) for kind in ("adam", "learned")]
        for r in pair:
            print(f"{r['optimizer']:>8}: {r['params']:,} parameters, its first step's peak is "
                  f"{r['peak_growth_bytes'] / 2**20:.0f} MiB above the memory before it ({r['bytes_per_param']:.0f} bytes "
                  f"per parameter)")
        print(f"ratio learned / adam: {pair[1]['peak_growth_bytes'] / max(pair[0]['peak_growth_bytes'], 1):.1f}")
        rows += pair
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
