"""GroupNorm with an optional fused activation, as the custom op genfast::group_norm.

group_norm() checks its arguments and picks a backend. Under torch.compile or
torch.export it calls the op, which the graph holds as a single node with a
fake implementation; eager calls run the same kernels and backward formula
through an autograd.Function, skipping the custom op's dispatch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from ._checks import check_choice, check_int, check_tensor, dense, like_layout

ACTIVATIONS = (None, "silu")
_IMPLEMENTED = frozenset({"cpu", "cuda", "triton"})


def _triton():
    from ..kernels import norm

    return norm


def _forward_kernel(backend: str):
    return _triton().group_norm_forward if backend == "triton" else extension().group_norm_forward


def _backward_kernel(backend: str):
    return _triton().group_norm_backward if backend == "triton" else extension().group_norm_backward


def _forward(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, activation: str | None, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y (x's layout and dtype) and the (N, num_groups) mean and rstd.

    x must be dense (channels-first or channels-last); weight, bias and the
    statistics are in x's math dtype: float64 for float64 x, else float32.
    """
    return _forward_kernel(backend)(x, weight, bias, num_groups, eps, activation == "silu")


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
    return _backward_kernel(backend)(like_layout(dy, x), x, weight, bias, mean, rstd, num_groups, activation == "silu")


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


def _differentiate(ctx, dy, backward):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation, ctx.backend)
    return dx, dweight, dbias, None, None, None, None


group_norm_op.register_autograd(
    lambda ctx, dy, _dmean, _drstd: _differentiate(ctx, dy, group_norm_backward_op), setup_context=_setup_context
)


class _GroupNormFunction(torch.autograd.Function):
    """The eager path: group_norm_op's kernels and autograd without its
    dispatch. On the H100 machine's host this cut the time per call from 93 to
    44 us forward and from 344 to 150 us backward, where the GPU kernels of an
    SD-sized input take 35 and 80 us."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, dy):
        return _differentiate(ctx, dy, _backward)


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
    weight = _as_math(weight, math_dtype) if weight is not None else x.new_ones(channels, dtype=math_dtype)
    bias = _as_math(bias, math_dtype) if bias is not None else x.new_zeros(channels, dtype=math_dtype)
    args = (dense(x), weight, bias, num_groups, float(eps), activation, backend)
    # torch.compile and torch.export must see the custom op in their graph.
    return group_norm_op(*args)[0] if torch.compiler.is_compiling() else _GroupNormFunction.apply(*args)
