"""Activations, by the name genfast's ops take, and the gated (GLU) form.

None is the identity; "gelu" is the exact z * Phi(z) and "gelu_tanh" its tanh
approximation, as torch.nn.functional.gelu(approximate="none" | "tanh").
"""

import math

import torch
import torch.nn.functional as F


def gelu(z: torch.Tensor) -> torch.Tensor:
    """z Phi(z) as its definition reads: torch's own float32 kernel with AVX-512 returns NaN at
    +inf, where this (and torch's float64) returns inf."""
    return z * 0.5 * (1 + torch.erf(z / math.sqrt(2)))


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
