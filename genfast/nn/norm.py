"""Normalisation modules."""

import torch
from torch import nn

from .. import ops


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm with an optional fused activation (None or "silu").

    Parameters and state_dict are torch's, so weights load either way.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        activation: str | None = None,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm, whose forward can also add a residual first.

    ``norm(x)`` is torch's; ``norm(x, residual)`` returns (norm(x + residual),
    x + residual) in one pass. Parameters and state_dict are torch's.
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual)


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm, whose forward can also add a residual first (as LayerNorm's)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, self.normalized_shape, self.weight, self.eps, residual)
