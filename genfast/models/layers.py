"""What the models share: the image models' layout, and the language models' pre-norm residual
step, loss and draw of the next token, each in its torch.nn and its genfast build."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference


def use_channels_last(model: nn.Module) -> nn.Module:
    """Lays out an image model's genfast build channels-last: its convolutions' weights, and so,
    by torch's rule, every image after its first convolution. Its kernels (the Winograd
    convolution and its gradients, GroupNorm+SiLU, bias_act) take either layout, but channels
    fill their vector lanes without a transpose in and out, and the convolutions left to oneDNN
    (strided, 1x1's backward) ran 1.1 to 2 times faster channels-last on a 2-core Xeon: a
    training step of the VAE took 243 ms against 324 channels-first."""
    return model.to(memory_format=torch.channels_last)


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
