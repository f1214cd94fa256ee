"""Exporting a training checkpoint's EMA generator (``--export-only``, and at the end of training)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from learned_opt.diffusion import DiffusionConfig
from learned_opt.generator import GptConfig, build_generator
from learned_opt.errors import ConfigError
from learned_opt.layout import Layout, signature_from_json
from learned_opt.normalization import Normalization
from learned_opt.symmetry import Symmetry

from learned_opt.fileio import is_plain_name
from .finetune import inherited_sampling
from .outputs import load_checkpoint


def portable_command(command: str) -> str:
    """``command`` with its program named, not located (``/home/me/.venv/bin/learned-opt`` -> ``learned-opt``)."""
    parts = shlex.split(command)
    if parts and os.path.isabs(parts[0]):
        parts[0] = Path(parts[0]).name
    return shlex.join(parts)


def prompt_range(norm: Normalization, corpus: dict) -> tuple[float, float]:
    """The metric values a generator may be prompted with: its normalisation's range, widened to the
    metric values of the runs it trained on (``corpus["metric_trained"]``), which a fine-tune on runs
    that reach past its source's corpus (e.g. warm-started runs, docs/corpus.md) extends."""
    lo, hi = norm.metric_lo, norm.metric_hi
    seen = corpus.get("metric_trained")
    return (min(lo, float(seen[0])), max(hi, float(seen[1]))) if seen else (lo, hi)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                      name: str | None = None) -> Path:
    """Export a training checkpoint's EMA weights as ``{name}.safetensors`` + ``{name}.json``."""
    from learned_opt import tasks
    from learned_opt.pretrained import save_generator

    if name is not None and not is_plain_name(name):
        raise ConfigError(f"--name {name!r} must be a plain file name (no '/', '\\' or NUL, not starting with '.')")
    path = Path(checkpoint)
    state = load_checkpoint(path)
    cfg, corpus = state["config"], state["corpus"]
    symmetry = Symmetry.from_json(state["symmetry"]) if state.get("symmetry") else None  # None: derived
    layout = Layout(signature_from_json(state["signature"]), cfg["chunk_size"], cfg.get("tokens", "chunk"), symmetry)
    diffusion = DiffusionConfig(**state["diffusion_config"])
    model = build_generator(layout, GptConfig(**state["model_config"]), diffusion)
    model.load_state_dict(state["ema"])
    task = tasks.get(corpus.get("task_source") or corpus["task"])
    last = state.get("last") or {}
    training = {
        "steps": int(state["step"]),
        "steps_planned": cfg["steps"],
        "complete": int(state["step"]) >= cfg["steps"],
        "batch_size": cfg["batch_size"],
        "pairs_seen": int(state["step"]) * cfg["batch_size"],
        "lr": cfg["lr"],
        "weight_decay": cfg["weight_decay"],
        "warmup": cfg["warmup"],
        "min_lr_ratio": cfg["min_lr_ratio"],
        "grad_clip": cfg["grad_clip"],
        "ema_decay": cfg["ema_decay"],
        "seed": cfg["seed"],
        "augment": cfg["augment"],
        "init_fraction": cfg.get("init_fraction", 0.0),
        "late_fraction": cfg.get("late_fraction", 0.0),
        **({"late_max_gap": cfg["late_max_gap"]} if cfg.get("late_max_gap") is not None else {}),
        "pca_init": cfg.get("pca_init", False),
        "snr_window": cfg.get("snr_window"),
        "layer_balance": cfg.get("layer_balance", 0.0),
        "output_matching": cfg.get("output_matching", 0.0),
        "label_hinge": cfg.get("label_hinge", 0.0),
        "prompt_dropout": cfg.get("prompt_dropout", 0.0),
        "property_head": cfg.get("property_head", 0.0),
        "loss": ("x0 MSE weighted by 1 / σ_p²" if cfg.get("precondition") else "x0 MSE")
        + (" and by (P / layer size) ** layer_balance" if cfg.get("layer_balance") else "")
        + (f" + output_matching x the divergence of x̂0's outputs from θ′'s on {cfg.get('matching_examples')} "
           "training inputs per step" if cfg.get("output_matching") else "")
        + (f" + label_hinge x how much higher x̂0's training loss is than θ′'s on {cfg.get('matching_examples')} "
           "labelled training inputs per step (0 where it is not)" if cfg.get("label_hinge") else "")
        + (" + property_head x the squared error of the property head's normalised metric on both checkpoints "
           "of each pair" if cfg.get("property_head") else "")
        + (f"; the prompt replaced by the null prompt in a share {cfg.get('prompt_dropout'):g} of the pairs"
           if cfg.get("prompt_dropout") else ""),
        "heldout_loss": "plain x0 MSE at uniformly drawn t, fixed held-out pairs and noise",
        "weights": "ema",
        "final_loss": last.get("loss"),
        "final_heldout_loss": last.get("heldout_loss"),
        "final_heldout_loss_ema": last.get("heldout_loss_ema"),
        **({"final_property_loss": last.get("property_loss"),
            "final_heldout_property_loss_ema": last.get("heldout_property_loss_ema")} if cfg.get("property_head") else {}),
        "wall_time_s": float(state["wall_time_s"]),
        "hardware": state.get("hardware"),
        "commands": [portable_command(c) for c in state.get("commands") or []],
    }
    if state.get("init_from"):
        training["init_from"] = state["init_from"]
    norm = Normalization(**state["normalization"])
    lo, hi = prompt_range(norm, corpus)
    # the task's ideal (a loss of 0, a return of 500) within what the corpus reached: G.pt's "best"
    # prompt, and a default that GptOptimizer need not clamp
    best = min(max(task.metric(corpus["metric"]).best_prompt, lo), hi)
    return save_generator(
        Path(out_dir) if out_dir is not None else path.parent,
        name or state.get("name") or corpus["task"],  # the task's name: what the generator is for
        model,
        diffusion,
        norm,
        task=corpus["task"],
        metric=corpus["metric"],
        best_prompt=best,
        metric_range=(lo, hi),
        metric_direction=task.metric(corpus["metric"]).direction,
        corpus=corpus,
        training=training,
        input_normalization=getattr(task, "input_normalization", None),
        sampling=inherited_sampling(state.get("init_from")),  # a fine-tune samples as its source did until tuned
    )
