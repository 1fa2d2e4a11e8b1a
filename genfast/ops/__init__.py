"""genfast ops: each a torch.library custom op behind a checked Python function."""

from ..reference.diffusion import StepCoefficients
from .activation import geglu, gelu, silu, swiglu
from .bias_act import bias_act
from .attention import attention_with_kv_cache, scaled_dot_product_attention
from .conv import conv2d
from .cross_entropy import linear_cross_entropy
from .diffusion import add_noise, denoise_step, denoising_loss, timestep_embedding
from .losses import (
    binary_cross_entropy_with_logits, discriminator_loss, gaussian_kl_divergence, generator_loss, mse_loss,
    reparameterize,
)
from .minibatch_stddev import minibatch_stddev
from .norm import group_norm, layer_norm, rms_norm
from .rnn import CellNorms, gru_cell, gru_layer, lstm_cell, lstm_layer
from .rotary import apply_rotary_pos_emb
from .sampling import sample_tokens

__all__ = [
    "StepCoefficients", "add_noise", "apply_rotary_pos_emb", "attention_with_kv_cache", "bias_act", "binary_cross_entropy_with_logits", "discriminator_loss",
    "gaussian_kl_divergence", "generator_loss", "minibatch_stddev", "mse_loss", "reparameterize", "conv2d", "denoise_step", "denoising_loss", "geglu", "gelu", "group_norm", "layer_norm",
    "linear_cross_entropy", "lstm_cell", "lstm_layer", "gru_cell", "gru_layer", "CellNorms",
    "rms_norm", "sample_tokens", "scaled_dot_product_attention", "silu", "swiglu", "timestep_embedding",
]
