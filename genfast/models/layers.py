"""What the language models share: the pre-norm residual step, the loss and the draw of the
next token, each in its torch.nn and its genfast build."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference


def add_norm(norm: nn.Module, hidden: Tensor, residual: Tensor | None, fused: bool) -> tuple[Tensor, Tensor]:
    """(norm(hidden + residual), hidden + residual) for a pre-norm residual stream; residual
    None starts the stream. The fused build's norms (genfast.nn.LayerNorm, RMSNorm) add in
    the same pass."""
    if residual is None:
        return norm(hidden), hidden
    if fused:
        return norm(hidden, residual)
    residual = hidden + residual
    return norm(residual), residual


def lm_loss(hidden: Tensor, head: nn.Linear, targets: Tensor, ignore_index: int, fused: bool) -> Tensor:
    """The mean cross-entropy of head(hidden) (..., vocab) against targets (...): in the fused
    build genfast.ops.linear_cross_entropy, which never holds the logits."""
    if fused:
        return ops.linear_cross_entropy(hidden, head.weight, targets, head.bias, ignore_index=ignore_index)
    return F.cross_entropy(head(hidden).flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def sample_next(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
                fused: bool) -> Tensor:
    """A token per row of logits (B, vocab) with temperature, top-k and top-p: in the fused
    build genfast.ops.sample_tokens, in the torch one the reference, both from the same
    uniform numbers, so that the two builds draw the same tokens."""
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    if fused:
        return ops.sample_tokens(logits, temperature, top_k, top_p, uniform=uniform)
    return reference.sampling.sample(logits, temperature, top_k, top_p, uniform)
