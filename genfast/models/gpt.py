"""A GPT-2 style decoder language model, built from torch.nn layers or from
genfast's from the same weights.

Both builds share one module tree and state_dict. The genfast one adds each
residual inside the LayerNorm that follows it (one pass for the add and the
norm), runs causal attention in genfast's flash kernel and the MLP's tanh GELU
in one pass, and computes the loss without the logits in memory. The matrix
products are torch's in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as genfast_nn
from .. import ops
from .layers import add_norm, lm_loss, sample_next


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    max_positions: int = 1024
    dim: int = 768
    heads: int = 12
    layers: int = 12


@dataclass
class KVCache:
    """Each layer's keys and values, (B, heads, capacity, head_dim), and how many positions
    they hold; GPT.forward appends to it."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0
    lengths: Tensor = field(init=False)  # length per sequence, as attention_with_kv_cache takes it

    def __post_init__(self):
        self.lengths = torch.full((self.keys[0].shape[0],), self.length, dtype=torch.int64,
                                  device=self.keys[0].device)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, fused: bool):
        super().__init__()
        self.heads, self.fused = config.heads, fused
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        batch, length, dim = x.shape
        # (batch, heads, length, head_dim) views of the projection: the kernels read them in place.
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).transpose(1, 3).unbind(2)
        attention = ops.scaled_dot_product_attention if self.fused else F.scaled_dot_product_attention
        if cache is None or cache.length == 0:
            out = attention(q, k, v, is_causal=True)
            if cache is not None:  # the prompt: its keys and values start the cache
                cache.keys[layer][:, :, :length] = k
                cache.values[layer][:, :, :length] = v
        else:  # one new token per sequence, after cache.length cached ones
            keys, values = cache.keys[layer], cache.values[layer]
            if self.fused:
                out = ops.attention_with_kv_cache(q, keys, values, k, v, cache.lengths)
            else:
                end = cache.length + length
                keys[:, :, cache.length:end], values[:, :, cache.length:end] = k, v
                out = attention(q, keys[:, :, :end], values[:, :, :end])
        return self.out(out.transpose(1, 2).reshape(batch, length, dim))


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

    def forward(
        self, hidden: Tensor, residual: Tensor | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[Tensor, Tensor]:
        normed, residual = add_norm(self.norm1, hidden, residual, self.fused)
        normed, residual = add_norm(self.norm2, self.attention(normed, cache, layer), residual, self.fused)
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
        self.lm_head = (genfast_nn.Linear if fused else nn.Linear)(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        for name, parameter in self.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """With a cache, tokens follow the cache.length positions it holds (all of a prompt into
        an empty cache, then one at a time) and their keys and values are appended to it."""
        return self.lm_head(self.final_hidden_states(tokens, cache))

    def loss(self, tokens: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """The mean cross-entropy of the next tokens targets (B, S) given tokens (B, S). The
        genfast build computes it from the last hidden states by
        genfast.ops.linear_cross_entropy, never holding the (B, S, vocab_size) logits."""
        return lm_loss(self.final_hidden_states(tokens), self.lm_head, targets, ignore_index, self.fused)

    def final_hidden_states(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """The normalised hidden states (B, S, dim) that lm_head maps to logits."""
        start = 0 if cache is None else cache.length
        length = tokens.shape[1]
        if cache is not None and start > 0 and length != 1:
            raise ValueError(f"after the prompt, tokens must be one per sequence, got shape {tuple(tokens.shape)}")
        if start + length > self.config.max_positions:
            raise ValueError(f"tokens must end by position {self.config.max_positions}, got {start + length}")
        positions = torch.arange(start, start + length, device=tokens.device)
        hidden, residual = self.token_embedding(tokens) + self.position_embedding(positions), None
        for layer, block in enumerate(self.blocks):
            hidden, residual = block(hidden, residual, cache, layer)
        if cache is not None:
            cache.length += length
            cache.lengths += length
        return add_norm(self.norm, hidden, residual, self.fused)[0]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty KVCache for batch sequences of up to capacity positions, in the model's
        dtype and device."""
        weight = self.lm_head.weight
        shape = (batch, self.config.heads, capacity, self.config.dim // self.config.heads)
        keys = [weight.new_empty(shape) for _ in self.blocks]
        return KVCache(keys, [weight.new_empty(shape) for _ in self.blocks])

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The prompts tokens (B, S) followed by max_new_tokens drawn one at a time, each from
        the last logits with temperature, top-k and top-p (genfast.ops.sample_tokens; the torch
        build draws by the reference, from the same uniform numbers). Keys and values are
        cached, so each step runs the model on one token per sequence."""
        cache = self.new_cache(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        logits = self(tokens, cache)[:, -1]
        drawn = []
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator, self.fused)
            drawn.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], cache)[:, -1]
        return torch.cat([tokens, *(t[:, None] for t in drawn)], dim=1)
