"""Activations as Triton functions (fused into other kernels' epilogues) and
the activation op's kernels: y = act(x), or act(x) * up for the gated (GLU)
forms, and their backward. Formulas: genfast/reference/activation.py.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # elements of a row per program at most


@triton.jit
def silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def silu_backward(z, dy):
    """dy * d silu / dz at z."""
    s = tl.sigmoid(z)
    return dy * s * (1 + z * (1 - s))


@triton.jit
def normal_cdf(z):
    """Phi(z), the standard normal's CDF, keeping the lower tail's digits where 1 + erf(z / sqrt 2)
    cancels them (2e-5 relative at z = -2.8 in float32; all of them past z = -8.3 in float64).
    float32: erfc(-z / sqrt 2) / 2 by the fit of the C++ kernels (csrc/cpu/vec_math.h's
    normal_cdf_fast, relative error under 2.3e-6). float64: 1 - erf(a) for a = |z| / sqrt 2 below
    3.3 (its cancellation costs under 1.2e-11 relative there), erfc's continued fraction beyond
    (60 terms: within 2 ulp from 3.3 on); libdevice's erfc would do, but Triton's interpreter
    lacks it."""
    a = tl.abs(z) * 0.7071067811865476
    if z.dtype == tl.float64:
        fraction = a
        for k in tl.static_range(60, 0, -1):
            fraction = a + (k * 0.5) / fraction
        tail = tl.where(a < 3.3, 0.5 * (1 - tl.math.erf(a)), 0.5 * tl.exp(-a * a) / (1.7724538509055159 * fraction))
    else:
        t = 1 / (1 + 0.4 * a)
        p = -1.48850645 + t * (0.99525611 + t * (0.46754241 + t * (-0.04920331 + t * (
            0.56860390 + t * (-0.72626443 + t * 0.23257405)))))
        tail = 0.5 * t * tl.exp(p - a * a)
    return tl.where(z < 0, tail, 1 - tail)  # tail = Phi(-|z|)


@triton.jit
def _gelu_tanh_inner(z):
    return 0.7978845608028654 * (z + 0.044715 * z * z * z)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    """act(z) for the activation named ACTIVATION ("" is the identity)."""
    if ACTIVATION == "silu":
        y = silu(z)
    elif ACTIVATION == "gelu":
        y = z * normal_cdf(z)
    elif ACTIVATION == "gelu_tanh":
        y = z * tl.sigmoid(2 * _gelu_tanh_inner(z))  # z (1 + tanh u) / 2
    else:
        y = z
    return y


@triton.jit
def activate_backward(z, dy, ACTIVATION: tl.constexpr):
    """dy * act'(z)."""
    if ACTIVATION == "silu":
        dz = silu_backward(z, dy)
    elif ACTIVATION == "gelu":  # Phi(z) + z phi(z)
        dz = dy * (normal_cdf(z) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACTIVATION == "gelu_tanh":  # (1 + tanh u) / 2 + z (1 - tanh^2 u) u' / 2
        s = tl.sigmoid(2 * _gelu_tanh_inner(z))
        du = 0.7978845608028654 * (1 + 3 * 0.044715 * z * z)
        dz = dy * (s + 2 * z * s * (1 - s) * du)
    else:
        dz = dy
    return dz


@triton.jit
def _activation_forward_kernel(
    x_ptr, up_ptr, y_ptr, width, x_row_stride, up_row_stride,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = act(x) (* up) over one BLOCK of one row, computed in COMPUTE.

    Reads x (and up) through their row strides, writes the contiguous y.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    y = activate(tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(COMPUTE), ACTIVATION)
    if GATED:
        y *= tl.load(up_ptr + row * up_row_stride + cols, mask=mask).to(COMPUTE)
    tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_backward_kernel(
    dy_ptr, x_ptr, up_ptr, dx_ptr, dup_ptr, width, x_row_stride, up_row_stride,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """dx = act'(x) * dy (* up) and, gated, dup = act(x) * dy, over one BLOCK of one row.

    Reads dy (contiguous), x and up (row strides); writes the contiguous dx and dup.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    z = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(COMPUTE)
    dy = tl.load(dy_ptr + row * width + cols, mask=mask).to(COMPUTE)
    if GATED:
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask).to(COMPUTE)
        tl.store(dup_ptr + row * width + cols, (activate(z, ACTIVATION) * dy).to(dup_ptr.dtype.element_ty), mask=mask)
        dy *= up
    tl.store(dx_ptr + row * width + cols, activate_backward(z, dy, ACTIVATION).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor) -> dict:
    """The grid and the compile-time arguments shared by both kernels, for a (rows, width) x."""
    rows, width = x.shape
    block = min(triton.next_power_of_2(width), _BLOCK)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    return {"grid": (rows, triton.cdiv(width, block)), "COMPUTE": compute, "BLOCK": block}


def activation_forward(x, up, activation: str):
    """act(x) or act(x) * up, contiguous; x and up are (rows, width) with a contiguous last dimension."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch = _launch(x)
    _activation_forward_kernel[launch.pop("grid")](
        x, up, y, x.shape[1], x.stride(0), 0 if up is None else up.stride(0),
        ACTIVATION=activation, GATED=up is not None, **launch,
    )
    return y


def activation_backward(dy, x, up, activation: str):
    """(dx, dup or None); dy is contiguous (rows, width)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dup = None if up is None else torch.empty_like(dx)
    launch = _launch(x)
    _activation_backward_kernel[launch.pop("grid")](
        dy, x, up, dx, dup, x.shape[1], x.stride(0), 0 if up is None else up.stride(0),
        ACTIVATION=activation, GATED=up is not None, **launch,
    )
    return dx, dup
