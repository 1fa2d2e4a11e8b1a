"""The normalisation ops: GroupNorm with an optional fused activation
(genfast::group_norm), and LayerNorm and RMSNorm with an optional fused
residual add (genfast::layer_norm).

Each function checks its arguments and picks a backend. Under torch.compile or
torch.export it calls the custom op, which the graph holds as a single node
with a fake implementation; eager calls run the same kernels and backward
formula through an autograd.Function (_autograd.py).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ._autograd import eager_function
from ._checks import check_choice, check_int, check_tensor, dense, like_layout

ACTIVATIONS = (None, "silu")
_IMPLEMENTED = frozenset({"cpu", "cuda", "triton"})
_LAYER_NORM_IMPLEMENTED = frozenset({"cpu", "triton"})


def _forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: str | None, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (x's layout and dtype) and the (N, num_groups) mean and rstd.

    x must be dense (channels-first or channels-last); weight, bias and the
    statistics are in x's math dtype: float64 for float64 x, else float32.
    """
    return kernels(backend, "norm").group_norm_forward(x, weight, bias, num_groups, eps, activation == "silu")


def _backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx (x's layout) and the weight and bias gradients (their dtype)."""
    return kernels(backend, "norm").group_norm_backward(like_layout(dy, x), x, weight, bias, mean, rstd, num_groups, activation == "silu")


group_norm_op = torch.library.custom_op("genfast::group_norm", _forward, mutates_args=())
group_norm_backward_op = torch.library.custom_op("genfast::group_norm_backward", _backward, mutates_args=())


@group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, activation, backend):
    stats_shape = (x.shape[0], num_groups)
    return torch.empty_like(x), weight.new_empty(stats_shape), weight.new_empty(stats_shape)


@group_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, _eps, activation, backend = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.activation, ctx.backend = num_groups, activation, backend


def _differentiate(ctx, dy, _dmean, _drstd, backward):
    if dy is None:
        return (None,) * 7
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation, ctx.backend)
    return dx, dweight, dbias, None, None, None, None


group_norm_op.register_autograd(
    functools.partial(_differentiate, backward=group_norm_backward_op), setup_context=_setup_context
)
_GroupNormFunction = eager_function(
    "genfast.GroupNorm", _forward, _setup_context, functools.partial(_differentiate, backward=_backward),
    non_differentiable=(1, 2),
)


def _as_math(param: Tensor, math_dtype: torch.dtype) -> Tensor:
    # Even a no-op .to() costs a few microseconds of dispatch.
    return param if param.dtype == math_dtype else param.to(math_dtype)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> Tensor:
    """``torch.nn.functional.group_norm`` followed by ``activation``, in one pass.

    x: (N, C, *spatial), contiguous or channels-last (other strides are copied);
    fp32, fp16, bf16 or fp64. weight, bias: (C,) or None. activation: None or
    "silu". Returns y with x's shape, dtype and memory layout.
    """
    check_tensor("x", x, min_dim=2)
    channels = x.shape[1]
    check_int("num_groups", num_groups, minimum=1)
    if channels % num_groups:
        raise ValueError(f"num_groups must divide the {channels} channels of x, got {num_groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, param, shape=(channels,), like=x)
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")

    backend = resolve("group_norm", x.device, _IMPLEMENTED)
    if backend == "reference" or x.numel() == 0:
        return reference.norm.group_norm(x, num_groups, weight, bias, eps, activation)
    # Kernels read the affine parameters in the math dtype; autograd casts
    # their gradients back to the parameters' dtype.
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = _as_math(weight, math_dtype).contiguous() if weight is not None else x.new_ones(channels, dtype=math_dtype)
    bias = _as_math(bias, math_dtype).contiguous() if bias is not None else x.new_zeros(channels, dtype=math_dtype)
    args = (dense(x), weight, bias, num_groups, float(eps), activation, backend)
    # torch.compile and torch.export must see the custom op in their graph.
    return group_norm_op(*args)[0] if torch.compiler.is_compiling() else _GroupNormFunction.call(*args)[0]


def _layer_norm_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float, rms: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns y, h = x + residual (an empty tensor without a residual) and the per-row mean and rstd.

    x and residual are contiguous, normalised over their last dimension D; weight,
    bias and the statistics are in x's math dtype. RMSNorm's mean is 0 and its
    bias is not read.
    """
    return tuple(kernels(backend, "norm").layer_norm_forward(x, residual, weight, bias, eps, rms))


def _layer_norm_backward(
    dy: Tensor, dh: Tensor | None, h: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, rms: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dh_total = d/dh + dh (the gradient of both x and residual) and the weight and bias gradients."""
    return kernels(backend, "norm").layer_norm_backward(dy, dh, h, weight, mean, rstd, rms)


layer_norm_op = torch.library.custom_op("genfast::layer_norm", _layer_norm_forward, mutates_args=())
layer_norm_backward_op = torch.library.custom_op(
    "genfast::layer_norm_backward", _layer_norm_backward, mutates_args=()
)


@layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, rms, backend):
    stats = weight.new_empty(x.numel() // x.shape[-1])
    return torch.empty_like(x), x.new_empty(0) if residual is None else torch.empty_like(x), stats, stats.clone()


@layer_norm_backward_op.register_fake
def _(dy, dh, h, weight, mean, rstd, rms, backend):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, _bias, _eps, rms, backend = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
    ctx.has_residual, ctx.rms, ctx.backend = residual is not None, rms, backend


def _layer_norm_differentiate(ctx, dy, dh, _dmean, _drstd, backward):
    dh = dh if ctx.has_residual else None
    if dy is None and dh is None:
        return (None,) * 7
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dweight, dbias = backward(dy.contiguous(), dh if dh is None else dh.contiguous(), h, weight, mean, rstd,
                                  ctx.rms, ctx.backend)
    return dx, dx if ctx.has_residual else None, dweight, None if ctx.rms else dbias, None, None, None


layer_norm_op.register_autograd(
    functools.partial(_layer_norm_differentiate, backward=layer_norm_backward_op),
    setup_context=_layer_norm_setup_context,
)
_LayerNormFunction = eager_function(
    "genfast.LayerNorm",
    _layer_norm_forward,
    _layer_norm_setup_context,
    functools.partial(_layer_norm_differentiate, backward=_layer_norm_backward),
    non_differentiable=(2, 3),
)


def _normalized_size(x: Tensor, normalized_shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    """normalized_shape as a tuple, checked against x's trailing dimensions, and its element count."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else ()
    # type() before the ABC's isinstance: this runs on every call, and each ABC check costs 0.3 us.
    if not shape or any(type(n) is not int and (isinstance(n, bool) or not isinstance(n, numbers.Integral))
                        for n in shape):
        raise TypeError(f"normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    if len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(
            f"normalized_shape {shape} must match the last dimensions of x, whose shape is {tuple(x.shape)}"
        )
    return shape, math.prod(shape)


def _normalize(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | None,
    residual: Tensor | None,
    rms: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """layer_norm and rms_norm: checks, then the backend's kernel or the reference."""
    check_tensor("x", x, min_dim=1)
    shape, size = _normalized_size(x, normalized_shape)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(name, param, shape=shape, like=x)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), like=x)
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")

    backend = resolve("rms_norm" if rms else "layer_norm", x.device, _LAYER_NORM_IMPLEMENTED)
    if backend == "reference" or x.numel() == 0:
        if rms:
            return reference.norm.rms_norm(x, shape, weight, eps, residual)
        return reference.norm.layer_norm(x, shape, weight, bias, eps, residual)
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    def flat(param: Tensor | None, fill: float) -> Tensor:
        if param is None:
            return torch.full((size,), fill, dtype=math_dtype, device=x.device)
        return _as_math(param if param.dim() == 1 else param.reshape(size), math_dtype).contiguous()

    # The kernels normalise over the last dimension of a contiguous tensor, so x keeps its shape
    # where that is all normalized_shape spans: the output then needs no view, and a view or
    # reshape costs microseconds each (more right after a kernel has swept the caches).
    as_rows = (lambda t: t.contiguous()) if size == x.shape[-1] else (lambda t: t.reshape(-1, size).contiguous())
    args = (
        as_rows(x),
        None if residual is None else as_rows(residual),
        flat(weight, 1.0),
        flat(bias, 0.0),
        float(eps),
        rms,
        backend,
    )
    y, h, *_ = layer_norm_op(*args) if torch.compiler.is_compiling() else _LayerNormFunction.call(*args)
    if y.shape != x.shape:
        y, h = y.view(x.shape), h if residual is None else h.view(x.shape)
    return y if residual is None else (y, h)


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.layer_norm``, with an optional residual added first, in one pass.

    Normalises over the last dimensions, ``normalized_shape``; weight and bias
    have that shape or are None. With ``residual`` (x's shape and dtype)
    normalises h = x + residual and returns (y, h): a pre-norm block's
    ``h = h + attn(...); y = norm(h)`` in one read of each input. x:
    fp32, fp16, bf16 or fp64, any strides (others than contiguous are copied).
    """
    return _normalize(x, normalized_shape, weight, bias, eps, residual, rms=False)


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.rms_norm``, with an optional residual added first, in one pass.

    Arguments and the residual's output as in layer_norm; eps None means
    torch.finfo(x.dtype).eps, as in torch.
    """
    return _normalize(x, normalized_shape, weight, None, eps, residual, rms=True)
