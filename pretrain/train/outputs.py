"""What a job writes: the checkpoint (atomically), the JSONL log and its loss plot."""

from __future__ import annotations

import json
import os
import platform
import zipfile
from pathlib import Path

import torch

from learned_opt.errors import TrainingError
from learned_opt.fileio import atomic_write
from .config import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .distributed import DistInfo


CHECKPOINT_TEMP = ".checkpoint.pt.*.tmp"  # what a save killed midway leaves (the folder's own, under its lock)
_SHORT_WRITE = ("PytorchStreamWriter", "file write failed", "inline_container", "unexpected pos")


def atomic_torch_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it; a write that
    fails (a full disk, a folder made read-only) is a :class:`TrainingError` and leaves ``path`` as it was."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a short write as a RuntimeError
        if isinstance(exc, RuntimeError) and not any(s in str(exc) for s in _SHORT_WRITE):
            raise
        lines = str(exc).strip().splitlines() or [""]
        raise TrainingError(f"cannot write {path} ({type(exc).__name__}: {lines[-1][:200]}): "
                            f"free space or fix permissions, then run again with --resume") from None


def torch_load_checked(path: Path, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` of a file ``torch.save`` wrote, after checking its
    zip CRCs (torch does not, so a flipped bit would load): :class:`OSError` when the file cannot be
    opened (``FileNotFoundError`` when it is not there), ``ValueError`` (or torch's own error) when
    it is damaged."""
    with open(path, "rb") as fh:
        try:
            with zipfile.ZipFile(fh) as archive:
                bad = archive.testzip()
        except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways, OSError among them
            raise ValueError(f"not a readable zip archive ({type(exc).__name__}: {exc})") from None
    if bad is not None:
        raise ValueError(f"its record {bad} fails its checksum")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, checked for format and version (:class:`TrainingError` otherwise)."""
    try:
        state = torch_load_checked(path, mmap=True)
    except FileNotFoundError:
        raise TrainingError(f"no training checkpoint at {path}: train first, or point --out at a training run") from None
    except OSError as exc:
        raise TrainingError(f"cannot read {path} ({exc.strerror or exc}): check that it is a file you may read") from None
    except Exception as exc:
        raise TrainingError(
            f"cannot read the training checkpoint {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is corrupt or not a training checkpoint: "
            "restore it from a copy or train into a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a learned-opt generator training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(
            f"{path} has checkpoint version {state.get('version')}, this learned-opt reads version "
            f"{CHECKPOINT_VERSION}; use the learned-opt version that wrote it"
        )
    return state


def nonfinite_tensors(tree, prefix: str = "") -> list[str]:
    """The names (``model.x.weight``, ``optimizer.state.3.exp_avg``, ...) of the floating-point
    tensors in a nest of dicts and lists that hold NaN or ±inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def refuse_nonfinite_checkpoint(state: dict, path: Path) -> None:
    """Refuse to resume a checkpoint whose weights, EMA or optimizer state hold NaN or ±inf."""
    bad = nonfinite_tensors({k: state.get(k) for k in ("model", "ema", "optimizer")})
    if bad:
        raise TrainingError(
            f"cannot resume {path}: it holds non-finite values ({', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); restore it from a copy or train into a new --out"
        )


def hardware_summary(info: DistInfo) -> dict:
    """Where training ran, for the manifest."""
    dev = info.device
    return {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "world_size": info.world,
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
    }


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def truncate_log(path: Path, last_step: int, key: str = "step") -> None:
    """Drop log records whose ``key`` is after ``last_step`` (written after the checkpoint a job
    resumes from), and any line cut short by a kill; atomically."""
    keep = "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if r.get(key, 0) <= last_step)
    atomic_write(path, lambda tmp: tmp.write_text(keep, encoding="utf-8"))


def plot_losses(log_path: Path, png_path: Path) -> str | None:
    """Draw the loss curve from the JSONL log; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss-curve PNG (pip install 'learned-opt[dev]')"
    records = read_jsonl(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("heldout_loss", "held-out"), ("heldout_loss_ema", "held-out (EMA)")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (training objective; held-out: plain x0 MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), fsync=False)
    finally:
        plt.close(fig)
    return None
