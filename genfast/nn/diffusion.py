"""Diffusion modules."""

import torch
from torch import nn

from .. import ops


class Timesteps(nn.Module):
    """diffusers.models.embeddings.Timesteps: the sinusoidal embedding of a batch
    of timesteps, (N,) -> (N, num_channels) float32, in one kernel."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: int = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return ops.timestep_embedding(
            timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )
