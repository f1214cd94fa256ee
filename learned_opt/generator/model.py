"""The diffusion transformer over a network's parameters (:class:`Gpt`), and :func:`build_generator`."""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import DiffusionConfig, make_betas
from ..errors import ArchitectureMismatchError, ConfigError
from ..layout import Layout
from .config import NUM_SCALAR_TOKENS, GptConfig, get_config
from .layers import Block, MetricHead, ScalarEmbedding, TokenLinear


class Gpt(nn.Module):
    """G.pt: predicts clean parameters θ′ from (x_t, t, θ, l, l′). See :mod:`learned_opt.generator`."""

    # buffers, registered in __init__ (the first three with precondition only, skip_basis with subspace_skip)
    signal_rate: torch.Tensor
    noise_rate: torch.Tensor
    residual_scale: torch.Tensor
    skip_basis: torch.Tensor
    token_index: torch.Tensor
    flat_index: torch.Tensor
    token_group: torch.Tensor
    pos_index: torch.Tensor
    null_prompt: nn.Parameter | None  # a parameter, registered in __init__

    def __init__(self, layout: Layout, config: GptConfig, diffusion: DiffusionConfig | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        if config.precondition:
            if diffusion is None:
                raise ConfigError(
                    "a preconditioned Gpt (GptConfig.precondition=True) needs its noise schedule: "
                    "pass diffusion=DiffusionConfig(...) (the one it is trained and sampled with)"
                )
            abar = torch.cumprod(1.0 - make_betas(diffusion), dim=0)  # [N] float64
            self.register_buffer("signal_rate", abar.sqrt().float(), persistent=False)  # a = sqrt(ᾱ_t)
            self.register_buffer("noise_rate", (1.0 - abar).sqrt().float(), persistent=False)  # s
            # σ_p of θ′ - θ per parameter: part of the weights (set by the trainer from its corpus)
            self.register_buffer("residual_scale", torch.full((layout.num_params,), float(config.residual_std)))
            if config.subspace_skip:  # per token group, orthonormal update directions [G, M, q]; zero: no skip yet
                m, d = layout.token_dim, config.d_model
                self.register_buffer("skip_basis", torch.zeros(layout.num_groups, m, min(m, d)))
        elif config.subspace_skip:
            raise ConfigError("GptConfig.subspace_skip needs precondition=True")
        t, m, d = layout.num_tokens, layout.token_dim, config.d_model
        self.num_tokens = t
        # Encoders and decoders are shared within each group of interchangeable tokens (neuron
        # tokens; a chunk token is a group of its own). Neuron tokens also sum θ's and x_t's
        # encodings of one unit into one token (shared position embeddings could not otherwise
        # tell which θ token goes with which x_t token); chunk tokens keep G.pt's 2T tokens.
        self.fused = layout.scheme == "neuron"
        groups = layout.token_groups

        # Gather index [T, M] into the flat vector padded with one zero at position P, and the
        # inverse index [P] into the flattened [T * M] tokens; both derived from the layout.
        gather = layout.to_tokens(torch.arange(1, layout.num_params + 1)) - 1  # padding -> -1
        real = gather.reshape(-1) >= 0
        scatter = torch.empty(layout.num_params, dtype=torch.long)
        scatter[gather.reshape(-1)[real]] = torch.nonzero(real).squeeze(1)
        gather = torch.where(gather < 0, torch.full_like(gather, layout.num_params), gather)
        self.register_buffer("token_index", gather, persistent=False)  # [T, M]
        self.register_buffer("flat_index", scatter, persistent=False)  # [P]
        self.register_buffer("token_group", torch.tensor(layout.token_groups), persistent=False)  # [T]

        self.theta_encoder = TokenLinear(t, m, d, groups)
        self.noised_encoder = TokenLinear(t, m, d, groups)
        metric_freqs = math.pi * 2.0 ** torch.linspace(0.0, config.metric_max_log2_frequency, config.num_frequencies)
        time_freqs = torch.exp(
            -math.log(config.timestep_max_period) * torch.arange(config.num_frequencies) / config.num_frequencies
        )
        self.timestep_embedding = ScalarEmbedding(time_freqs, d)
        self.metric_embedding = ScalarEmbedding(metric_freqs, d)
        self.target_embedding = ScalarEmbedding(metric_freqs, d)
        self.delta_embedding = ScalarEmbedding(metric_freqs, d)
        if self.fused:  # one embedding per token group, then the scalar tokens'
            g = layout.num_groups
            self.pos_embedding = nn.Parameter(torch.zeros(1, g + NUM_SCALAR_TOKENS, d))
            pos = torch.cat([self.token_group, torch.arange(g, g + NUM_SCALAR_TOKENS)])
        else:
            self.pos_embedding = nn.Parameter(torch.zeros(1, 2 * t + NUM_SCALAR_TOKENS, d))
            pos = torch.arange(2 * t + NUM_SCALAR_TOKENS)
        self.register_buffer("pos_index", pos, persistent=False)  # sequence position -> embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.decoder = TokenLinear(t, d, m, groups)
        self.reset_parameters()
        # Built after the initialisation above, so that a generator without them starts as it always did.
        # null_prompt [2, D]: the l′ and l′ - l tokens of a dropped prompt (classifier-free guidance)
        null = nn.Parameter(0.02 * torch.randn(2, d)) if config.null_prompt else None
        self.register_parameter("null_prompt", null)
        self.property_head = MetricHead(config) if config.property_head else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise: encoders (per token, or per group of neuron tokens) scaled by the real
        width of their tokens, zero decoders."""
        real = self._group_mask().to(self.theta_encoder.weight.device)  # [G, M]
        fan_in = real.sum(1).clamp(min=1).float()  # [G]
        for enc in (self.theta_encoder, self.noised_encoder):
            w = torch.randn_like(enc.weight) / fan_in.sqrt()[:, None, None]
            enc.weight.copy_(w * real.unsqueeze(-1))  # padding rows stay zero
            enc.bias.zero_()
        nn.init.normal_(self.pos_embedding, std=0.02)
        for block in self.blocks:
            # GPT-2 style: shrink the residual branches' output projections with depth.
            std = 0.02 / math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(cast(Block, block).attn.proj.weight, std=std)
            nn.init.normal_(cast(nn.Linear, cast(Block, block).mlp[2]).weight, std=std)
        self.decoder.weight.zero_()
        self.decoder.bias.zero_()

    @torch.no_grad()
    def init_encoders_from_updates(self, updates: torch.Tensor) -> list[int]:
        """Point the encoders of wide tokens at the directions in which parameters move.

        ``updates`` ``[N, P]`` are samples of ``θ′ - θ`` in generator units (divided by
        ``residual_scale`` here when preconditioned). For every encoder whose tokens are wider
        than ``d_model`` (one per token; with neuron tokens one per group, the group's tokens
        pooled as samples) the θ and x_t encoders are set to the top ``d_model`` principal
        directions of the updates (orthonormal, so unit-scale input keeps unit scale; directions
        beyond the rank of the sample keep their random initialisation). A token of M parameters can then pass the
        part of an update that matters through its ``d_model`` features from the first step,
        instead of a random projection that keeps ``d_model / M`` of it. Decoders stay zero, so the
        untrained model still returns θ, unless ``subspace_skip`` is on: then this also sets
        ``skip_basis`` (the same directions; narrow tokens whole) and the skip passes the noised
        input through. Returns the encoders that were set (token indices, or group indices with
        neuron tokens).
        """
        d = self.config.d_model
        if updates.dim() != 2 or updates.shape[1] != self.layout.num_params:
            raise ArchitectureMismatchError(
                f"updates must have shape [N, {self.layout.num_params}], got {list(updates.shape)}"
            )
        u = updates.to(self.theta_encoder.weight.device, torch.float32)
        if self.config.precondition:
            u = u / self.residual_scale
        tokens = self._tokens(u).float()  # [N, T, M]
        real = self._group_mask().sum(1).tolist()  # real width per group
        skip = getattr(self, "skip_basis", None)
        done = []
        for k in range(len(real)):
            width = int(real[k])
            if width <= d:
                if skip is not None:  # the skip covers a narrow token whole
                    skip[k].zero_()
                    skip[k, :width, :width] = torch.eye(width)
                continue
            members = self._group_members(k)
            samples = tokens[:, members, :width].reshape(-1, width)  # a group's tokens pooled
            _, _, vh = torch.linalg.svd(samples, full_matrices=False)  # vh [r, width]
            basis = vh[:d].T  # [width, min(r, d)] orthonormal columns
            for enc in (self.theta_encoder, self.noised_encoder):
                enc.weight[k, :width, : basis.shape[1]] = basis.to(enc.weight.dtype)
            if skip is not None:
                skip[k].zero_()
                skip[k, :width, : basis.shape[1]] = basis
            done.append(k)
        return done

    def _group_members(self, k: int) -> list[int]:
        """Tokens that share encoder ``k`` (a group of neuron tokens, or chunk token ``k`` alone)."""
        return [i for i, g in enumerate(self.layout.token_groups) if g == k]

    def _group_mask(self) -> torch.Tensor:
        """``[G, M]`` real entries of each encoder's tokens (those of a group are equally wide)."""
        first = [self._group_members(k)[0] for k in range(self.theta_encoder.weight.shape[0])]
        return self.layout.token_mask[first]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        theta: torch.Tensor,
        metric: torch.Tensor,
        target: torch.Tensor,
        drop_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict clean θ′.

        x_t: ``[B, P]`` noised θ′ (normalised units); t: ``[B]`` diffusion step (long,
        ``0..num_steps-1``); theta: ``[B, P]`` starting parameters (normalised units); metric,
        target: ``[B]`` the current metric l and the prompted metric l′, normalised to ~[0, 1];
        drop_prompt: ``[B]`` bool, where True the prompt's tokens (l′ and l′ − l) are replaced by
        the learned ``null_prompt`` (needs ``GptConfig.null_prompt``): the prediction without a
        prompt, given θ and l, that classifier-free guidance extrapolates away from.
        Returns ``[B, P]`` = theta + decoded output.
        """
        return self._denoise(x_t, t, self._encode_condition(theta, metric, target, drop_prompt))

    def condition(
        self, theta: torch.Tensor, metric: torch.Tensor, target: torch.Tensor, drop_prompt: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> θ′`` for fixed (θ, l, l′), equal to ``forward``, with the θ tokens and the
        metric tokens encoded once. :meth:`Diffusion.sample` uses it so that a sampled update does
        not re-encode θ at every step."""
        context = self._encode_condition(theta, metric, target, drop_prompt)
        return lambda x_t, t: self._denoise(x_t, t, context)

    def _check_theta(self, theta: torch.Tensor) -> None:
        p = self.layout.num_params
        if theta.dim() != 2 or theta.shape[-1] != p:
            raise ArchitectureMismatchError(
                f"Gpt expects theta of shape [B, {p}], got {list(theta.shape)}; "
                "flatten parameters with the generator's layout"
            )

    def _encode_condition(
        self, theta: torch.Tensor, metric: torch.Tensor, target: torch.Tensor, drop_prompt: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ [B, P] and the metrics [B] -> (θ, encoded θ tokens [B, T, D], metric tokens [B, 3, D])."""
        self._check_theta(theta)
        b = theta.shape[0]
        metric, target = metric.reshape(b), target.reshape(b)
        theta_tokens = self.theta_encoder(self._tokens(theta))  # [B, T, D]
        metric_tokens = torch.stack(
            [self.metric_embedding(metric), self.target_embedding(target), self.delta_embedding(target - metric)],
            dim=1,
        )  # [B, 3, D]
        if drop_prompt is not None:
            if self.null_prompt is None:
                raise ConfigError("this generator has no null prompt (GptConfig.null_prompt): it cannot drop the "
                                  "prompt; retrain it with --prompt-dropout")
            drop = drop_prompt.reshape(b, 1, 1).to(device=metric_tokens.device, dtype=torch.bool)
            null = self.null_prompt.to(metric_tokens.dtype).expand(b, 2, -1)  # [B, 2, D]
            metric_tokens = torch.cat([metric_tokens[:, :1], torch.where(drop, null, metric_tokens[:, 1:])], dim=1)
        return theta, theta_tokens, metric_tokens

    def predict_metric(self, theta: torch.Tensor) -> torch.Tensor:
        """The property head's estimate of the normalised metric of clean parameters θ ``[B, P]``
        (generator units) -> ``[B]``, from the θ encoder's tokens and their position embeddings."""
        if self.property_head is None:
            raise ConfigError("this generator has no property head (GptConfig.property_head): it cannot predict "
                              "metrics; retrain it with --property-head")
        return self.property_head(self.encode_params(theta)).float()

    def encode_params(self, theta: torch.Tensor) -> torch.Tensor:
        """What the property head reads: the θ encoder's tokens of clean parameters ``[B, P]``
        (generator units) with their position embeddings -> ``[B, T, D]``."""
        self._check_theta(theta)
        tokens = self.theta_encoder(self._tokens(theta))  # [B, T, D]
        return tokens + self.pos_embedding[:, self.pos_index[: self.num_tokens]].to(tokens.dtype)

    def _denoise(
        self, x_t: torch.Tensor, t: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer proper: noised θ′ [B, P] and step t [B], given an encoded condition."""
        theta, theta_tokens, metric_tokens = context
        if x_t.shape != theta.shape:
            raise ArchitectureMismatchError(
                f"Gpt expects x_t and theta of shape [B, {self.layout.num_params}], got {list(x_t.shape)} "
                f"and {list(theta.shape)}; flatten parameters with the generator's layout"
            )
        b = x_t.shape[0]
        if self.config.precondition:
            c_in, a = self._preconditioning(t.reshape(b), x_t.dtype)  # [B, P], [B, 1]
            scaled = c_in * (x_t - a * theta)  # [B, P]: (a (θ′ - θ) + s ε), unit scale
            noised_tokens = self.noised_encoder(self._tokens(scaled))  # [B, T, D]
        else:
            noised_tokens = self.noised_encoder(self._tokens(x_t))  # [B, T, D]
        time_token = self.timestep_embedding(t.reshape(b)).unsqueeze(1)  # [B, 1, D]
        if self.fused:
            h = torch.cat([theta_tokens + noised_tokens, time_token, metric_tokens], dim=1)
        else:
            h = torch.cat([theta_tokens, noised_tokens, time_token, metric_tokens], dim=1)
        h = self.drop(h + self.pos_embedding[:, self.pos_index])  # [B, (1 or 2) T + 4, D]
        for block in self.blocks:
            h = block(h)
        first = 0 if self.fused else self.num_tokens
        h = self.ln_f(h[:, first : first + self.num_tokens])  # [B, T, D] at the x_t positions
        out = self.decoder(h)  # [B, T, M]
        out = out.reshape(b, -1).index_select(1, self.flat_index).to(theta.dtype)  # [B, P], padding dropped
        if self.config.precondition:
            sigma = self.residual_scale.to(out.dtype)
            if self.config.subspace_skip:
                out = out + self._subspace_skip(a * sigma * c_in * scaled).to(out.dtype)
            return theta + sigma * out
        return theta + out

    def _subspace_skip(self, guess: torch.Tensor) -> torch.Tensor:
        """``guess`` [B, P] projected, token by token, onto ``skip_basis`` (the update directions).

        In full precision even under autocast: at low noise the skip is nearly the whole update."""
        with torch.autocast(guess.device.type, enabled=False):
            guess = guess.float()
            tokens = self._tokens(guess).float()  # [B, T, M]
            basis = self.skip_basis.index_select(0, self.token_group)  # [T, M, q]
            coeff = torch.einsum("btm,tmq->btq", tokens, basis)
            back = torch.einsum("btq,tmq->btm", coeff, basis)  # [B, T, M]
            return back.reshape(guess.shape[0], -1).index_select(1, self.flat_index)

    def _preconditioning(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_in`` ``[B, P]`` and ``a = sqrt(ᾱ_t)`` ``[B, 1]`` at steps ``t`` [B] (see :mod:`learned_opt.generator`)."""
        t = t.to(self.signal_rate.device)
        a, s = self.signal_rate[t].to(dtype)[:, None], self.noise_rate[t].to(dtype)[:, None]
        var = self.residual_scale.to(dtype).square()  # [P]
        return torch.rsqrt(a * a * var + s * s), a  # 1 / std of x_t - a θ

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Weight of each x0 squared error at steps ``t`` [B]: ``1 / σ_p²`` ``[1, P]`` when
        preconditioned (the decoded output's own error then has unit weight), else ones ``[B, 1]``."""
        if not self.config.precondition:
            return torch.ones(t.numel(), 1, device=t.device)
        return self.residual_scale.float().square().reciprocal().unsqueeze(0)

    def _tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, P]`` -> ``[B, T, M]`` (zero padded); same result as ``layout.to_tokens``."""
        padded = F.pad(flat, (0, 1))  # [B, P + 1]
        tokens = padded.index_select(1, self.token_index.reshape(-1))  # [B, T * M]
        return tokens.view(flat.shape[0], *self.token_index.shape).to(self.theta_encoder.weight.dtype)

    def num_parameters(self) -> int:
        """Number of learned parameters."""
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on matrices (dim >= 2), none on biases and norms."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def build_generator(layout: Layout, preset: str | GptConfig, diffusion: DiffusionConfig | None = None) -> Gpt:
    """A freshly initialised :class:`Gpt` for ``layout`` from a preset name or a config.

    ``diffusion`` is the noise schedule, needed by (and only by) a preconditioned config. Raises
    :class:`~learned_opt.errors.ConfigError` (a ``ValueError``) for an unknown preset, listing the
    known ones.
    """
    return Gpt(layout, get_config(preset), diffusion)
