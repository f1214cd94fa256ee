"""Fine-tuning (``--init-from``): what a job takes from the generator it starts from."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

from learned_opt.errors import ConfigError
from learned_opt.pretrained import LoadedGenerator

from ..dataset import Split, split_runs
from .config import TrainConfig


# ---------------------------------------------------------------------------------- fine-tuning


# What a fine-tune takes from the generator it starts from (adopt_source), not from its options.
ADOPTED_FIELDS = ("task", "metric", "tokens", "chunk_size", "precondition", "subspace_skip", "pca_init",
                  "residual_std", "diffusion_steps", "schedule")


def adopt_source(config: TrainConfig, source: LoadedGenerator) -> TrainConfig:
    """``config`` with what a fine-tune of ``source`` cannot choose taken from ``source``: task,
    metric, tokens, diffusion and preconditioning (its architecture and weights come along in the
    trainer). :class:`ConfigError` when the config asks for another task or metric."""
    for name, theirs in (("task", source.task), ("metric", source.metric_name)):
        mine = getattr(config, name)
        if mine is not None and mine != theirs:
            raise ConfigError(f"--init-from {config.init_from!r} is a generator for {name} {theirs!r}, not {mine!r}; "
                              f"leave --{name} out or start from a {mine!r} generator")
    tok = source.manifest["tokenisation"]
    model = source.model.config
    adopted = dataclasses.replace(
        config, task=source.task, metric=source.metric_name, tokens=tok.get("scheme", "chunk"),
        chunk_size=tok.get("chunk_size") or config.chunk_size, precondition=model.precondition,
        subspace_skip=model.subspace_skip, pca_init=False, residual_std=None,
        diffusion_steps=source.diffusion.num_steps, schedule=source.diffusion.config.schedule,
        name=config.name or source.name,
    )
    asked = [k for k in explicit_settings(config, ADOPTED_FIELDS[2:]) if getattr(config, k) != getattr(adopted, k)]
    if asked:
        raise ConfigError(f"--init-from {config.init_from!r} takes {', '.join(asked)} from the generator it starts "
                          f"from ({', '.join(f'{k}={getattr(adopted, k)!r}' for k in asked)}); leave "
                          f"{' and '.join('--' + k.replace('_', '-') for k in asked)} out")
    if asdict(adopted.diffusion_config()) != asdict(source.diffusion.config):
        raise ConfigError(f"--init-from {config.init_from!r} has a noise schedule ({asdict(source.diffusion.config)}) "
                          f"that `train` cannot build from --diffusion-steps and --schedule alone, so it cannot be "
                          f"fine-tuned here; train a new generator instead")
    return adopted


def explicit_settings(config: TrainConfig, names) -> list[str]:
    """Those of ``names`` that ``config`` sets to something other than the default."""
    defaults = TrainConfig()
    return [k for k in names if getattr(config, k) != getattr(defaults, k)]


def source_record(source: LoadedGenerator) -> dict:
    """What a fine-tune's export says about where it started: the source's name and sha256, its
    training record, its corpus summary (without the per-run split) and its ``sampling`` entry
    (the sampler ``tune-sampling`` chose for it), if it has one."""
    corpus = {k: v for k, v in (source.manifest.get("corpus") or {}).items() if k != "split"}
    record = {"name": source.name, "sha256": source.sha256, "training": source.manifest.get("training"), "corpus": corpus}
    if source.manifest.get("sampling"):
        record["sampling"] = dict(source.manifest["sampling"])
    return record


INHERITED_REASON = " (chosen by: "  # what an inherited sampler's chosen_by says before the reason it was chosen


def inherited_sampling(record: dict | None) -> dict | None:
    """A fine-tune's ``sampling`` entry until ``tune-sampling --write`` chooses its own: its source's
    (from :func:`source_record`), marked as inherited; None when the source had none. The reason
    given is the one of the lineage's last tuned generator, so that a chain of fine-tunes does not
    nest one "inherited" inside another."""
    given = (record or {}).get("sampling")
    if not given:
        return None
    why = first_choice(given.get("chosen_by"))
    return {**{k: v for k, v in given.items() if k != "chosen_by"},
            "chosen_by": (f"inherited from {record['name']!r} (sha256 {record['sha256'][:8]}…), the generator this one "
                          "was fine-tuned from; run learned-opt tune-sampling --write to choose its own"
                          + (f"{INHERITED_REASON}{why})" if why else ""))}


def first_choice(why: str | None) -> str | None:
    """The reason a sampler was chosen, through any "inherited from" marks a fine-tune added to it
    (older exports nested them as "(the source's: …)")."""
    while why and why.startswith("inherited from "):
        marks = [m for m in (INHERITED_REASON, " (the source's: ") if m in why]
        if not marks:
            break
        why = why.split(min(marks, key=why.index), 1)[1][:-1]
    return why


def source_split(source: LoadedGenerator, run_ids, config: TrainConfig, notes: list[str] | None = None) -> Split:
    """The runs of the store that a fine-tune of ``source`` trains on and holds out: the runs the
    source held out stay held out, every other run trains. A source without a recorded split gets
    a fresh one (``config``'s fraction and seed), which may hold out runs the source trained on;
    ``notes`` gets a line saying so, and one when ``config.store`` is not the source's recorded corpus
    (runs are matched by id only)."""
    notes = notes if notes is not None else []
    corpus = source.manifest.get("corpus") or {}
    recorded = corpus.get("split")
    if corpus.get("store") and Path(corpus["store"]).name != Path(config.store).name:
        notes.append(f"--store {config.store} is not the corpus {corpus['store']} that {source.name!r} was trained on; "
                     "its held-out runs are matched by run id only")
    if not recorded:
        notes.append(f"{source.name!r} records no train/held-out split: a fresh one is drawn, and held-out loss may "
                     "include runs it trained on")
        return split_runs(run_ids, config.heldout_fraction, config.seed)
    held = set(int(r) for r in recorded["heldout"])
    return Split(tuple(r for r in run_ids if r not in held), tuple(r for r in run_ids if r in held),
                 float(recorded["heldout_fraction"]), int(recorded["seed"]))
