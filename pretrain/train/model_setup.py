"""The generator a training job trains: fresh from a preset, from a checkpoint, or from a fine-tune's source."""

from __future__ import annotations

import dataclasses

from learned_opt.errors import TrainingError
from learned_opt.generator import Gpt, GptConfig, build_generator, get_config
from learned_opt.layout import Layout
from learned_opt.pretrained import LoadedGenerator

from ..dataset import PairDataset, PairSampler
from .config import TrainConfig, with_defaults
from .optim import residual_scale_estimate, sample_updates


def new_model(config: TrainConfig, layout: Layout, pairs: PairDataset, sampler: PairSampler, state: dict | None,
              source: LoadedGenerator | None) -> Gpt:
    """The model, before a checkpoint's weights are loaded into it: ``config``'s preset (σ_p, the
    PCA directions and the encoders measured on sampled training ``pairs`` where asked), the
    architecture a checkpoint recorded (``state``), or ``source``'s architecture and weights. A
    fine-tune may add a null prompt (``--prompt-dropout``) or a property head (``--property-head``)
    to a source that lacks them (everything else starts at the source's weights), and keeps those
    of the source that it does not train frozen.

    Draws from the global RNG (the initialisation): seed it first."""
    # Measured on sampled training pairs for a fresh model (deterministic: the same on every
    # rank); a resumed model brings σ_p, the PCA directions and its residual_std along.
    updates = residual_scale = None
    if state is None and source is None and (config.precondition or config.pca_init or config.snr_window is not None):
        updates = sample_updates(pairs, sampler)
    if state is not None:
        residual_std = with_defaults(state["model_config"], GptConfig)["residual_std"]
    elif config.residual_std is not None:
        residual_std = config.residual_std  # one given σ for every parameter
    elif updates is not None:
        residual_scale = layout.group_rms(residual_scale_estimate(updates))  # chunk tokens: unchanged
        residual_std = residual_scale.square().mean().sqrt().item()  # the pooled σ, recorded
    else:
        residual_std = get_config(config.preset).residual_std
    extras = dict(null_prompt=config.prompt_dropout > 0, property_head=config.property_head > 0)
    if state is not None and config.init_from is not None:  # a fine-tune's architecture, as checkpointed
        model_config = GptConfig(**with_defaults(state["model_config"], GptConfig))
    elif source is not None:  # the source's architecture, with what this fine-tune adds
        have = source.model.config
        model_config = dataclasses.replace(have, **{k: getattr(have, k) or v for k, v in extras.items()})
    else:
        model_config = dataclasses.replace(
            get_config(config.preset), precondition=config.precondition, subspace_skip=config.subspace_skip,
            residual_std=residual_std, **extras,
        )
    model = build_generator(layout, model_config, config.diffusion_config())
    if source is not None:  # weights and buffers (σ_p, PCA directions) of the source
        missing, unexpected = model.load_state_dict(source.model.state_dict(), strict=False)
        added = [k for k in missing if not k.startswith(("null_prompt", "property_head."))]
        if added or unexpected:
            raise TrainingError(f"--init-from {config.init_from!r}: its weights do not fit the model built from its "
                                f"manifest (missing {added[:3]}, unexpected {unexpected[:3]})")
    elif state is None and config.precondition:
        model.residual_scale.copy_(residual_scale if residual_scale is not None else residual_std)
    if state is None and source is None and config.pca_init:
        model.init_encoders_from_updates(updates)
    # what a fine-tune's source has but this job does not train stays as it is (DDP then sees no unused parameters)
    if model.null_prompt is not None and not config.prompt_dropout > 0:
        model.null_prompt.requires_grad_(False)
    if model.property_head is not None and not config.property_head > 0:
        model.property_head.requires_grad_(False)
    return model
