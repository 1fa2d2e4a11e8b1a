"""genfast ops: each a torch.library custom op behind a checked Python function."""

from ..reference.diffusion import StepCoefficients
from .diffusion import denoise_step, timestep_embedding
from .norm import group_norm

__all__ = ["StepCoefficients", "denoise_step", "group_norm", "timestep_embedding"]
