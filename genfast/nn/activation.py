"""Activation modules: torch's, running genfast's kernels."""

import torch
from torch import nn

from .. import ops


class GELU(nn.GELU):
    """torch.nn.GELU (approximate "none" or "tanh")."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.gelu(input, self.approximate)


class SiLU(nn.SiLU):
    """torch.nn.SiLU (``inplace`` is accepted and ignored: the output is a new tensor)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.silu(input)
