"""Named training recipes: what ``learned-opt train --recipe NAME`` sets, instead of a row of flags.

Options given on the command line override a recipe's; on ``--resume`` the checkpoint's settings
come first, so a recipe there must agree with them (it is checked like any other option).

* ``gpt`` — G.pt's parameterisation: chunk tokens, plain residual, uniform timesteps (the defaults).
* ``neuron`` — what the shipped ``mnist-mlp`` generator was first trained with: the ``small`` preset
  over neuron tokens, noise-level preconditioning with PCA-initialised encoders and subspace skips,
  half of each batch starting at the initialisation, timesteps drawn where the update's log-SNR
  lies in [-4, 6], every layer weighted alike, 10,000 steps of 128 pairs at lr 1e-3. (The shipped
  run turned ``--layer-balance 1`` on at step 3,000; the recipe has it from the start.)
* ``output-matching`` — the fine-tune that took it from 20.2% to 9.7% test error: start from a
  generator (``--init-from``), add the divergence of the predicted networks' outputs (weight 2),
  three quarters of each batch at the initialisation, 3,000 steps at lr 1e-4. Needs the task's
  data (``--data-root``).
* ``self-ranking`` — the output-matching fine-tune that also teaches the generator to rank its own
  samples and to sample with classifier-free guidance: prompt dropout 0.1 (a learned null prompt)
  and a property head (weight 1) that predicts the metric of a parameter vector. Start from a
  generator (``--init-from``); its sampler and head are then chosen and measured by
  ``tune-sampling`` and ``eval --rank self``.
* ``late-pairs`` — the self-ranking fine-tune that made the ``mnist-mlp`` shipped before (run twice):
  output matching at weight 16, half of each batch at the initialisation and two fifths from pairs
  that start in the second half of their run, 1,500 steps.
* ``label-hinge`` — the fine-tune that made the shipped ``mnist-mlp`` (run twice): ``late-pairs`` at
  output-matching weight 64 with the label hinge at weight 64 (the predicted network's training
  loss may not exceed its target's), 2,000 steps.
"""

from __future__ import annotations

from learned_opt.errors import ConfigError

RECIPES: dict[str, dict] = {
    "gpt": {},
    "neuron": {
        "preset": "small", "tokens": "neuron", "precondition": True, "pca_init": True, "subspace_skip": True,
        "init_fraction": 0.5, "snr_window": (-4.0, 6.0), "layer_balance": 1.0,
        "steps": 10_000, "batch_size": 128, "lr": 1e-3, "warmup": 300,
        "log_every": 50, "eval_every": 500, "checkpoint_every": 500,
    },
    "output-matching": {
        "output_matching": 2.0, "init_fraction": 0.75, "steps": 3000, "batch_size": 128, "lr": 1e-4,
        "warmup": 50, "ema_decay": 0.999, "log_every": 50, "eval_every": 500, "checkpoint_every": 250,
    },
}
RECIPES["self-ranking"] = {**RECIPES["output-matching"], "prompt_dropout": 0.1, "property_head": 1.0}
RECIPES["late-pairs"] = {**RECIPES["self-ranking"], "output_matching": 16.0, "init_fraction": 0.5, "late_fraction": 0.4,
                         "steps": 1500}
RECIPES["label-hinge"] = {**RECIPES["late-pairs"], "output_matching": 64.0, "label_hinge": 64.0, "steps": 2000}


def recipe(name: str) -> dict:
    """The settings of recipe ``name``; :class:`ConfigError` naming the recipes for another name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown training recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])
