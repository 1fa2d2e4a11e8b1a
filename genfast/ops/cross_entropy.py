"""A language model's loss as the custom op genfast::linear_cross_entropy:
F.cross_entropy(F.linear(input, weight, bias), target) without the (rows, V) logits in
memory. The specification: genfast/reference/cross_entropy.py.

Rows go through in chunks. A matrix product writes a chunk's logits into a buffer that every
chunk reuses; a row kernel (kernels/cross_entropy.py, csrc/cpu/cross_entropy.cpp) turns them
into the chunk's losses and, in place, into their gradient; two more products carry that
gradient to input and weight. For a mean or summed loss, the one a training step
differentiates, the gradients are computed so during the forward and the backward only
scales them: the logits are computed once, and the (rows, V) gradient never exists either.
With reduction="none" the backward computes each chunk's logits again, each row's gradient
weighted by its loss's.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from ._autograd import eager_function
from ._checks import check_choice, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_REDUCTIONS = ("mean", "sum", "none")

# The largest chunk of logits held at once. Smaller chunks cost matrix-product efficiency;
# this one holds 333 rows of GPT-2's fp32 logits (against 2048 rows, 412 MB, unchunked).
LOGITS_CHUNK_BYTES = 64 << 20


def _row_kernel(backend: str):
    if backend == "triton":
        from ..kernels.cross_entropy import cross_entropy_rows

        return cross_entropy_rows
    return extension().cross_entropy_rows


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(
    input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, smoothing: float,
    grad_scale: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(losses (rows,) in the math dtype, grad_input, grad_weight, grad_bias) for input
    (rows, H), weight (V, H), target (rows,) int64: the gradients of sum(grad_scale * losses),
    with grad_scale (rows,) in the math dtype, else empty tensors; grad_bias is empty without bias."""
    rows, V = input.shape[0], weight.shape[0]
    kernel = _row_kernel(backend)
    losses = input.new_empty(rows, dtype=_math_dtype(input.dtype))
    chunk_rows = max(1, min(rows, LOGITS_CHUNK_BYTES // (V * input.element_size())))
    logits_buffer = input.new_empty(chunk_rows, V)
    with_grad = grad_scale is not None
    if with_grad:
        # The weight's and bias's gradients sum over chunks in the math dtype: a bfloat16 sum
        # would round once per chunk where one matrix product rounds once.
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        grad_weight_sum = torch.zeros_like(weight, dtype=losses.dtype)
        grad_bias_sum = None if bias is None else torch.zeros(V, dtype=losses.dtype, device=input.device)
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        x, logits = input[start:end], logits_buffer[: end - start]
        if bias is None:
            torch.mm(x, weight.t(), out=logits)
        else:
            torch.addmm(bias, x, weight.t(), out=logits)
        losses[start:end] = kernel(
            logits, target[start:end], ignore_index, smoothing, grad_scale[start:end] if with_grad else None
        )
        if with_grad:  # logits now holds their gradient
            torch.mm(logits, weight, out=grad_input[start:end])
            if weight.dtype == grad_weight_sum.dtype:
                grad_weight_sum.addmm_(logits.t(), x)
            else:
                grad_weight_sum += torch.mm(logits.t(), x)
            if bias is not None:
                grad_bias_sum += logits.sum(0, dtype=losses.dtype)
    if not with_grad:  # three tensors: a custom op's outputs may not alias one another
        return losses, input.new_empty(0), input.new_empty(0), input.new_empty(0)
    grad_bias = input.new_empty(0) if bias is None else grad_bias_sum.to(bias.dtype)
    return losses, grad_input, grad_weight_sum.to(weight.dtype), grad_bias


def _forward(
    input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int, smoothing: float,
    reduction: str, precompute_grads: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss in input's dtype, grad_input, grad_weight, grad_bias): the gradients of the loss
    where precompute_grads (reduction "mean" or "sum"), else empty tensors."""
    valid = (target != ignore_index).sum() if reduction == "mean" else None
    grad_scale = None
    if precompute_grads:
        grad_scale = torch.ones(target.shape[0], dtype=_math_dtype(input.dtype), device=input.device)
        grad_scale = grad_scale if valid is None else grad_scale / valid
    losses, *grads = _chunked(input, weight, target, bias, ignore_index, smoothing, grad_scale, backend)
    loss = losses if reduction == "none" else losses.sum() if valid is None else losses.sum() / valid
    return loss.to(input.dtype), *grads


def _backward(
    grad_loss: Tensor, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
    smoothing: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of reduction="none", its logits computed again."""
    return tuple(_chunked(input, weight, target, bias, ignore_index, smoothing, grad_loss, backend)[1:])


linear_cross_entropy_op = torch.library.custom_op("genfast::linear_cross_entropy", _forward, mutates_args=())
linear_cross_entropy_backward_op = torch.library.custom_op(
    "genfast::linear_cross_entropy_backward", _backward, mutates_args=()
)


@linear_cross_entropy_op.register_fake
def _(input, weight, target, bias, ignore_index, smoothing, reduction, precompute_grads, backend):
    loss = input.new_empty(target.shape if reduction == "none" else ())
    if not precompute_grads:
        return loss, input.new_empty(0), input.new_empty(0), input.new_empty(0)
    return loss, input.new_empty(input.shape), weight.new_empty(weight.shape), input.new_empty(
        0 if bias is None else bias.shape
    )


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, input, weight, target, bias, ignore_index, smoothing, backend):
    return input.new_empty(input.shape), weight.new_empty(weight.shape), input.new_empty(
        0 if bias is None else bias.shape
    )


def _setup_context(ctx, inputs, output):
    input, weight, target, bias, ctx.ignore_index, ctx.smoothing, _, ctx.precomputed, ctx.backend = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*(output[1:] if ctx.precomputed else (input, weight, target, bias)))


def _differentiate(ctx, grad_loss, *unused, backward):
    if grad_loss is None:
        return (None,) * 9
    if ctx.precomputed:
        grad_input, grad_weight, grad_bias = (grad * grad_loss for grad in ctx.saved_tensors)
    else:
        input, weight, target, bias = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = backward(
            grad_loss.to(_math_dtype(input.dtype)).contiguous(), input, weight, target, bias, ctx.ignore_index, ctx.smoothing,
            ctx.backend,
        )
    return grad_input, grad_weight, None, grad_bias if ctx.has_bias else None, *(None,) * 5


linear_cross_entropy_op.register_autograd(
    functools.partial(_differentiate, backward=linear_cross_entropy_backward_op), setup_context=_setup_context
)
_LinearCrossEntropyFunction = eager_function(
    "genfast.LinearCrossEntropy", _forward, _setup_context, functools.partial(_differentiate, backward=_backward),
    non_differentiable=(1, 2, 3),
)


def _check_arguments(input, weight, target, bias, ignore_index, reduction, label_smoothing) -> None:
    check_tensor("input", input, min_dim=1)
    check_tensor("weight", weight, like=input)
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V > 0, {input.shape[-1]}) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} must have input's dtype {input.dtype}, got {t.dtype}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), like=input)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), shape=tuple(input.shape[:-1]), like=input)
    check_choice("reduction", reduction, _REDUCTIONS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a real number, got {type(label_smoothing).__name__}")
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if torch.compiler.is_compiling():
        return  # the kernels guard themselves: cpu's raises, triton's gives the row NaN
    V = weight.shape[0]
    # One read of target (a device sync on a GPU, once per call): a clear error where an index
    # outside the vocabulary would otherwise surface as a NaN loss.
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bad.any():
        raise ValueError(f"target must hold class indices in [0, {V}) or ignore_index {ignore_index}, "
                         f"got {target[bad][0].item()}")


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` for input (..., H), weight (V, H)
    and target (...) of class indices (int64 or int32), without the logits (..., V) in memory:
    a language model's head and loss in one op. The loss has input's dtype (computed in
    float32, float64 for float64) and is a scalar, or target's shape for reduction="none".
    """
    _check_arguments(input, weight, target, bias, ignore_index, reduction, label_smoothing)
    backend = resolve("linear_cross_entropy", input.device, _IMPLEMENTED)
    if backend == "reference" or input.numel() == 0:
        return reference.cross_entropy.linear_cross_entropy(
            input, weight, target, bias, ignore_index, reduction, label_smoothing
        )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    args = (
        input.reshape(-1, input.shape[-1]), weight, target.reshape(-1).long().contiguous(), bias, ignore_index,
        float(label_smoothing), reduction, needs_grad and reduction != "none", backend,
    )
    function = linear_cross_entropy_op if torch.compiler.is_compiling() else _LinearCrossEntropyFunction.call
    loss = function(*args)[0]
    return loss.view(target.shape) if reduction == "none" else loss
