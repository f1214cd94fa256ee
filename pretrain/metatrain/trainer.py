"""The meta-training loop: PES gradient estimates, Adam on the rule's weights, checkpoints and logs.

Everything random comes from one ``torch.Generator`` whose state is checkpointed with the rule's
weights, Adam's state and the population's inner trainings, so a resumed run equals an
uninterrupted one bit for bit (on the same machine and thread count). Outputs in ``out``:
``checkpoint.pt`` (``torch.load(weights_only=True)``), ``log.jsonl`` (one line per outer step),
``meta_loss.png`` and, at the end, the weights as ``{name}.safetensors`` + ``{name}.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

from learned_opt.errors import ConfigError, TrainingError
from learned_opt.fileio import atomic_write, is_plain_name
from learned_opt.lopt.model import FEATURE_CONFIG, HIDDEN, hand_set_theta, theta_shapes
from learned_opt.lopt.weights import save_rule
from learned_opt.options import check_export_target, check_out_dir, check_seed

from pretrain.train.distributed import on_main, setup_distributed
from pretrain.store_lock import acquire_writer, remove_stale_temp
from pretrain.train.outputs import (CHECKPOINT_TEMP, append_jsonl, atomic_torch_save, read_jsonl, torch_load_checked,
                                    truncate_log)

from .family import MnistMlpFamily
from .outer import OUTER_OPTIMIZERS, OuterOptimizer
from .pes import Unroll, new_unroll, truncation
from .shard import part_of, shard_of, sum_over_ranks, whole_population

CHECKPOINT_VERSION = 2  # 2: the rule reads 25 features (Adam's directions, the tensor's size)
READABLE_VERSIONS = (1, 2)  # the same format; a rule of other shapes is refused by its shapes
LOSS_SUM = "__outer_loss_sum__"  # the population's summed outer loss, reduced with the gradient
# settings a resume may change, as the advice after non-finite weights asks; each change is recorded
RESUMABLE = ("outer_lr", "sigma")
MAX_SIGMA = 1.0


def _flags(keys) -> str:
    """Settings as the options that set them: ``--outer-lr and --sigma``."""
    return " and ".join("--" + k.replace("_", "-") for k in keys)


@dataclass
class MetaConfig:
    """Meta-training settings; every one but ``outer_steps`` must match on resume."""

    outer_steps: int = 300  # outer (Adam) steps, one truncation each
    pairs: int = 8  # antithetic pairs: the population is 2 * pairs inner trainings
    truncation: int = 10  # inner steps per truncation
    unroll: int = 200  # inner steps per task before a new task is drawn
    sigma: float = 0.01  # ES perturbation scale
    outer_lr: float = 3e-3  # the outer optimizer's step size (Adam's units)
    outer_optimizer: str = "adam"  # "adam", or "learned": a learned rule steps the rule's weights
    outer_weights: str = "self"  # the learned outer rule: "self" (the rule trains itself) or weights to load
    grad_clip: float = 10.0  # the PES estimate's norm is clipped to this
    loss_clip: float = 3.0  # a member's outer loss is clipped here (ln 10 ~ 2.3 is chance)
    outer_loss: str = "mean"  # "mean": mean validation loss over a truncation; "log-mean": mean of its log
    val_batch: int = 256  # validation examples per inner step
    holdout: int = 10_000  # training images held out as the validation set
    image_size: int = 14  # the data's resolution
    pools: tuple[int, ...] = (1,)  # per task, inputs average-pooled by a factor drawn from these
    max_params: int = 0  # tasks with more parameters are drawn again (0: no limit)
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 2)
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    init_scales: tuple[float, float] = (0.5, 2.0)
    hidden: tuple[int, ...] = HIDDEN  # the rule's MLP
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self):
        for k in ("outer_steps", "pairs", "truncation", "unroll", "val_batch", "checkpoint_every"):
            if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {getattr(self, k)!r}")
        for k in ("sigma", "outer_lr", "grad_clip", "loss_clip"):
            if not 0 < getattr(self, k) < math.inf:
                raise ConfigError(f"{k} must be a finite number > 0, got {getattr(self, k)!r}")
        if self.sigma > MAX_SIGMA:  # the rule's weights are O(1): a larger perturbation only adds noise
            raise ConfigError(f"sigma must be at most {MAX_SIGMA:g} (the perturbation's scale on the rule's "
                              f"weights; the default is 0.01), got {self.sigma!r}")
        check_seed(self.seed)
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ConfigError(f"outer_optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {self.outer_optimizer!r}")
        if self.outer_weights != "self" and self.outer_optimizer != "learned":
            raise ConfigError(f"outer_weights {self.outer_weights!r} are a learned outer rule's: give "
                              f"--outer-optimizer learned too, or leave --outer-weights out")
        if self.outer_loss not in ("mean", "log-mean"):
            raise ConfigError(f"outer_loss must be 'mean' or 'log-mean', got {self.outer_loss!r}")
        if self.unroll % self.truncation:
            raise ConfigError(f"unroll ({self.unroll}) must be a multiple of truncation ({self.truncation})")
        self.family()  # an empty or invalid task distribution fails here
        self._outer_sha256 = self.outer().sha256  # outer weights that do not load fail here

    def family(self) -> MnistMlpFamily:
        return MnistMlpFamily(self.image_size, self.widths, self.depths, self.batch_sizes, self.init_scales,
                              self.pools, self.max_params)

    def outer(self) -> OuterOptimizer:
        return OuterOptimizer(self.outer_optimizer, self.outer_lr, self.outer_weights)

    def settings(self) -> dict:
        """What a resume compares: everything but the number of outer steps and how often to
        checkpoint (of these, only :data:`RESUMABLE` may differ)."""
        d = json.loads(json.dumps(asdict(self)))
        d.pop("outer_steps")
        d.pop("checkpoint_every")  # bookkeeping: a resume may checkpoint as often as it likes
        if self.outer_weights != "self":  # the outer rule by its content: a path can come to hold other weights
            d["outer_weights_sha256"] = self._outer_sha256  # as loaded when the run was configured
        return d


@dataclass
class MetaState:
    theta: dict[str, torch.Tensor]
    outer_state: dict = field(default_factory=dict)  # the outer optimizer's (the checkpoint's "adam" entry)
    unroll: Unroll | None = None
    outer_step: int = 0
    gen_state: torch.Tensor | None = None
    seconds: float = 0.0  # wall time of the outer steps so far, over every session
    changes: list = field(default_factory=list)  # {"outer_step", setting: [before, after]} at each resume that changed one


def save_checkpoint(path: Path, config: MetaConfig, s: MetaState, name: str) -> None:
    blob = {"version": CHECKPOINT_VERSION, "kind": "lopt-meta-train", "settings": json.dumps(config.settings()),
            "theta": s.theta, "adam": s.outer_state, "unroll": s.unroll.to_dict() if s.unroll else None,
            "outer_step": s.outer_step, "gen_state": s.gen_state, "seconds": s.seconds,
            "changes": json.dumps(s.changes), "name": name, "outer_steps": config.outer_steps,
            "checkpoint_every": config.checkpoint_every}
    atomic_torch_save(blob, path)


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, checked to be one; :class:`TrainingError` saying what is wrong."""
    try:
        blob = torch_load_checked(path)
    except FileNotFoundError:
        raise TrainingError(f"no meta-training checkpoint at {path}: start without --resume") from None
    except OSError as exc:
        raise TrainingError(f"cannot read {path} ({exc.strerror or exc}): check that it is a file you may read") from None
    except Exception as exc:  # a corrupt file: pickle/zip errors of many kinds
        raise TrainingError(f"{path} is not a readable meta-training checkpoint ({str(exc)[:200]}): it cannot be "
                            f"resumed; move it aside to start again in this --out, or choose a new --out") from None
    if not isinstance(blob, dict) or blob.get("kind") != "lopt-meta-train" or blob.get("version") not in READABLE_VERSIONS:
        raise TrainingError(f"{path} is not a learned-opt meta-training checkpoint of version {CHECKPOINT_VERSION}")
    return blob


def resume_settings(path: Path) -> dict:
    """The settings the checkpoint at ``path`` was written with, as :class:`MetaConfig` keywords, its
    planned ``outer_steps`` and ``checkpoint_every`` included where recorded: what ``--resume``
    starts from, before the options given on the command line. Empty where there is no checkpoint
    (the resume starts afresh); :class:`TrainingError` for one that cannot be read."""
    if not path.exists():
        return {}
    blob = _read_checkpoint(path)
    names = {f.name for f in fields(MetaConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(blob["settings"]).items() if k in names}
    for key in ("outer_steps", "checkpoint_every"):  # bookkeeping, not settings: recorded beside them
        if isinstance(blob.get(key), int) and not isinstance(blob[key], bool):
            kwargs[key] = blob[key]
    return kwargs


def load_checkpoint(path: Path, config: MetaConfig) -> MetaState:
    blob = _read_checkpoint(path)
    saved = json.loads(blob["settings"])
    saved.pop("checkpoint_every", None)  # recorded before it was left out of the settings
    # written before these settings existed
    saved.setdefault("outer_loss", "mean")
    saved.setdefault("outer_optimizer", "adam")
    saved.setdefault("outer_weights", "self")
    saved.setdefault("pools", [1])
    saved.setdefault("max_params", 0)
    now = config.settings()
    if saved.get("outer_weights_sha256") is not None and saved["outer_weights_sha256"] == now.get("outer_weights_sha256"):
        saved["outer_weights"] = now["outer_weights"]  # the same outer rule, by its content, wherever its file now is
    if "outer_weights_sha256" in now:  # written before the outer rule's content was recorded: its path alone
        saved.setdefault("outer_weights_sha256", now["outer_weights_sha256"])
    fixed = {k: v for k, v in saved.items() if k not in RESUMABLE}
    if fixed != {k: v for k, v in now.items() if k not in RESUMABLE}:
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                 if k not in RESUMABLE and saved.get(k) != v]
        raise TrainingError(f"cannot resume {path} with other settings ({'; '.join(diffs)}); use the saved ones "
                            f"or a new --out (of the settings, only {_flags(RESUMABLE)} may change)")
    changes = json.loads(blob.get("changes", "[]"))
    changed = {k: [saved.get(k), now[k]] for k in RESUMABLE if saved.get(k) != now[k]}
    if changed and config.outer_steps <= int(blob["outer_step"]):
        raise ConfigError(f"{path} is at outer step {blob['outer_step']}: no step would run with the new "
                          f"{_flags(changed)}; pass --outer-steps above it, "
                          f"or leave {_flags(changed)} out to export it with the checkpoint's own")
    if changed:
        changes.append({"outer_step": int(blob["outer_step"]), **changed})
    theta = blob["theta"]
    shapes = theta_shapes(config.hidden)
    if not isinstance(theta, dict) or {k: tuple(v.shape) for k, v in theta.items()} != shapes:
        raise TrainingError(f"{path} holds a rule of other shapes than this learned-opt's ({shapes}): start a new --out")
    # an unroll in progress holds the sum of its perturbations, drawn at the saved sigma: with another
    # sigma its estimate would be off by (saved / new)², so the population starts a new unroll
    unroll = Unroll.from_dict(blob["unroll"]) if blob["unroll"] and "sigma" not in changed else None
    return MetaState(blob["theta"], blob["adam"], unroll, blob["outer_step"], blob["gen_state"],
                     float(blob.get("seconds", 0.0)), changes)


def checkpoint_name(path: Path) -> str | None:
    """The export name a checkpoint was written for (None where there is no readable checkpoint or,
    written before names were recorded, it names none)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob.get("name") if isinstance(blob, dict) else None
    except Exception:  # missing or corrupt: load_checkpoint says which, later
        return None


def plot_meta_loss(log_path: Path, png: Path) -> None:
    """Draw ``meta_loss.png`` from the log (lines cut short by a kill are skipped); nothing without
    matplotlib (a runtime install has none: ``pip install 'learned-opt[dev]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = read_jsonl(log_path)
    if not rows:
        return
    steps, loss = [r["outer_step"] for r in rows], torch.tensor([r["meta_loss"] for r in rows])
    w = min(25, len(rows))
    smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), w, 1).view(-1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, loss, alpha=0.3, label="per outer step")
    ax.plot(steps[w - 1:], smooth, label=f"mean of {w}")
    # one point per task: the mean over its whole unroll (the per-step curve follows each unroll's descent)
    ends = [i for i in range(len(rows)) if i + 1 == len(rows) or rows[i + 1]["inner_step"] <= rows[i]["inner_step"]]
    starts = [0] + [e + 1 for e in ends[:-1]]
    ax.plot([steps[e] for e in ends], [float(loss[a:e + 1].mean()) for a, e in zip(starts, ends)], "o-",
            label="mean over each task's unroll")
    ax.set_xlabel("outer step")
    ax.set_ylabel("mean validation loss over the truncation")
    ax.set_title("PES meta-training of the learned optimizer")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), fsync=False)
    finally:
        plt.close(fig)


def refuse_a_fresh_start(ckpt: Path) -> None:
    """:class:`TrainingError` when a run without ``--resume`` would start over ``ckpt``."""
    if ckpt.exists():
        raise TrainingError(f"{ckpt} exists: pass --resume to continue it, or choose a new --out")


def check_destination(out: str | Path, name: str, *, resume: bool, export: bool = True) -> None:
    """Refuse an ``--out`` that cannot be a folder and a ``--name`` that cannot be a file in it, before
    any work (the weights are written after hours of meta-training), and weights there that this
    job did not write (a resumed job's earlier export is its own)."""
    if not is_plain_name(name):
        raise ConfigError(f"invalid learned-optimizer name {name!r}: use letters, digits, '-', '_' and '.'")
    check_out_dir(out)
    if not resume:  # said before anything about its export
        refuse_a_fresh_start(Path(out) / "checkpoint.pt")
    resuming = resume and (Path(out) / "checkpoint.pt").exists()  # else a fresh start
    recorded = checkpoint_name(Path(out) / "checkpoint.pt") if resuming and export else None
    if export and recorded not in (None, name):
        raise ConfigError(f"the checkpoint in {out} exports as {recorded!r}: pass --name {recorded} to resume it")
    if export:  # a resumed job's earlier export is its own (older checkpoints record no name)
        check_export_target(out, name, own=resuming)


def meta_train(config: MetaConfig, data, out: str | Path, *, resume: bool = False, name: str = "lopt",
               progress: bool = True, export: bool = True) -> dict[str, torch.Tensor]:
    """Meta-train the rule on ``data`` (a downsampled :class:`ClassificationData`: ``train_x``
    ``[N, image_size**2]``; its ``validation_data`` split is made here); return its weights.

    Under ``torchrun`` the population is shared out between the ranks (:mod:`.shard`); rank 0
    writes the log, the checkpoint, the plot and the weights, and every rank returns the same weights.
    """
    from tqdm import tqdm

    check_destination(out, name, resume=resume, export=export)
    info = setup_distributed("cpu")
    release = None
    try:
        shard = shard_of(config.pairs, info.rank, info.world)

        def claim():  # one job per folder, until this returns or the process ends
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainingError(f"cannot create {out} ({exc.strerror or exc}): choose a folder you can write") from None
            release = acquire_writer(Path(out), "the meta-training folder", TrainingError)
            remove_stale_temp([Path(out)], 0, CHECKPOINT_TEMP)  # what a job killed mid-save left (the lock is ours)
            return release

        release = on_main(info, claim, "taking the meta-training folder")
        result = _meta_train(config, data, Path(out), shard, info, resume=resume, name=name, export=export,
                             progress=progress and shard.is_main, tqdm=tqdm)
        if info.world > 1:
            dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
        return result
    finally:
        if release is not None:
            release()
        if info.owns_group:
            dist.destroy_process_group()


def _meta_train(config, data, out: Path, shard, info, *, resume, name, export, progress, tqdm):
    ckpt, log_path = out / "checkpoint.pt", out / "log.jsonl"
    family = config.family()
    if data.train_x.dim() != 2 or data.train_x.shape[1] != config.image_size ** 2:
        raise ConfigError(f"meta-training data must be flat images of {config.image_size}x{config.image_size}, "
                          f"got train_x of shape {list(data.train_x.shape)}")
    data = family.validation_data(data, config.holdout)
    outer = config.outer()
    if outer.sha256 != config._outer_sha256:  # replaced since the config read it
        raise ConfigError(f"--outer-weights {config.outer_weights} changed while the run was being set up: run again")
    gen = torch.Generator().manual_seed(config.seed)
    if resume and ckpt.exists():
        s = load_checkpoint(ckpt, config)
        if s.outer_step > config.outer_steps:
            raise ConfigError(f"{ckpt} is at outer step {s.outer_step} already: pass --outer-steps "
                              f"{s.outer_step} (or more) to resume it")
        gen.set_state(s.gen_state)
        s.unroll = part_of(s.unroll, shard) if s.unroll is not None else None
        on_main(info, lambda: truncate_log(log_path, s.outer_step, key="outer_step"), "trimming the log")
    else:  # --resume with no checkpoint yet starts afresh, as train's does (a preemptible job's first start)
        if not resume:
            refuse_a_fresh_start(ckpt)  # again, under the folder's lock
        elif shard.is_main:  # a mistyped --out would otherwise start a long run afresh without a word
            print(f"meta-train: no checkpoint in {out} yet: starting afresh", file=sys.stderr, flush=True)
        s = MetaState(hand_set_theta(config.hidden, seed=config.seed))
        on_main(info, lambda: log_path.write_text(""), "starting the log")
    bar = tqdm(total=config.outer_steps, initial=s.outer_step, disable=not progress, desc="meta-train")
    start = time.perf_counter()
    while s.outer_step < config.outer_steps:
        if s.unroll is None or s.unroll.step >= config.unroll:
            s.unroll = new_unroll(family.sample(gen), s.theta, shard.hi - shard.lo, gen)
        grad, losses = truncation(s.theta, s.unroll, data, pairs=config.pairs, sigma=config.sigma,
                                  length=config.truncation, val_batch=config.val_batch,
                                  loss_clip=config.loss_clip, log_loss=config.outer_loss == "log-mean", gen=gen,
                                  part=(shard.lo, shard.hi))
        grad = sum_over_ranks({**grad, LOSS_SUM: losses.sum().reshape(1)}, shard)
        meta_loss = float(grad.pop(LOSS_SUM)) / (2 * config.pairs)
        norm = torch.sqrt(sum(g.square().sum() for g in grad.values()))
        scale = min(1.0, config.grad_clip / (float(norm) + 1e-12))
        s.theta = outer.step(s.theta, {k: g * scale for k, g in grad.items()}, s.outer_state, s.outer_step + 1)
        if not all(torch.isfinite(v).all() for v in s.theta.values()):  # never checkpointed
            raise TrainingError(f"the rule's weights became non-finite at outer step {s.outer_step + 1}; the last "
                                "checkpoint is kept: --resume from it with a lower --outer-lr or --sigma")
        s.outer_step += 1
        s.seconds += time.perf_counter() - start
        start = time.perf_counter()
        row = {"outer_step": s.outer_step, "meta_loss": meta_loss, "grad_norm": float(norm),
               "inner_step": s.unroll.step, "task": s.unroll.spec.to_json(), "seconds": round(s.seconds, 3)}
        on_main(info, lambda: append_jsonl(log_path, row), "writing the log")
        bar.update(1)
        bar.set_postfix(meta_loss=f"{meta_loss:.3f}")
        if s.outer_step % config.checkpoint_every == 0 or s.outer_step == config.outer_steps:
            s.gen_state = gen.get_state()
            whole = replace(s, unroll=whole_population(s.unroll, shard))  # collective: every rank takes part
            on_main(info, lambda: (save_checkpoint(ckpt, config, whole, name), plot_meta_loss(log_path, out / "meta_loss.png")),
                    "writing the checkpoint")
    bar.close()
    if export:
        on_main(info, lambda: save_rule(out, name, s.theta, meta_training={
            "method": f"antithetic PES over truncated unrolls, outer optimizer {outer.describe()}",
            "tasks": f"MLPs on MNIST at {', '.join(f'{config.image_size // k}x{config.image_size // k}' for k in config.pools)}"
                     f", hidden depths {list(config.depths)}, widths {list(config.widths)}, batch sizes "
                     f"{list(config.batch_sizes)}" + (f", at most {config.max_params} parameters" if config.max_params else ""),
            "outer_steps": s.outer_step, "wall_seconds": round(s.seconds, 1), "processes": shard.world,
            "torch_threads": torch.get_num_threads(), "config": config.settings(), "features": FEATURE_CONFIG,
            **({"settings_changed": s.changes} if s.changes else {}),
        }), "the export")
    return s.theta
