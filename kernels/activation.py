"""Activations fused into Triton kernels' epilogues, and their derivatives."""

import triton
import triton.language as tl


@triton.jit
def silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def silu_backward(z, dy):
    """dy * d silu / dz at z."""
    s = tl.sigmoid(z)
    return dy * s * (1 + z * (1 - s))
