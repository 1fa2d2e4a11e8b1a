"""A BERT-style encoder, built from torch.nn layers or from genfast's from the same weights.

Both builds share one module tree and state_dict. BERT normalises after each residual add
(post-norm): the genfast build adds the residual inside the LayerNorm (one pass), runs
bidirectional attention with the padding mask in genfast's flash kernel and the MLP's exact
GELU in one pass. The matrix products are torch's in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops


@dataclass(frozen=True)
class BERTConfig:
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    dim: int = 768
    heads: int = 12
    layers: int = 12
    eps: float = 1e-12


class EncoderLayer(nn.Module):
    """h = norm1(x + attention(x)); out = norm2(h + mlp(h))."""

    def __init__(self, config: BERTConfig, fused: bool):
        super().__init__()
        norm = genfast_nn.LayerNorm if fused else nn.LayerNorm
        self.heads, self.fused = config.heads, fused
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.norm1 = norm(config.dim, eps=config.eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim),
            (genfast_nn.GELU if fused else nn.GELU)(),
            nn.Linear(4 * config.dim, config.dim),
        )
        self.norm2 = norm(config.dim, eps=config.eps)

    def _add_norm(self, norm: nn.LayerNorm, update: Tensor, residual: Tensor) -> Tensor:
        return norm(update, residual)[0] if self.fused else norm(update + residual)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).transpose(1, 3).unbind(2)
        attention = ops.scaled_dot_product_attention if self.fused else F.scaled_dot_product_attention
        attended = attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(batch, length, dim)
        h = self._add_norm(self.norm1, self.out(attended), x)
        return self._add_norm(self.norm2, self.mlp(h), h)


class BERT(nn.Module):
    """Token ids (B, S), optional attention_mask (B, S; 1 or True for real tokens, 0 for padding)
    and token_type_ids (B, S) -> hidden states (B, S, dim). fused: genfast layers."""

    def __init__(self, config: BERTConfig = BERTConfig(), fused: bool = False):
        super().__init__()
        self.config, self.fused = config, fused
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_positions, config.dim)
        self.type_embedding = nn.Embedding(config.type_vocab_size, config.dim)
        self.embedding_norm = (genfast_nn.LayerNorm if fused else nn.LayerNorm)(config.dim, eps=config.eps)
        self.layers = nn.ModuleList(EncoderLayer(config, fused) for _ in range(config.layers))
        for name, parameter in self.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        length = tokens.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"tokens must have at most {self.config.max_positions} positions, got {length}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(tokens)
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions) + self.type_embedding(token_type_ids)
        x = self.embedding_norm(x)
        # Every query sees the sequence's real tokens: a (B, 1, 1, S) mask broadcast over heads and queries.
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x
