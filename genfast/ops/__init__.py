"""genfast ops: each a torch.library custom op behind a checked Python function."""

from ..reference.diffusion import StepCoefficients
from .diffusion import add_noise, denoise_step, denoising_loss, timestep_embedding
from .norm import group_norm

__all__ = [
    "StepCoefficients", "add_noise", "denoise_step", "denoising_loss", "group_norm", "timestep_embedding",
]
