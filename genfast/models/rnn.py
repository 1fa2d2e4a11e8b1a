"""Recurrent seed architectures, built from torch.nn layers or from genfast's from the same
weights: an LSTM language model and a GRU encoder-decoder.

Both builds share one module tree and state_dict. The genfast one runs genfast.nn.LSTM and
GRU (the time loop in native code), computes the loss without the logits in memory, and
draws tokens with genfast.ops.sample_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .. import nn as genfast_nn
from .layers import lm_loss, sample_next


@dataclass(frozen=True)
class RNNConfig:
    vocab_size: int = 10000
    dim: int = 512  # embedding and hidden size
    layers: int = 2
    dropout: float = 0.0


class LSTMLM(nn.Module):
    """Token ids (B, S) and an optional (h, c) state -> next-token logits (B, S, vocab_size)
    and the state after the last token. fused: genfast layers."""

    def __init__(self, config: RNNConfig = RNNConfig(), fused: bool = False):
        super().__init__()
        self.config, self.fused = config, fused
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.lstm = (genfast_nn.LSTM if fused else nn.LSTM)(
            config.dim, config.dim, config.layers, batch_first=True, dropout=config.dropout
        )
        self.head = nn.Linear(config.dim, config.vocab_size)

    def hidden_states(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None):
        return self.lstm(self.embedding(tokens), state)

    def forward(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None):
        hidden, state = self.hidden_states(tokens, state)
        return self.head(hidden), state

    def loss(self, tokens: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """The mean cross-entropy of the next tokens targets (B, S) given tokens (B, S)."""
        return lm_loss(self.hidden_states(tokens)[0], self.head, targets, ignore_index, self.fused)

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """The prompts tokens (B, S) followed by max_new_tokens drawn one at a time with
        temperature, the LSTM state carried from step to step."""
        logits, state = self(tokens)
        drawn = []
        for _ in range(max_new_tokens):
            drawn.append(sample_next(logits[:, -1], temperature, 0, 1.0, generator, self.fused))
            logits, state = self(drawn[-1][:, None], state)
        return torch.cat([tokens, torch.stack(drawn, dim=1)], dim=1)


class GRUEncoderDecoder(nn.Module):
    """A sequence-to-sequence model: a GRU encodes the source tokens (B, S), padded, with their
    lengths; a GRU decoder started from its final state reads the target tokens (B, T) and
    gives next-token logits (B, T, vocab_size). Source and target share the vocabulary and
    the embedding. fused: genfast layers."""

    def __init__(self, config: RNNConfig = RNNConfig(), fused: bool = False):
        super().__init__()
        self.config, self.fused = config, fused
        gru = genfast_nn.GRU if fused else nn.GRU
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = gru(config.dim, config.dim, config.layers, batch_first=True, dropout=config.dropout)
        self.decoder = gru(config.dim, config.dim, config.layers, batch_first=True, dropout=config.dropout)
        self.head = nn.Linear(config.dim, config.vocab_size)

    def encode(self, source: Tensor, lengths: Tensor) -> Tensor:
        """The encoder's final state (layers, B, dim), each sequence read to its length (packed)."""
        packed = pack_padded_sequence(self.embedding(source), lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.encoder(packed)[1]

    def decoder_hidden_states(self, source: Tensor, lengths: Tensor, target: Tensor) -> Tensor:
        return self.decoder(self.embedding(target), self.encode(source, lengths))[0]

    def forward(self, source: Tensor, lengths: Tensor, target: Tensor) -> Tensor:
        return self.head(self.decoder_hidden_states(source, lengths, target))

    def loss(self, source: Tensor, lengths: Tensor, target: Tensor, next_target: Tensor,
             ignore_index: int = -100) -> Tensor:
        """The mean cross-entropy of next_target (B, T), what the decoder should emit after
        reading target (B, T)."""
        hidden = self.decoder_hidden_states(source, lengths, target)
        return lm_loss(hidden, self.head, next_target, ignore_index, self.fused)

    @torch.no_grad()
    def generate(self, source: Tensor, lengths: Tensor, start: Tensor, max_new_tokens: int,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """max_new_tokens (B, max_new_tokens) drawn with temperature after the start tokens (B,)."""
        state, token, drawn = self.encode(source, lengths), start, []
        for _ in range(max_new_tokens):
            hidden, state = self.decoder(self.embedding(token[:, None]), state)
            token = sample_next(self.head(hidden[:, -1]), temperature, 0, 1.0, generator, self.fused)
            drawn.append(token)
        return torch.stack(drawn, dim=1)
