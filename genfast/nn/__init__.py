"""Drop-in replacements for torch.nn modules, with the same constructor and state_dict."""

from .diffusion import Timesteps
from .norm import GroupNorm

__all__ = ["GroupNorm", "Timesteps"]
