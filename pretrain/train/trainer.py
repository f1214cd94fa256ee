"""The training loop: pairs in, diffusion loss, AdamW + EMA, logs, checkpoints and the export."""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from learned_opt.diffusion import Diffusion
from learned_opt.errors import ConfigError, TrainingError
from learned_opt.generator import Gpt, GptConfig
from learned_opt.layout import signature_to_json
from learned_opt.normalization import Normalization
from learned_opt.options import check_export_target, check_out_dir
from learned_opt.pretrained import load_generator

from ..dataset import PairBatch, PairSampler, Split, StepBatches, open_pairs, open_store, seeded_generator
from ..store_lock import acquire_writer, remove_stale_temp
from .config import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    LOG_NAME,
    PLOT_NAME,
    TrainConfig,
    check_batch_size,
    check_resumable,
    with_defaults,
)
from .auxiliary import OutputObjectives, property_loss, training_cond
from .distributed import DistInfo, mean_over_ranks, on_main, restore_rng, rng_states, setup_distributed
from .export import export_checkpoint
from .finetune import ADOPTED_FIELDS, adopt_source, explicit_settings, source_record, source_split
from .model_setup import new_model
from .optim import Ema, layer_weights, make_optimizer
from .outputs import (
    CHECKPOINT_TEMP,
    append_jsonl,
    atomic_torch_save,
    hardware_summary,
    load_checkpoint,
    plot_losses,
    refuse_nonfinite_checkpoint,
    truncate_log,
)


@dataclass
class TrainResult:
    """What :func:`train` hands back."""

    model: Gpt  # the trained weights (not the DDP wrapper)
    ema: Gpt  # the EMA weights (what gets exported)
    step: int
    last: dict  # the last log record
    checkpoint: Path | None
    manifest: Path | None  # the exported manifest, when exported
    notes: list[str]


def train(config: TrainConfig, *, command: str | None = None) -> TrainResult:
    """Run (or resume) a training job as ``config`` says; see :mod:`pretrain.train`.

    Training seeds and draws from torch's global RNG (the initialisation is seeded with
    ``config.seed``, dropout draws from it, and a checkpoint saves and a resume restores it, which
    exact resume relies on). All of that happens inside ``torch.random.fork_rng``: the caller's
    global CPU and CUDA RNG states are restored when ``train`` returns or raises.
    """
    info = setup_distributed(config.device)
    cuda = list(range(torch.cuda.device_count())) if info.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return Trainer(config, info, command or shlex.join(sys.argv)).run()
    finally:
        if info.owns_group:
            dist.destroy_process_group()


class Trainer:
    """One training job: set up from a config (and the checkpoint in ``out`` when resuming).

    Everything that can refuse (an existing checkpoint, another configuration, a bad store) is
    checked in the constructor, before anything is written.
    """

    def __init__(self, config: TrainConfig, info: DistInfo, command: str) -> None:
        config = dataclasses.replace(config)  # task and metric get resolved below
        config.validate(info.world)
        check_out_dir(config.out)
        self.info, self.out = info, Path(config.out)
        self.ckpt_path, self.log_path = self.out / CHECKPOINT_NAME, self.out / LOG_NAME
        self.notes: list[str] = []

        # ---- what we start from: nothing, or a checkpoint
        state = None
        if self.ckpt_path.exists():
            if not config.resume:
                raise TrainingError(
                    f"{self.out} already holds a training checkpoint: pass --resume to continue it, "
                    "or choose another --out"
                )
            state = load_checkpoint(self.ckpt_path)
            refuse_nonfinite_checkpoint(state, self.ckpt_path)
            if config.init_from is not None:  # what a fine-tune took from its source, as it took it
                saved = with_defaults(state["config"], TrainConfig)
                given = set(explicit_settings(config, ADOPTED_FIELDS))  # anything else asked for is refused below
                config = dataclasses.replace(config, **{k: saved[k] for k in ADOPTED_FIELDS if k not in given},
                                             name=config.name or state.get("name"))
            check_resumable(state["config"], config, self.ckpt_path)
        # ---- a fine-tune starts from another generator: its model, units and held-out runs
        source = None
        if config.init_from is not None and state is None:
            source = load_generator(config.init_from)
            config = adopt_source(config, source)
        split = Split.from_dict(state["corpus"]["split"]) if state else None
        normalization = Normalization(**state["normalization"]) if state else None
        if source is not None:
            split = source_split(source, open_store(config.store, source.task).run_ids(), config, self.notes)
            normalization = source.normalization
        self.corpus = open_pairs(
            config.store, config.pair_config(),
            task=state["corpus"]["task"] if state else config.task,
            split=split, normalization=normalization,
            recorded_settings=state["corpus"].get("store_settings_sha256") if state else None,
        )
        self.notes += self.corpus.notes
        check_batch_size(config.batch_size, self.corpus.store.num_params)
        if source is not None and self.corpus.store.signature != source.layout.signature:
            raise ConfigError(f"--init-from {config.init_from!r} generates {source.layout.num_params}-parameter networks "
                              f"of another shape than the store's; fine-tune on a corpus of its task's model")
        before = with_defaults(state["config"], TrainConfig)["layer_balance"] if state else config.layer_balance
        if before != config.layer_balance:
            self.notes.append(f"--layer-balance changed from {before:g} to {config.layer_balance:g} at step {state['step']}")
        config.task, config.metric = self.corpus.task.name, self.corpus.metric  # resolved, as recorded
        self.config = config
        self.name = config.name or config.task  # a generator is named for the task it serves
        if config.export:  # a resumed job's earlier export is its own
            check_export_target(self.out, self.name, own=state is not None, source=config.init_from)

        # ---- model, EMA, optimizer, schedule
        self.layout = self.corpus.task.layout(config.chunk_size, config.tokens)  # the task's unit symmetry
        # the same initialisation on every rank; train() runs this inside fork_rng, so the
        # caller's global RNG is restored afterwards
        torch.manual_seed(config.seed)
        focus = []  # the pair groups that get a fixed share of every batch (built only when asked for)
        if config.init_fraction:
            focus.append((self.corpus.train.start_pairs(0), config.init_fraction))
        if config.late_fraction:
            focus.append((self.corpus.train.late_pairs(config.late_max_gap), config.late_fraction))
        self.sampler = PairSampler(
            len(self.corpus.train), config.batch_size, config.seed, self.corpus.task, config.augment, focus=focus,
        )
        self.model = new_model(config, self.layout, self.corpus.train, self.sampler, state, source)
        self.source = source_record(source) if source is not None else (state or {}).get("init_from")
        self.model.to(info.device)
        if state and with_defaults(state["model_config"], GptConfig) != asdict(self.model.config):
            raise TrainingError(
                f"cannot resume {self.ckpt_path}: preset {config.preset!r} now means "
                f"{asdict(self.model.config)}, the checkpoint holds {state['model_config']}; train into a new --out"
            )
        self.ema = Ema(self.model, config.ema_decay)
        self.opt, self.sched = make_optimizer(self.model, config)
        self.step, self.wall_before, self.commands, self.last = 0, 0.0, [command], {}
        self.saved_step = int(state["step"]) if state else None  # the checkpoint on disk, kept if training diverges
        if state:
            self.model.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step, self.wall_before = int(state["step"]), float(state["wall_time_s"])
            self.commands = list(state.get("commands", [])) + [command]
            self.last = dict(state.get("last") or {})
            restore_rng(state["rng"], info, config.seed)
        # buffers (σ_p, PCA directions) are equal on every rank from the start and never change
        self.ddp = self.model if info.world == 1 else DistributedDataParallel(
            self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self.diffusion = Diffusion(config.diffusion_config())
        self.t_probs = None
        if config.snr_window is not None:  # windowed on the scale of the updates θ′ - θ (pooled)
            scale = self.model.config.residual_std
            self.t_probs = self.diffusion.snr_window_probs(*config.snr_window, scale=scale).to(info.device)
        self.layer_weight = layer_weights(self.layout, config.layer_balance).to(info.device)  # [1, P]
        self.outputs = None  # output matching and the label hinge: their data is loaded before anything is written
        if config.output_matching > 0 or config.label_hinge > 0:
            self.outputs = OutputObjectives(self.corpus.task, config, self.corpus.normalization, info.device)
        self.property_error = torch.zeros((), dtype=torch.float64, device=info.device)  # summed between log records
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=info.device)  # non-finite losses/grad norms seen
        self.use_amp = config.amp and info.device.type == "cuda"
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ one step, one evaluation

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_amp else nullcontext()

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The x0 loss weights at steps ``t``: the model's own (``1 / σ_p²`` when preconditioned)
        times the layer balance's."""
        return self.model.loss_weight(t) * self.layer_weight

    def train_step(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's share of a batch; returns (loss, grad norm) on the device."""
        noise = seeded_generator("noise", self.config.seed, self.step, self.info.rank, device=self.info.device)
        with self.autocast():
            loss = self.diffusion.training_loss(
                self.ddp, batch.theta_next, training_cond(batch, self.config, self.step, self.info.rank), generator=noise,
                weight=self.loss_weight, t_probs=self.t_probs,
                extra=self.outputs.loss_fn(self.step, self.info.rank) if self.outputs is not None else None,
            )
            if self.config.property_head > 0:  # the head's metric regression on the pairs' clean checkpoints
                error = property_loss(self.model, batch)
                self.property_error += error.detach().double()
                loss = loss + self.config.property_head * error
        loss.backward()
        self.nonfinite += ~torch.isfinite(loss.detach())  # checked (and reduced over ranks) before any log or save
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.model, self.step)
        self.nonfinite += ~torch.isfinite(grad_norm.detach())
        return loss.detach(), grad_norm.detach()

    def stop_if_diverged(self) -> None:
        """Raise :class:`TrainingError` on every rank if any rank met a non-finite loss or gradient
        since the last check, or holds non-finite weights: a count reduced over ranks, so that all
        stop together, before the log record or checkpoint that would carry the NaN."""
        weights = [(~torch.isfinite(p.detach())).sum() for p in (*self.model.parameters(), *self.ema.module.parameters())]
        if float(mean_over_ranks((self.nonfinite + torch.stack(weights).sum()).double(), self.info)) == 0:
            return
        kept = (f"the checkpoint of step {self.saved_step} in {self.out} is kept" if self.saved_step is not None
                else "no checkpoint was written")
        raise TrainingError(
            f"training diverged by step {self.step}: a non-finite loss, gradient or weight; {kept}. "
            "Lower --lr (or set --grad-clip) and train into a new --out"
        )

    @torch.no_grad()
    def heldout_loss(self) -> dict[str, float]:
        """Loss of the model and of its EMA on fixed held-out pairs with fixed noise (mean over ranks).

        Always the plain x0 MSE at uniformly drawn t (G.pt's loss), whatever the training objective
        weights or windows, so that held-out figures compare across parameterisations; with a
        property head also its squared error (``heldout_property_loss``, ``..._ema``)."""
        cfg, info, heldout = self.config, self.info, self.corpus.heldout
        models = {"heldout_loss": self.model, "heldout_loss_ema": self.ema.module}
        head = self.model.property_head is not None
        sampler = PairSampler(len(heldout), cfg.batch_size, cfg.seed, self.corpus.task, augment=False)
        totals = torch.zeros(2 * len(models), dtype=torch.float64)
        for b in range(cfg.eval_batches):
            idx, _ = PairSampler.shard(sampler.global_batch(b, stream="heldout")[0], None, info.rank, info.world)
            batch = heldout.batch(idx).to(info.device)
            for k, model in enumerate(models.values()):
                model.eval()
                gen = seeded_generator("heldout-noise", cfg.seed, b, info.rank, device=info.device)
                with self.autocast():
                    totals[k] += self.diffusion.training_loss(model, batch.theta_next, batch.cond(), generator=gen).item()
                    if head:
                        totals[len(models) + k] += property_loss(model, batch).item()
        self.model.train()
        totals = mean_over_ranks(totals / cfg.eval_batches, info).tolist()
        names = [*models, *(n.replace("loss", "property_loss") for n in models)] if head else list(models)
        return dict(zip(names, totals))

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> dict:
        """Everything a resume needs, as tensors and plain containers (call on every rank: it
        gathers the ranks' RNG states)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": asdict(self.config),
            "model_config": asdict(self.model.config),
            "diffusion_config": asdict(self.diffusion.config),
            "signature": signature_to_json(self.layout.signature),
            "symmetry": self.layout.symmetry.to_json() if self.layout.symmetry is not None else None,
            "normalization": self.corpus.normalization.to_dict(),
            "corpus": self.corpus.summary(),
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_states(self.info),
            "wall_time_s": self.wall_before + time.perf_counter() - self.t_start,
            "last": self.last,
            "hardware": hardware_summary(self.info),
            "commands": self.commands,  # every invocation of this job, the first one first
            "name": self.name,
            "init_from": self.source,  # the generator a fine-tune started from (name, sha256, its training)
        }

    def save(self) -> None:
        state = self.checkpoint()  # on every rank: the RNG gather is a collective

        def write() -> str | None:
            atomic_torch_save(state, self.ckpt_path)  # temp file, fsync, rename: the old one stays until then
            return plot_losses(self.log_path, self.out / PLOT_NAME)

        note = on_main(self.info, write, "writing the checkpoint")
        if note and note not in self.notes:
            self.notes.append(note)
        self.saved_step = self.step

    # ------------------------------------------------------------------ the loop

    def batches(self, end: int) -> DataLoader:
        """This rank's batches of steps ``self.step .. end - 1``, built ahead by worker processes."""
        info = self.info
        steps = StepBatches(self.corpus.train, self.sampler, self.step, end, info.rank, info.world)
        return steps.loader(self.config.workers, info.device)

    def run(self) -> TrainResult:
        cfg, info = self.config, self.info

        def claim() -> None:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainingError(f"cannot create {self.out} ({exc.strerror or exc}): choose a folder you can "
                                    f"write") from None
            # one job per folder: held until this trainer is gone or the process ends
            weakref.finalize(self, acquire_writer(self.out, "the training folder", TrainingError))
            remove_stale_temp([self.out], 0, CHECKPOINT_TEMP)  # what a job killed mid-save left (the lock is ours)
            if self.step > 0:
                truncate_log(self.log_path, self.step)  # records written after the checkpoint
            else:
                self.log_path.write_text("", encoding="utf-8")

        on_main(info, claim, "taking the training folder")
        has_heldout = self.corpus.heldout is not None and len(self.corpus.heldout) > 0
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        zero = lambda: torch.zeros((), dtype=torch.float64, device=info.device)  # noqa: E731 (no sync per step)
        t_log, loss_sum, n_sum = time.perf_counter(), zero(), 0
        with tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not (info.is_main and cfg.progress),
                  dynamic_ncols=True) as bar:
            self.model.train()
            for batch in self.batches(end):
                loss, grad_norm = self.train_step(batch.to(info.device, non_blocking=True))
                loss_sum += loss.double()
                n_sum += 1
                bar.update(1)
                step = self.step
                evaluate = has_heldout and (step == end or (cfg.eval_every and step % cfg.eval_every == 0))
                log = step % cfg.log_every == 0 or step == end or evaluate
                if log or step % cfg.checkpoint_every == 0:
                    self.stop_if_diverged()
                if log:
                    now = time.perf_counter()
                    self.last = {
                        "step": step,
                        "loss": float(mean_over_ranks(loss_sum, info)) / n_sum,
                        "lr": self.sched.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "samples_per_s": n_sum * cfg.batch_size / max(now - t_log, 1e-9),
                        "elapsed_s": self.wall_before + now - self.t_start,
                    }
                    if self.outputs is not None:  # each objective alone, before its weight
                        self.last.update(self.outputs.log_record(n_sum, info))
                    if self.config.property_head > 0:  # the head's squared error alone, before its weight
                        self.last["property_loss"] = float(mean_over_ranks(self.property_error, info)) / n_sum
                        self.property_error.zero_()
                    if evaluate:
                        self.last.update(self.heldout_loss())
                    on_main(info, lambda: append_jsonl(self.log_path, self.last), "writing the log")
                    bar.set_postfix(loss=f"{self.last['loss']:.4g}", samples_s=f"{self.last['samples_per_s']:.0f}")
                    t_log, loss_sum, n_sum = time.perf_counter(), zero(), 0
                if step % cfg.checkpoint_every == 0 or step == end:
                    self.save()

        manifest = None
        if self.step >= cfg.steps and cfg.export:
            manifest = on_main(info, lambda: export_checkpoint(self.ckpt_path, self.out, name=self.name), "the export")
        elif self.step < cfg.steps:
            self.notes.append(f"stopped at step {self.step} of {cfg.steps}: continue with --resume")
        if info.world > 1:
            dist.barrier()
        checkpoint = self.ckpt_path if self.step > 0 else None
        return TrainResult(self.model, self.ema.module, self.step, self.last, checkpoint, manifest, self.notes)
