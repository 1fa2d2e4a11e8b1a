"""A GPT-2 style decoder language model, built from torch.nn layers or from
genfast's from the same weights.

Both builds share one module tree and state_dict. The genfast one adds each
residual inside the LayerNorm that follows it (one pass for the add and the
norm), runs causal attention in genfast's flash kernel and the MLP's tanh GELU
in one pass. The matrix products are torch's in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    max_positions: int = 1024
    dim: int = 768
    heads: int = 12
    layers: int = 12


def _add_norm(norm: nn.LayerNorm, hidden: Tensor, residual: Tensor | None, fused: bool) -> tuple[Tensor, Tensor]:
    """(norm(hidden + residual), hidden + residual); residual None starts the stream."""
    if residual is None:
        return norm(hidden), hidden
    if fused:
        return norm(hidden, residual)
    residual = hidden + residual
    return norm(residual), residual


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, fused: bool):
        super().__init__()
        self.heads, self.fused = config.heads, fused
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        # (batch, heads, length, head_dim) views of the projection: the kernels read them in place.
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).transpose(1, 3).unbind(2)
        attention = ops.scaled_dot_product_attention if self.fused else F.scaled_dot_product_attention
        return self.out(attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, dim))


class DecoderBlock(nn.Module):
    """A pre-norm block. It takes the residual stream and the previous block's output unadded,
    and returns its MLP's output and the stream unadded too: the next norm adds them."""

    def __init__(self, config: GPTConfig, fused: bool):
        super().__init__()
        norm = genfast_nn.LayerNorm if fused else nn.LayerNorm
        self.fused = fused
        self.norm1 = norm(config.dim)
        self.attention = CausalSelfAttention(config, fused)
        self.norm2 = norm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim),
            (genfast_nn.GELU if fused else nn.GELU)(approximate="tanh"),
            nn.Linear(4 * config.dim, config.dim),
        )

    def forward(self, hidden: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        normed, residual = _add_norm(self.norm1, hidden, residual, self.fused)
        normed, residual = _add_norm(self.norm2, self.attention(normed), residual, self.fused)
        return self.mlp(normed), residual


class GPT(nn.Module):
    """Token ids (B, S) -> next-token logits (B, S, vocab_size); the output layer shares the
    token embedding's weight, as GPT-2's. fused: genfast layers."""

    def __init__(self, config: GPTConfig = GPTConfig(), fused: bool = False):
        super().__init__()
        self.config, self.fused = config, fused
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_positions, config.dim)
        self.blocks = nn.ModuleList(DecoderBlock(config, fused) for _ in range(config.layers))
        self.norm = (genfast_nn.LayerNorm if fused else nn.LayerNorm)(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        for name, parameter in self.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"tokens must have at most {self.config.max_positions} positions, got {length}")
        positions = torch.arange(length, device=tokens.device)
        hidden, residual = self.token_embedding(tokens) + self.position_embedding(positions), None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        normed, _ = _add_norm(self.norm, hidden, residual, self.fused)
        return self.lm_head(normed)
