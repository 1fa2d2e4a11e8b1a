"""A T5-style encoder-decoder (T5 v1.1: gated-GELU MLPs, an output layer of its own), built
from torch.nn layers or from genfast's from the same weights.

T5 normalises before each sublayer with RMSNorm, does not scale attention scores, and encodes
positions as a learned bias per head and per bucket of relative distance, added to the
self-attention scores of every layer; the decoder's buckets look back only. Both builds share
one module tree and state_dict. The genfast one adds each residual inside the RMSNorm that
follows it, runs attention in genfast's flash kernel (the position bias is its additive mask,
whose gradient the kernel returns, and the decoder's causality a window that skips masked
tiles), the gated GELU in one pass, and computes the loss without the logits in memory. The
matrix products are torch's in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops
from .layers import add_norm, lm_loss


@dataclass(frozen=True)
class T5Config:
    """t5-v1_1-small's sizes by default."""

    vocab_size: int = 32128
    dim: int = 512
    heads: int = 6
    head_dim: int = 64
    ff_dim: int = 1024
    encoder_layers: int = 8
    decoder_layers: int = 8
    relative_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


def relative_position_bucket(relative: Tensor, bidirectional: bool, buckets: int, max_distance: int) -> Tensor:
    """T5's bucket for each relative position (key - query). Half the buckets (of each
    direction's share, when bidirectional) hold the distances 0, 1, ... one each; the rest
    cover distances up to max_distance on a logarithmic scale, and farther ones share the last.
    Looking back only, a key after its query counts as distance 0."""
    offset = 0
    if bidirectional:
        buckets //= 2
        offset = (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    log_scale = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_scale * (buckets - exact)).long()).clamp(max=buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


class Attention(nn.Module):
    """Multi-head attention without biases or score scaling; keys and values come from
    context (cross-attention) or from x."""

    def __init__(self, config: T5Config, fused: bool):
        super().__init__()
        inner = config.heads * config.head_dim
        self.heads, self.fused = config.heads, fused
        self.q = nn.Linear(config.dim, inner, bias=False)
        self.k = nn.Linear(config.dim, inner, bias=False)
        self.v = nn.Linear(config.dim, inner, bias=False)
        self.o = nn.Linear(inner, config.dim, bias=False)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        context = x if context is None else context
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(context)), self._split_heads(self.v(context))
        if self.fused:
            window = (-1, 0) if causal else None
            out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, window_size=window)
        else:
            if causal:  # torch's SDPA takes a mask or is_causal, not both
                mask = mask + torch.full(mask.shape[-2:], float("-inf"), device=x.device).triu(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o(out.transpose(1, 2).flatten(2))


class GatedMLP(nn.Module):
    """wo(gelu_tanh(gate) * up), T5 v1.1's MLP; one projection wi computes gate and up."""

    def __init__(self, config: T5Config, fused: bool):
        super().__init__()
        self.fused = fused
        self.wi = nn.Linear(config.dim, 2 * config.ff_dim, bias=False)
        self.wo = nn.Linear(config.ff_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.wi(x).chunk(2, dim=-1)
        if self.fused:
            return self.wo(ops.geglu(gate, up, approximate="tanh"))
        return self.wo(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    """Pre-norm sublayers: self-attention, cross-attention over the encoder's output (decoder
    blocks), the MLP. As GPT's blocks, it takes the residual stream and the previous block's
    output unadded and returns its MLP's output and the stream unadded: the next norm adds."""

    def __init__(self, config: T5Config, fused: bool, cross_attention: bool):
        super().__init__()
        norm = genfast_nn.RMSNorm if fused else nn.RMSNorm
        self.fused = fused
        self.norm1 = norm(config.dim, eps=config.eps)
        self.self_attention = Attention(config, fused)
        self.cross_norm = norm(config.dim, eps=config.eps) if cross_attention else None
        self.cross_attention = Attention(config, fused) if cross_attention else None
        self.norm2 = norm(config.dim, eps=config.eps)
        self.mlp = GatedMLP(config, fused)

    def forward(self, hidden: Tensor, residual: Tensor | None, bias: Tensor, causal: bool,
                context: Tensor | None = None, context_keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        normed, residual = add_norm(self.norm1, hidden, residual, self.fused)
        hidden = self.self_attention(normed, mask=bias, causal=causal)
        if self.cross_attention is not None:
            normed, residual = add_norm(self.cross_norm, hidden, residual, self.fused)
            hidden = self.cross_attention(normed, context, context_keep)
        normed, residual = add_norm(self.norm2, hidden, residual, self.fused)
        return self.mlp(normed), residual


class Stack(nn.Module):
    """The encoder's or the decoder's blocks, their relative position bias and final norm."""

    def __init__(self, config: T5Config, fused: bool, decoder: bool):
        super().__init__()
        self.config, self.fused, self.decoder = config, fused, decoder
        self.relative_bias = nn.Embedding(config.relative_buckets, config.heads)
        layers = config.decoder_layers if decoder else config.encoder_layers
        self.blocks = nn.ModuleList(Block(config, fused, cross_attention=decoder) for _ in range(layers))
        self.norm = (genfast_nn.RMSNorm if fused else nn.RMSNorm)(config.dim, eps=config.eps)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """(1, heads, length, length): the learned bias of each query-key distance."""
        positions = torch.arange(length, device=device)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None], not self.decoder, self.config.relative_buckets,
            self.config.max_distance,
        )
        return self.relative_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: Tensor, keep: Tensor | None = None, context: Tensor | None = None,
                context_keep: Tensor | None = None) -> Tensor:
        """keep (B, S) bool marks x's real tokens (the encoder's padding mask); context_keep
        marks context's for cross-attention."""
        bias = self.position_bias(x.shape[1], x.device)
        if keep is not None:
            bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
        if context_keep is not None:
            context_keep = context_keep[:, None, None, :]
        hidden, residual = x, None
        for block in self.blocks:
            hidden, residual = block(hidden, residual, bias, self.decoder, context, context_keep)
        return add_norm(self.norm, hidden, residual, self.fused)[0]


class T5(nn.Module):
    """Encoder tokens (B, S) with an optional attention_mask (B, S; 1 or True for real tokens,
    0 for padding) and decoder tokens (B, T) -> logits (B, T, vocab_size). The encoder and
    decoder share the token embedding. fused: genfast layers."""

    def __init__(self, config: T5Config = T5Config(), fused: bool = False):
        super().__init__()
        self.config, self.fused = config, fused
        self.shared = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = Stack(config, fused, decoder=False)
        self.decoder = Stack(config, fused, decoder=True)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        for name, parameter in self.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)

    def decoder_hidden_states(self, tokens: Tensor, decoder_tokens: Tensor,
                              attention_mask: Tensor | None = None) -> Tensor:
        """The decoder's normalised hidden states (B, T, dim), which lm_head maps to logits."""
        keep = None if attention_mask is None else attention_mask.bool()
        encoded = self.encoder(self.shared(tokens), keep)
        return self.decoder(self.shared(decoder_tokens), context=encoded, context_keep=keep)

    def forward(self, tokens: Tensor, decoder_tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm_head(self.decoder_hidden_states(tokens, decoder_tokens, attention_mask))

    def loss(self, tokens: Tensor, decoder_tokens: Tensor, targets: Tensor, attention_mask: Tensor | None = None,
             ignore_index: int = -100) -> Tensor:
        """The mean cross-entropy of targets (B, T), the tokens the decoder should emit; the
        genfast build computes it by genfast.ops.linear_cross_entropy, without the logits."""
        hidden = self.decoder_hidden_states(tokens, decoder_tokens, attention_mask)
        return lm_loss(hidden, self.lm_head, targets, ignore_index, self.fused)
