"""The losses of VAEs and GANs as Triton kernels: each element's term, summed per block in the
same pass, and its gradient; and the VAE's reparameterised sample. Terms:
genfast/reference/losses.py. Every tensor is contiguous and of one shape.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _softplus(z):
    """log(1 + e^z) without overflow."""
    return tl.maximum(z, 0.0) + tl.log(1 + tl.exp(-tl.abs(z)))


@triton.jit
def _positive_part(z):
    return tl.where(z < 0, 0.0, z)  # NaN passes


@triton.jit
def _term(x, t, sign, KIND: tl.constexpr):
    if KIND == "mse":
        term = (x - t) * (x - t)
    elif KIND == "bce_with_logits":
        term = _positive_part(x) + tl.log(1 + tl.exp(-tl.abs(x))) - x * t
    elif KIND == "gaussian_kl":
        term = -0.5 * (1 + t - x * x - tl.exp(t))
    elif KIND == "softplus":
        term = _positive_part(sign * x) + tl.log(1 + tl.exp(-tl.abs(sign * x)))
    else:  # hinge
        term = _positive_part(1 + sign * x)
    return term


@triton.jit
def _gradients(x, t, sign, KIND: tl.constexpr):
    """The term's partial derivatives for x and t."""
    if KIND == "mse":
        dx = 2 * (x - t)
        dt = -dx
    elif KIND == "bce_with_logits":
        dx = tl.sigmoid(x) - t
        dt = -x
    elif KIND == "gaussian_kl":
        dx = x
        dt = 0.5 * (tl.exp(t) - 1)
    elif KIND == "softplus":
        dx = sign * tl.sigmoid(sign * x)
        dt = tl.zeros_like(x)
    else:  # hinge: 0 at the kink and the sign where x is NaN, as torch's relu (threshold_backward)
        dx = tl.where(1 + sign * x <= 0, 0.0, sign)
        dt = tl.zeros_like(x)
    return dx, dt


@triton.jit
def _loss_forward_kernel(
    x_ptr, t_ptr, out_ptr, n, sign,
    KIND: tl.constexpr, HAS_TARGET: tl.constexpr, REDUCE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reads one BLOCK of x (and t); writes each element's term, or (REDUCE) the block's sum to
    out[block]."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    t = tl.load(t_ptr + offsets, mask=mask).to(COMPUTE) if HAS_TARGET else tl.zeros_like(x)
    term = _term(x, t, sign, KIND)
    if REDUCE:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, term, 0.0), axis=0))
    else:
        tl.store(out_ptr + offsets, term.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loss_backward_kernel(
    grad_ptr, x_ptr, t_ptr, dx_ptr, dt_ptr, n, sign,
    KIND: tl.constexpr, HAS_TARGET: tl.constexpr, REDUCE: tl.constexpr, TARGET_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reads one BLOCK of x (and t) and of grad (its one element, the scale folded in, where
    REDUCE); writes dx = grad d term / dx, and dt likewise where TARGET_GRAD."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    t = tl.load(t_ptr + offsets, mask=mask).to(COMPUTE) if HAS_TARGET else tl.zeros_like(x)
    if REDUCE:
        g = tl.load(grad_ptr).to(COMPUTE)
    else:
        g = tl.load(grad_ptr + offsets, mask=mask).to(COMPUTE)
    dx, dt = _gradients(x, t, sign, KIND)
    tl.store(dx_ptr + offsets, (g * dx).to(dx_ptr.dtype.element_ty), mask=mask)
    if TARGET_GRAD:
        tl.store(dt_ptr + offsets, (g * dt).to(dt_ptr.dtype.element_ty), mask=mask)


def _compute(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def loss_forward(x, t, kind: str, sign: float, reduce: bool, scale: float):
    """Each element's term (x's shape), or scale times their sum (0-dim), in x's dtype."""
    n = x.numel()
    blocks = triton.cdiv(n, _BLOCK)
    sum_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(blocks, dtype=sum_dtype, device=x.device) if reduce else torch.empty_like(x)
    _loss_forward_kernel[(blocks,)](
        x, t, out, n, sign, KIND=kind, HAS_TARGET=t is not None, REDUCE=reduce, COMPUTE=_compute(x), BLOCK=_BLOCK
    )
    return (out.sum() * scale).to(x.dtype) if reduce else out


def loss_backward(grad, x, t, kind: str, sign: float, reduce: bool, scale: float, with_target_grad: bool):
    """(dx, dt or None)."""
    dx = torch.empty_like(x)
    dt = torch.empty_like(x) if with_target_grad else None
    if reduce:  # by torch, on the device: a float32 argument would round the scale of a float64 loss
        grad = grad * scale
    _loss_backward_kernel[(triton.cdiv(x.numel(), _BLOCK),)](
        grad, x, t, dx, dt, x.numel(), sign, KIND=kind, HAS_TARGET=t is not None, REDUCE=reduce,
        TARGET_GRAD=with_target_grad, COMPUTE=_compute(x), BLOCK=_BLOCK,
    )
    return dx, dt


@triton.jit
def _reparameterize_kernel(
    a_ptr, logvar_ptr, noise_ptr, out_ptr, n, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    """Forward: reads mu (a), logvar, noise; writes z = mu + e^(logvar / 2) noise. BACKWARD:
    reads dz (a), logvar, noise; writes dlogvar = dz e^(logvar / 2) noise / 2."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(a_ptr + offsets, mask=mask).to(COMPUTE)
    std_noise = tl.exp(0.5 * tl.load(logvar_ptr + offsets, mask=mask).to(COMPUTE)) * tl.load(
        noise_ptr + offsets, mask=mask
    ).to(COMPUTE)
    out = 0.5 * a * std_noise if BACKWARD else a + std_noise
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _reparameterize(a, logvar, noise, backward: bool):
    out = torch.empty_like(a)
    _reparameterize_kernel[(triton.cdiv(a.numel(), _BLOCK),)](
        a, logvar, noise, out, a.numel(), BACKWARD=backward, COMPUTE=_compute(a), BLOCK=_BLOCK
    )
    return out


def reparameterize_forward(mu, logvar, noise):
    return _reparameterize(mu, logvar, noise, False)


def reparameterize_backward(dz, logvar, noise):
    return _reparameterize(dz, logvar, noise, True)
