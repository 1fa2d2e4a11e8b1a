"""Bias + activation (+ gain, + clamp), StyleGAN2's bias_act: the layer epilogue of GANs and VAEs.

    y = clamp(gain * act(x + bias), -clamp, clamp)

with the bias broadcast along dimension ``dim`` of x. Each activation is a row
of ACTIVATIONS: its formula, its default slope alpha (leaky_relu only) and its
default gain. The gains are StyleGAN2's: sqrt(2) after relu and leaky_relu
keeps the activations' second moment through a layer of He-initialised weights.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .activation import gelu


@dataclass(frozen=True)
class Activation:
    function: Callable[[torch.Tensor, float], torch.Tensor]  # act(z, alpha)
    gain: float = 1.0
    alpha: float | None = None  # the default slope; None where the activation takes none
    # Whether act'' is zero wherever it exists: such activations' second-order term is zero.
    piecewise_linear: bool = False


ACTIVATIONS = {
    "linear": Activation(lambda z, alpha: z, piecewise_linear=True),
    "relu": Activation(lambda z, alpha: F.relu(z), gain=math.sqrt(2), piecewise_linear=True),
    "leaky_relu": Activation(F.leaky_relu, gain=math.sqrt(2), alpha=0.2, piecewise_linear=True),
    "gelu": Activation(lambda z, alpha: gelu(z)),
    "silu": Activation(lambda z, alpha: F.silu(z)),
    "tanh": Activation(lambda z, alpha: torch.tanh(z)),
    "sigmoid": Activation(lambda z, alpha: torch.sigmoid(z)),
}


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    dim: int = 1,
    activation: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """clamp(gain * act(x + bias)); alpha and gain default to the activation's row of ACTIVATIONS.

    fp16/bf16 are computed in fp32 and rounded once.
    """
    spec = ACTIVATIONS[activation]
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    z = x.to(compute)
    if bias is not None:
        z = z + bias.to(compute).reshape([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
    y = spec.function(z, spec.alpha if alpha is None else alpha)
    y = y * (spec.gain if gain is None else gain)
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    return y.to(x.dtype)
