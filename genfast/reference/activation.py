"""Activations that genfast kernels fuse, by the name their ops take."""

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    None: lambda z: z,
    "silu": F.silu,
}


def activate(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    return ACTIVATIONS[activation](z)
