"""Drop-in replacements for torch.nn modules, with the same constructor and state_dict."""

from .activation import GELU, SiLU
from .attention import MultiheadAttention
from .diffusion import Timesteps
from .norm import GroupNorm, LayerNorm, RMSNorm

__all__ = ["GELU", "GroupNorm", "LayerNorm", "MultiheadAttention", "RMSNorm", "SiLU", "Timesteps"]
