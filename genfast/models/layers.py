"""What the transformer models share."""

from __future__ import annotations

from torch import Tensor, nn


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
