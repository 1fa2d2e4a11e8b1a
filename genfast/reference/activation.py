"""Activations, by the name genfast's ops take, and the gated (GLU) form.

None is the identity; "gelu" is the exact z * Phi(z) and "gelu_tanh" its tanh
approximation, as torch.nn.functional.gelu(approximate="none" | "tanh").
"""

import math

import torch
import torch.nn.functional as F


def gelu(z: torch.Tensor) -> torch.Tensor:
    """z Phi(z), with Phi(z) = erfc(-z / sqrt 2) / 2: 1 + erf(z / sqrt 2) would cancel the lower
    tail's digits (all of them past z = -8.3 in float64, and torch's own gelu does). torch's float32
    kernel with AVX-512 also returns NaN at +inf, where this returns inf."""
    return z * 0.5 * torch.special.erfc(-z / math.sqrt(2))


ACTIVATIONS = {
    None: lambda z: z,
    "silu": F.silu,
    "gelu": gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


def activate(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    return ACTIVATIONS[activation](z)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str | None) -> torch.Tensor:
    """act(gate) * up: SwiGLU with "silu", GeGLU with "gelu" or "gelu_tanh".

    fp16/bf16 are computed in fp32 and rounded once.
    """
    compute = torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype
    return (activate(gate.to(compute), activation) * up.to(compute)).to(gate.dtype)
