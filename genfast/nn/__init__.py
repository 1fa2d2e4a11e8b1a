"""Drop-in replacements for torch.nn modules, with the same constructor and state_dict."""

from .activation import GELU, SiLU
from .attention import MultiheadAttention
from .bias_act import Linear
from .conv import Conv2d
from .diffusion import Timesteps
from .norm import GroupNorm, LayerNorm, RMSNorm
from .rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = [
    "Conv2d", "GELU", "GRU", "GRUCell", "GroupNorm", "LSTM", "LSTMCell", "LayerNorm", "Linear", "MultiheadAttention", "RMSNorm", "SiLU",
    "Timesteps",
]
