"""2-D convolution with torch.nn.functional.conv2d's signature (genfast::conv2d_winograd).

A 3x3 convolution with stride 1, no dilation and one group, in float32 on the
CPU, runs genfast's Winograd F(2x2, 3x3) kernel (csrc/cpu/conv.cpp): 2.25 times
fewer multiplies than direct convolution, in the matrix-product units, at 1 to 2
times the float32 error of ATen's direct kernel. A 1x1 one (no padding) is one
matrix product over the pixels, which ran 1.5 to 3 times faster than oneDNN's
1x1 convolution at a small U-Net's sizes on a 2-core Xeon (a (4, 128, 8, 8)
input to 128 channels: 63 against 117 us channels-last, 71 against 187 us
channels-first). Every other convolution, and every convolution on a GPU or
under a backend other than cpu (genfast has no Triton or CUDA convolution:
cuDNN's is the one to beat there), runs ATen's: genfast/reference/conv.py.
The Winograd convolution's backward is genfast's too where that measured
faster (``_winograd_backward``): the input's gradient by the same kernel over
the output's gradient with the filters flipped, the filters' and the bias's by
the same transforms (csrc/cpu/conv.cpp); elsewhere, and wherever autograd
records the backward to differentiate it again, ATen's.

Non-finite values: a NaN input reaches the same outputs as in direct
convolution, and an infinite one makes the same outputs non-finite, some of
them NaN where direct convolution gives an infinity (the transforms subtract
it from itself).

``upsample=2`` first upsamples the input by nearest neighbours, as diffusers'
Upsample2D does before its convolution; the Winograd kernel reads the small
image in place of the upsampled one.

The kernel takes its filters transformed (``winograd_filters``); a module can
keep them between calls while its weight does not change (genfast.nn.Conv2d
does) by passing its own ``filters`` function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import extension, get_backend, resolve
from ._autograd import eager_function
from ._checks import channels_last, check_tensor

_IMPLEMENTED = frozenset({"cpu"})
_ONES = (1, (1, 1), [1, 1])  # a stride or dilation of 1, as an int or a pair


def _padding_pair(padding) -> tuple[int, int] | None:
    """padding as (height, width) ints, or None where it is not a pair of ints (ATen's to check)."""
    pair = (padding, padding) if isinstance(padding, int) else tuple(padding)
    ints = len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    return pair if ints else None


def _forward(
    x: Tensor,
    filters: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    padding: list[int],
    upsample: int,
) -> Tensor:
    """The 3x3 stride-1 convolution of x (N, C, H, W) upsampled ``upsample`` times by weight (K, C,
    3, 3), whose transform is ``filters``, + bias + residual (y's sizes, channel stride 1); float32
    CPU tensors. y is laid out like x."""
    return extension().conv2d_winograd(x, filters, bias, residual, weight.shape[0], *padding, upsample)


conv2d_op = torch.library.custom_op("genfast::conv2d_winograd", _forward, mutates_args=())


@conv2d_op.register_fake
def _(x, filters, weight, bias, residual, padding, upsample):
    shape = _output_shape(x, weight, padding, upsample)
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, _, weight, bias, residual, padding, upsample = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.upsample, ctx.has_bias = padding, upsample, bias is not None


def _input_gradient(dy: Tensor, weight: Tensor, padding: list[int]) -> Tensor | None:
    """The gradient of a 3x3 stride-1 convolution's (upsampled) input: the full correlation of dy
    with the filters flipped and transposed, itself a 3x3 stride-1 convolution with padding 2 - p,
    run by the Winograd kernel. None where a padding over 2 would make that one negative."""
    if max(padding) > 2:
        return None
    # The kernel takes the filters transformed; of its weight argument, only the shape.
    args = (dy, winograd_filters(weight, flipped=True), weight.detach().transpose(0, 1), None, None,
            [2 - padding[0], 2 - padding[1]], 1)
    return conv2d_op(*args) if torch.compiler.is_compiling() else _forward(*args)


def _filters_backward(x: Tensor, dy: Tensor, padding: list[int], upsample: int, bias: bool,
                      filters_channels_last: bool) -> tuple[Tensor, Tensor]:
    """(dweight, dbias or an empty tensor) of the convolution of x upsampled by the Winograd transforms;
    dweight channels-last where filters_channels_last."""
    dweight, dbias = extension().conv2d_winograd_filters_backward(x, dy, *padding, upsample, bias,
                                                                  filters_channels_last)
    return dweight, dbias if bias else x.new_empty(0)


filters_backward_op = torch.library.custom_op("genfast::conv2d_winograd_filters_backward", _filters_backward,
                                              mutates_args=())


@filters_backward_op.register_fake
def _(x, dy, padding, upsample, bias, filters_channels_last):
    layout = torch.channels_last if filters_channels_last else torch.contiguous_format
    return (torch.empty((dy.shape[1], x.shape[1], 3, 3), dtype=x.dtype, device=x.device, memory_format=layout),
            x.new_empty(dy.shape[1] if bias else 0))


def _filters_gradient(dy: Tensor, x: Tensor, weight: Tensor, padding: list[int], upsample: int,
                      bias: bool) -> tuple[Tensor, Tensor | None]:
    """The gradients of the filters and, where bias, the bias, by the Winograd transforms; the
    filters' laid out as weight is (autograd copies a gradient into its parameter's layout)."""
    run = filters_backward_op if torch.compiler.is_compiling() else _filters_backward
    dweight, dbias = run(x.detach(), dy, list(padding), upsample, bias, channels_last(weight))
    return dweight, dbias if bias else None


def _winograd_backward(weight: Tensor, dy: Tensor) -> bool:
    """Whether genfast's kernels take the backward, or ATen's, which computes the input's and the
    filters' gradients together. Channels-last on a 2-core Xeon, genfast's backward ran 1.2 to 2
    times faster than ATen's with 16 tiles of 2x2 outputs a thread or more, from 32 x 32 to 256 x
    256 channels, and ATen's 1.0 to 1.5 times faster with 8 a thread (one 8 x 8 image), where the
    filters' transforms cost about what the products do. Past 256 x 256 channels each thread's
    sums of the 16 products (16 C K floats) no longer stay in L2, and that has not been measured."""
    out_channels, channels = weight.shape[:2]
    tiles = dy.shape[0] * -(-dy.shape[2] // 2) * -(-dy.shape[3] // 2)
    return channels * out_channels <= 256 * 256 and tiles >= BACKWARD_MIN_TILES_PER_THREAD * torch.get_num_threads()


BACKWARD_MIN_TILES_PER_THREAD = 16


def _backward(ctx, dy):
    if dy is None:
        return None, None, None, None, None, None, None
    x, weight = ctx.saved_tensors
    # dy laid out as x: the kernels read both channels-last, and the input's gradient comes out laid
    # out as dy, so one channels-first dy made every gradient below it channels-first. A U-Net's
    # come so from its loss and, as channel slices, from its concatenations' backward; made
    # contiguous, a slice of 4 x 64 x 32 x 32 took 191 us, made channels-last 34.
    dy = dy.contiguous(memory_format=torch.channels_last) if channels_last(x) else dy.contiguous()
    wants_bias = ctx.has_bias and ctx.needs_input_grad[3]
    # Where autograd records the backward (create_graph: a GAN's R1 penalty), ATen's, whose own
    # gradient torch knows; genfast's kernels are not differentiated again.
    winograd = not torch.is_grad_enabled() and _winograd_backward(weight, dy)
    dx = _input_gradient(dy, weight, ctx.padding) if winograd and ctx.needs_input_grad[0] else None
    dweight = dbias = None
    if winograd and ctx.needs_input_grad[2]:
        dweight, dbias = _filters_gradient(dy, x, weight, ctx.padding, ctx.upsample, wants_bias)
    elif winograd and wants_bias:
        dbias = dy.sum((0, 2, 3))
    wanted = [ctx.needs_input_grad[0] and dx is None, ctx.needs_input_grad[2] and dweight is None,
              wants_bias and dbias is None]
    if any(wanted):
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        upsampled = reference.conv.upsample_nearest(x, ctx.upsample)
        aten = torch.ops.aten.convolution_backward(
            dy, upsampled, weight, bias_sizes, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1, wanted
        )
        dx, dweight, dbias = (mine if mine is not None else theirs for mine, theirs in zip((dx, dweight, dbias), aten))
    if dx is not None and ctx.upsample > 1:
        # Each input pixel fed upsample x upsample of the upsampled image. As a pooling: summed
        # over views, a channels-last image's took 28 ms at 32 x 64 x 64 x 64 (1.6 pooled).
        dx = F.avg_pool2d(dx, ctx.upsample, divisor_override=1)
    return dx, None, dweight, dbias, dy if ctx.needs_input_grad[4] else None, None, None


conv2d_op.register_autograd(_backward, setup_context=_setup_context)
_Conv2dFunction = eager_function("genfast.Conv2d", _forward, _setup_context, _backward)


def _transform(weight: Tensor, flipped: bool) -> Tensor:
    return extension().conv2d_winograd_weight(weight, flipped)


filters_op = torch.library.custom_op("genfast::conv2d_winograd_filters", _transform, mutates_args=())


@filters_op.register_fake
def _(weight, flipped):
    channels, filters = weight.shape[:2] if flipped else weight.shape[1::-1]
    lanes = extension().vector_lanes
    return weight.new_empty((16, channels, -(-filters // lanes) * lanes))


def winograd_filters(weight: Tensor, flipped: bool = False) -> Tensor:
    """weight (K, C, 3, 3), float32 on the CPU, transformed for the Winograd kernel: (16, C, K
    rounded up to the kernel's vector lanes, 16 with AVX-512, 8 with AVX2). flipped: those of the input's
    gradient, weight.flip(2, 3).transpose(0, 1) transformed, (16, K, C rounded up). A constant of
    the weight: no gradient flows through it."""
    weight = weight.detach()
    return filters_op(weight, flipped) if torch.compiler.is_compiling() else _transform(weight, flipped)


def _check(input: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> None:
    check_tensor("input", input)
    check_tensor("weight", weight, like=input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be (out_channels, in_channels / groups, kH, kW), got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if input.shape[-3] != weight.shape[1] * groups:
        raise ValueError(
            f"input has {input.shape[-3]} channels; weight {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), like=input)
        if bias.dtype != input.dtype:
            raise TypeError(f"bias must have input's dtype {input.dtype}, got {bias.dtype}")


def _pointwise(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution of (N, C, H, W) input as one matrix product, output in input's layout."""
    n, c, h, w = input.shape
    filters = weight.reshape(weight.shape[0], c)
    if channels_last(input):
        pixels = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels are innermost
        y = pixels @ filters.t() if bias is None else torch.addmm(bias, pixels, filters.t())
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)
    pixels = input.reshape(n, c, h * w)
    y = filters @ pixels if bias is None else torch.baddbmm(bias[:, None], filters.expand(n, -1, -1), pixels)
    return y.view(n, -1, h, w)


def _channels_last_weight(weight: Tensor) -> bool:
    """Whether weight's strides put its input channels innermost, as after
    ``module.to(memory_format=torch.channels_last)`` (a 1x1 weight is contiguous both ways)."""
    return weight.shape[1] > 1 and weight.stride(1) == 1 and weight.stride(3) == weight.shape[1]


def _is_pointwise(input: Tensor, weight: Tensor, stride, padding, groups) -> bool:
    return (
        input.dtype == torch.float32 and weight.shape[2:] == (1, 1) and groups == 1 and stride in _ONES
        and padding in (0, (0, 0), [0, 0], "valid", "same")
    )


def _winograd_padding(
    input: Tensor, weight: Tensor, stride, padding, dilation, groups, upsample: int
) -> tuple[int, int] | None:
    """The (height, width) padding if the Winograd kernel computes this convolution of input
    upsampled ``upsample`` times, else None."""
    if (
        input.dtype != torch.float32 or weight.shape[2:] != (3, 3) or groups != 1
        or stride not in _ONES or dilation not in _ONES
    ):
        return None
    pad = {"same": (1, 1), "valid": (0, 0)}.get(padding) if isinstance(padding, str) else _padding_pair(padding)
    if pad is None:
        return None
    height, width = upsample * input.shape[-2], upsample * input.shape[-1]
    fits = min(pad) >= 0 and min(height + 2 * pad[0], width + 2 * pad[1]) >= 3
    return pad if fits else None


def _broadcast(residual: Tensor, shape: tuple[int, ...]) -> Tensor:
    """residual expanded to the output's shape, or a ValueError naming both. (Not through
    torch.broadcast_shapes: 30 us a call, 3% of a small U-Net's forward.)"""
    sizes = residual.shape
    if len(sizes) > len(shape) or any(size not in (1, out) for size, out in zip(reversed(sizes), reversed(shape))):
        raise ValueError(f"residual of shape {tuple(residual.shape)} must broadcast to the output's shape {shape}")
    return residual.expand(shape)


def _output_shape(input: Tensor, weight: Tensor, pad: tuple[int, int], upsample: int) -> tuple[int, ...]:
    height, width = upsample * input.shape[2] + 2 * pad[0] - 2, upsample * input.shape[3] + 2 * pad[1] - 2
    return (input.shape[0], weight.shape[0], height, width)


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    upsample: int = 1,
    residual: Tensor | None = None,
    filters: Callable[[Tensor], Tensor] = winograd_filters,
) -> Tensor:
    """``torch.nn.functional.conv2d`` of input upsampled ``upsample`` times by nearest neighbours
    (``F.interpolate(input, scale_factor=upsample)``; 1: not upsampled), plus ``residual``, a
    tensor that broadcasts to the output (a ResNet block's skip connection, a timestep
    embedding's (N, K, 1, 1) projection). The Winograd kernel adds the residual as it writes
    the output where the residual's channels are innermost (channels-last, or one value per
    channel); others are added after. ``filters(weight)`` gives the kernel its transformed
    filters when it runs: ``winograd_filters``, or a function that keeps them."""
    _check(input, weight, bias, groups)
    if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
        raise ValueError(f"upsample must be an int >= 1, got {upsample!r}")
    if residual is not None:
        check_tensor("residual", residual, like=input)
        if residual.dtype != input.dtype:
            raise TypeError(f"residual must have input's dtype {input.dtype}, got {residual.dtype}")
    if input.dim() == 3:  # unbatched (C, H, W)
        return conv2d(input[None], weight, bias, stride, padding, dilation, groups, upsample=upsample,
                      residual=residual, filters=filters)[0]
    native = get_backend() in ("auto", "cpu") and resolve("conv2d", input.device, _IMPLEMENTED) == "cpu"
    if native and not channels_last(input) and _channels_last_weight(weight):
        # torch's rule: a channels-last weight makes the output channels-last.
        input = input.contiguous(memory_format=torch.channels_last)
    pad = _winograd_padding(input, weight, stride, padding, dilation, groups, upsample)
    if not native or pad is None or input.numel() == 0:
        input = reference.conv.upsample_nearest(input, upsample)
        if native and input.numel() > 0 and _is_pointwise(input, weight, stride, padding, groups):
            y = _pointwise(input, weight, bias)
        else:
            y = reference.conv.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return y if residual is None else y + _broadcast(residual, tuple(y.shape))
    shape = _output_shape(input, weight, pad, upsample)
    fused = None
    if residual is not None:
        residual = _broadcast(residual, shape)
        fused = residual if residual.stride(1) == 1 or shape[1] == 1 else None
    args = (input, filters(weight), weight, None if bias is None else bias.contiguous(), fused, list(pad), upsample)
    y = conv2d_op(*args) if torch.compiler.is_compiling() else _Conv2dFunction.call(*args)[0]
    return y if residual is None or fused is not None else y + residual
