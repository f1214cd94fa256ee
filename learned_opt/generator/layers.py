"""The transformer's building blocks: per-token linear maps, scalar embeddings, attention, blocks."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from .config import GptConfig


class TokenLinear(nn.Module):
    """A linear map per token group, applied to all tokens in one batched matmul.

    ``weight`` is ``[G, in, out]``; ``x`` is ``[B, T, in]`` and the result ``[B, T, out]``. Token
    ``k`` uses group ``groups[k]``'s map; without ``groups`` every token has its own (``G = T``).
    """

    groups: torch.Tensor | None  # a buffer: the map of each token [T], or None when no map is shared

    def __init__(self, num_tokens: int, in_features: int, out_features: int,
                 groups: tuple[int, ...] | None = None) -> None:
        super().__init__()
        shared = groups is not None and len(set(groups)) < len(groups)
        num_maps = max(groups) + 1 if groups is not None and shared else num_tokens
        self.weight = nn.Parameter(torch.zeros(num_maps, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_maps, out_features))
        self.register_buffer("groups", torch.tensor(groups) if shared else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w: torch.Tensor = self.weight
        b: torch.Tensor = self.bias
        if self.groups is not None:
            w, b = w.index_select(0, self.groups), b.index_select(0, self.groups)
        # [T, B, in] @ [T, in, out] + [T, 1, out] -> [T, B, out]
        y = torch.baddbmm(b.unsqueeze(1), x.transpose(0, 1), w)
        return y.transpose(0, 1)  # [B, T, out]

    def extra_repr(self) -> str:
        g, i, o = self.weight.shape
        return f"maps={g}, in_features={i}, out_features={o}"


class ScalarEmbedding(nn.Module):
    """A scalar per sample -> one token: sinusoidal features at fixed frequencies, then an MLP."""

    frequencies: torch.Tensor  # a buffer [F]

    def __init__(self, frequencies: torch.Tensor, d_model: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", frequencies.float(), persistent=False)  # [F]
        self.mlp = nn.Sequential(
            nn.Linear(2 * frequencies.numel(), d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.float().unsqueeze(-1) * self.frequencies  # [B, F]
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [B, 2F]
        return self.mlp(features.to(cast(nn.Linear, self.mlp[0]).weight.dtype))  # [B, D]


class Attention(nn.Module):
    """Non-causal multi-head self-attention."""

    def __init__(self, config: GptConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, hd]
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, n, d)  # [B, N, D]
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GptConfig) -> None:
        super().__init__()
        hidden = int(round(config.mlp_ratio * config.d_model))
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, config.d_model)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x


class MetricHead(nn.Module):
    """Predicts the normalised metric of a network from its encoded parameter tokens.

    One transformer block mixes the tokens (a network's metric depends on how its layers fit
    together), a per-token linear map and GELU make features that are pooled by their mean, and a
    linear read-out maps the pool to one number: ``[B, T, D] -> [B]`` (the DeepSets form
    ρ(mean φ(h)); the nonlinearity comes before the pooling and no norm after it, so that the
    scale of the weights, which says much about a network's metric, is not averaged or normalised away).
    """

    def __init__(self, config: GptConfig) -> None:
        super().__init__()
        d = config.d_model
        self.block = Block(config)
        self.features = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"))
        self.out = nn.Linear(d, 1)
        with torch.no_grad():  # an untrained head predicts the middle of the corpus's metric range
            self.out.weight.zero_()
            self.out.bias.fill_(0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.features(self.block(tokens)).mean(1)  # [B, T, D] -> [B, D]
        return self.out(pooled).squeeze(-1)  # [B]
