"""StyleGAN's minibatch standard deviation layer as the custom op genfast::minibatch_stddev: the
group statistics in one pass over x that also writes x into the output, where PyTorch takes six
passes and a concatenation; the backward is one more pass. Formula:
genfast/reference/minibatch_stddev.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ._autograd import eager_function
from ._checks import check_int, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
# On an H100 (2026-11-27) the compiler refused the Triton kernel the interpreter had run (a global
# not a constexpr); fixed since, its tests have not yet run compiled.
_UNPROVEN = frozenset({"triton"})


def _forward(x: Tensor, group: int, channels: int, backend: str) -> Tensor:
    return kernels(backend, "minibatch_stddev").minibatch_stddev_forward(x, group, channels)


def _backward_kernel(dout: Tensor, x: Tensor, group: int, channels: int, backend: str) -> Tensor:
    return kernels(backend, "minibatch_stddev").minibatch_stddev_backward(dout, x, group, channels)


minibatch_stddev_op = torch.library.custom_op("genfast::minibatch_stddev", _forward, mutates_args=())
minibatch_stddev_backward_op = torch.library.custom_op(
    "genfast::minibatch_stddev_backward", _backward_kernel, mutates_args=()
)


@minibatch_stddev_op.register_fake
def _(x, group, channels, backend):
    n, c, h, w = x.shape
    return x.new_empty(n, c + channels, h, w)


@minibatch_stddev_backward_op.register_fake
def _(dout, x, group, channels, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, *ctx.params = inputs
    ctx.save_for_backward(x)


def _differentiate(ctx, dout, backward):
    if dout is None:
        return None, None, None, None
    (x,) = ctx.saved_tensors
    return backward(dout.contiguous(), x, *ctx.params), None, None, None


def _differentiate_eagerly(ctx, dout):
    """The kernel's backward, or where the gradient must be differentiable again (autograd.grad
    with create_graph, as a GAN's R1 penalty takes it) the same formula in torch ops."""
    if dout is not None and torch.is_grad_enabled():
        (x,) = ctx.saved_tensors
        group, channels, _ = ctx.params
        return reference.minibatch_stddev.minibatch_stddev_backward(dout, x, group, channels), None, None, None
    return _differentiate(ctx, dout, _backward_kernel)


minibatch_stddev_op.register_autograd(
    lambda ctx, dout: _differentiate(ctx, dout, minibatch_stddev_backward_op), setup_context=_setup_context
)
_MinibatchStddevFunction = eager_function("genfast.MinibatchStddev", _forward, _setup_context, _differentiate_eagerly)


def minibatch_stddev(x: Tensor, group_size: int = 4, num_channels: int = 1) -> Tensor:
    """StyleGAN's MinibatchStdLayer: x (N, C, H, W) with num_channels channels appended, each the
    standard deviation over groups of min(group_size, N) samples (sample n in group n mod
    N / group), averaged over its share of the channels and the pixels. Differentiable twice in
    eager mode (a GAN's R1 penalty); under torch.compile, once."""
    check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    check_int("group_size", group_size, minimum=1)
    check_int("num_channels", num_channels, minimum=1)
    group = min(group_size, x.shape[0])
    if x.shape[0] % group:
        raise ValueError(f"group_size {group} must divide the batch size {x.shape[0]}")
    if x.shape[1] % num_channels:
        raise ValueError(f"num_channels {num_channels} must divide x's {x.shape[1]} channels")
    backend = resolve("minibatch_stddev", x.device, _IMPLEMENTED, _UNPROVEN)
    if backend == "reference" or x.numel() == 0:
        return reference.minibatch_stddev.minibatch_stddev(x, group_size, num_channels)
    args = (x.contiguous(), group, num_channels, backend)
    return minibatch_stddev_op(*args) if torch.compiler.is_compiling() else _MinibatchStddevFunction.call(*args)[0]
