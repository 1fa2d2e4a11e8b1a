"""Bias + activation (+ gain, + clamp), StyleGAN2's bias_act, as Triton kernels. Formulas:
genfast/reference/bias_act.py.

x is dense in any order of its dimensions, so its memory reads as (outer, channels, inner) with
``inner`` the stride of the bias's dimension: element k's channel is (k // inner) % channels.
The kernels walk that memory flat and write outputs laid out like x.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from .activation import normal_cdf

_BLOCK = 1024


@triton.jit
def _derivative(z, ORDER: tl.constexpr, ACTIVATION: tl.constexpr, alpha):
    """act(z) for ORDER 0, act'(z) for 1, act''(z) for 2."""
    if ACTIVATION == "relu":
        if ORDER == 0:
            d = tl.where(z < 0, 0.0, z)
        elif ORDER == 1:
            d = tl.where(z <= 0, 0.0, 1.0)  # 0 at z = 0, as torch's
        else:
            d = tl.zeros_like(z)
    elif ACTIVATION == "leaky_relu":
        if ORDER == 0:
            d = tl.where(z < 0, alpha * z, z)
        elif ORDER == 1:
            d = tl.where(z > 0, 1.0, alpha)
        else:
            d = tl.zeros_like(z)
    elif ACTIVATION == "gelu":
        if ORDER == 0:
            d = z * normal_cdf(z)
        elif ORDER == 1:  # Phi(z) + z phi(z)
            d = normal_cdf(z) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        else:  # phi(z) (2 - z^2)
            d = 0.3989422804014327 * tl.exp(-0.5 * z * z) * (2 - z * z)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(z)
        if ORDER == 0:
            d = z * s
        elif ORDER == 1:
            d = s * (1 + z * (1 - s))
        else:
            d = s * (1 - s) * (2 + z * (1 - 2 * s))
    elif ACTIVATION == "tanh":
        t = 2 * tl.sigmoid(2 * z) - 1
        if ORDER == 0:
            d = t
        elif ORDER == 1:
            d = 1 - t * t
        else:
            d = -2 * t * (1 - t * t)
    elif ACTIVATION == "sigmoid":
        s = tl.sigmoid(z)
        if ORDER == 0:
            d = s
        elif ORDER == 1:
            d = s * (1 - s)
        else:
            d = s * (1 - s) * (1 - 2 * s)
    else:  # linear
        if ORDER == 0:
            d = z
        elif ORDER == 1:
            d = tl.zeros_like(z) + 1
        else:
            d = tl.zeros_like(z)
    return d


@triton.jit
def _bias_act_kernel(
    x_ptr, bias_ptr, dy_ptr, out_ptr, n, channels, inner,
    alpha_high, alpha_low, gain_high, gain_low, clamp_high, clamp_low,
    ORDER: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One BLOCK of x's memory, z = x + bias[(k // inner) % channels]:
    ORDER 0: out = clamp(gain act(z)); ORDER 1 or 2: out = dy gain act^(ORDER)(z), zero where the
    clamp held gain act(z). Reads x, bias and (ORDER > 0) dy, laid out like x; writes out likewise.
    Each float argument comes as two float32 (Triton's type for them) summing to it.
    """
    alpha = tl.cast(alpha_high, COMPUTE) + tl.cast(alpha_low, COMPUTE)
    gain = tl.cast(gain_high, COMPUTE) + tl.cast(gain_low, COMPUTE)
    clamp = tl.cast(clamp_high, COMPUTE) + tl.cast(clamp_low, COMPUTE)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        z += tl.load(bias_ptr + (offsets // inner) % channels, mask=mask).to(COMPUTE)
    if ORDER == 0:
        out = _derivative(z, 0, ACTIVATION, alpha) * gain
        if CLAMP:
            out = tl.where(out < -clamp, -clamp, tl.where(out > clamp, clamp, out))
    else:
        out = tl.load(dy_ptr + offsets, mask=mask).to(COMPUTE) * gain * _derivative(z, ORDER, ACTIVATION, alpha)
        if CLAMP:
            y = _derivative(z, 0, ACTIVATION, alpha) * gain
            out = tl.where((y >= -clamp) & (y <= clamp), out, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _float32_pair(value: float) -> tuple[float, float]:
    """(high, low), float32 values whose sum is value to about 48 bits: a float64 kernel's."""
    high = float(np.float32(value))
    return high, float(np.float32(value - high))


def _launch(x, bias, dy, order, activation, alpha, gain, clamp, inner):
    out = torch.empty_like(x)
    n = x.numel()
    block = min(triton.next_power_of_2(n), _BLOCK)
    _bias_act_kernel[(triton.cdiv(n, block),)](
        x, bias, dy, out, n, 1 if bias is None else bias.numel(), inner,
        *_float32_pair(alpha), *_float32_pair(gain), *_float32_pair(0.0 if clamp is None else clamp),
        ORDER=order, ACTIVATION=activation, HAS_BIAS=bias is not None, CLAMP=clamp is not None,
        COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK=block,
    )
    return out


def bias_act_forward(x, bias, activation: str, alpha: float, gain: float, clamp, inner: int):
    """clamp(gain act(x + bias)), laid out like the dense x."""
    return _launch(x, bias, None, 0, activation, alpha, gain, clamp, inner)


def bias_act_backward(dy, x, bias, activation: str, alpha: float, gain: float, clamp, inner: int, order: int):
    """(g, dbias or None): g = dy gain act^(order)(x + bias) where not clamped, laid out like x
    (dy is too), and its sum per channel, by torch over the (outer, channels, inner) view."""
    g = _launch(x, bias, dy, order, activation, alpha, gain, clamp, inner)
    if bias is None:
        return g, None
    memory = g.as_strided((g.numel() // (bias.numel() * inner), bias.numel(), inner), (bias.numel() * inner, inner, 1))
    dbias = memory.sum((0, 2), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return g, dbias.to(bias.dtype)
