"""Drop-in replacements for torch.nn modules, with the same constructor and state_dict."""

from .activation import GELU, SiLU
from .attention import MultiheadAttention
from .conv import Conv2d
from .diffusion import Timesteps
from .norm import GroupNorm, LayerNorm, RMSNorm
from .rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = [
    "Conv2d", "GELU", "GRU", "GRUCell", "GroupNorm", "LSTM", "LSTMCell", "LayerNorm", "MultiheadAttention", "RMSNorm", "SiLU",
    "Timesteps",
]
