"""Bias + activation (+ gain, + clamp) as the custom op genfast::bias_act, StyleGAN2's
``bias_act``: y = clamp(gain * act(x + bias)) in one pass, where PyTorch takes up to four and
their temporaries. Formulas and defaults: genfast/reference/bias_act.py.

The backward computes the input's gradient and the bias's (its sum per channel) in one more
pass, recomputing x + bias rather than saving it. It is itself differentiable, through a pass
with act'', so a GAN's R1 penalty can differentiate a discriminator's gradient.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ..reference.bias_act import ACTIVATIONS
from ._autograd import eager_function
from ._checks import check_choice, check_tensor, fills_memory
from .linear import linear, weight_gradient

_IMPLEMENTED = frozenset({"cpu", "triton"})


def _inner(x: Tensor, bias: Tensor | None, dim: int) -> int:
    """Elements per run of one channel in x's memory: the stride of the bias's dimension."""
    return 1 if bias is None else x.stride(dim) if x.shape[dim] > 1 else x.numel()


def _forward(
    x: Tensor, bias: Tensor | None, dim: int, activation: str, alpha: float, gain: float, clamp: float | None,
    backend: str,
) -> Tensor:
    """clamp(gain act(x + bias)) laid out like x, which fills its memory in some dimension order."""
    return kernels(backend, "bias_act").bias_act_forward(x, bias, activation, alpha, gain, clamp, _inner(x, bias, dim))


def _backward(
    dy: Tensor, x: Tensor, bias: Tensor | None, dim: int, activation: str, alpha: float, gain: float,
    clamp: float | None, order: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """(g, dbias): g = dy gain act^(order)(x + bias) where the clamp did not hold, laid out like x
    (as dy must be), and its sum per channel (an empty tensor without bias)."""
    g, dbias = kernels(backend, "bias_act").bias_act_backward(
        dy, x, bias, activation, alpha, gain, clamp, _inner(x, bias, dim), order
    )
    return g, x.new_empty(0) if dbias is None else dbias


bias_act_op = torch.library.custom_op("genfast::bias_act", _forward, mutates_args=())
bias_act_backward_op = torch.library.custom_op("genfast::bias_act_backward", _backward, mutates_args=())


@bias_act_op.register_fake
def _(x, bias, dim, activation, alpha, gain, clamp, backend):
    return torch.empty_like(x)


@bias_act_backward_op.register_fake
def _(dy, x, bias, dim, activation, alpha, gain, clamp, order, backend):
    return torch.empty_like(x), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t (x's shape) with x's strides, as the kernels read it."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _setup_context(ctx, inputs, output):
    x, bias, *params, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.params, ctx.backend = params, backend


def _differentiate(ctx, dy, backward):
    """The forward's gradients: one backward pass, through ``backward`` (the backward op, or its
    eager Function's call) so that they are differentiable in turn."""
    if dy is None:
        return (None,) * 8
    x, bias = ctx.saved_tensors
    dx, dbias = backward(_like(dy, x), x, bias, *ctx.params, 1, ctx.backend)
    return dx, None if bias is None else dbias, *(None,) * 6


def _setup_backward_context(ctx, inputs, output):
    dy, x, bias, *params, order, backend = inputs
    ctx.save_for_backward(dy, x, bias)
    ctx.params, ctx.order, ctx.backend = params, order, backend


def _differentiate_backward(ctx, grad_g, grad_dbias, backward):
    """Second order. With G = grad_g + grad_dbias broadcast along dim (g's sum per channel is
    dbias), g = dy h(z) gives d dy = G h(z), by the first-order pass, and d z = G dy h'(z), by the
    pass of order 2, whose own sum per channel is bias's gradient."""
    if ctx.order == 2:
        raise RuntimeError("genfast.ops.bias_act: gradients of third order are not supported")
    dy, x, bias = ctx.saved_tensors
    dim, activation = ctx.params[:2]
    G = torch.zeros_like(x) if grad_g is None else grad_g
    if bias is not None and grad_dbias is not None:
        G = G + grad_dbias.view([-1 if d == dim else 1 for d in range(x.dim())])
    G = _like(G, x)
    d_dy, _ = backward(G, x, bias, *ctx.params, 1, ctx.backend)
    if ACTIVATIONS[activation].piecewise_linear:  # act'' is zero, x and bias get zeros (as in torch, not None)
        dx, dbias = torch.zeros_like(x), None if bias is None else torch.zeros_like(bias)
    else:
        dx, dbias = backward(_like(G * dy, x), x, bias, *ctx.params, 2, ctx.backend)
    return d_dy, dx, None if bias is None else dbias, *(None,) * 7


bias_act_backward_op.register_autograd(
    functools.partial(_differentiate_backward, backward=bias_act_backward_op), setup_context=_setup_backward_context
)
bias_act_op.register_autograd(
    functools.partial(_differentiate, backward=bias_act_backward_op), setup_context=_setup_context
)
# Its backward calls itself (looked up at call time), as the custom op's calls the custom op.
_BiasActBackwardFunction = eager_function(
    "genfast.BiasActBackward", _backward, _setup_backward_context,
    lambda ctx, *grads: _differentiate_backward(ctx, *grads, backward=_BiasActBackwardFunction.call),
)
_BiasActFunction = eager_function(
    "genfast.BiasAct", _forward, _setup_context,
    functools.partial(_differentiate, backward=_BiasActBackwardFunction.call),
)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def bias_act(
    x: Tensor,
    bias: Tensor | None = None,
    dim: int = 1,
    activation: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> Tensor:
    """clamp(gain * act(x + bias), -clamp, clamp) in one pass, with StyleGAN2's arguments.

    bias: 1-D, x.shape[dim] elements, broadcast along dimension ``dim`` of x.
    activation: "linear", "relu", "leaky_relu", "gelu", "silu", "tanh" or "sigmoid".
    alpha: leaky_relu's negative slope (default 0.2); the other activations take none.
    gain: the factor after the activation; default sqrt(2) for relu and leaky_relu, else 1.
    clamp: if given, the output is clamped to [-clamp, clamp] (its gradient is zero there).
    The output is laid out like x where x fills its memory (contiguous, channels-last or any
    permutation), else contiguous.
    """
    check_tensor("x", x)
    check_choice("activation", activation, ACTIVATIONS)
    spec = ACTIVATIONS[activation]
    if bias is not None:
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
        dim %= x.dim()
        check_tensor("bias", bias, shape=(x.shape[dim],), like=x)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if alpha is not None and spec.alpha is None:
        raise ValueError(f"alpha is leaky_relu's slope; activation {activation!r} takes none")
    alpha = _number("alpha", spec.alpha if alpha is None else alpha) if spec.alpha is not None else 0.0
    gain = _number("gain", spec.gain if gain is None else gain)
    if clamp is not None and _number("clamp", clamp) < 0:
        raise ValueError(f"clamp must be >= 0, got {clamp}")
    return run_checked(x if fills_memory(x) else x.contiguous(), None if bias is None else bias.contiguous(),
                       dim if bias is not None else 0, activation, alpha, gain, None if clamp is None else float(clamp))


def run_checked(x: Tensor, bias: Tensor | None, dim: int, activation: str, alpha: float, gain: float,
                clamp: float | None) -> Tensor:
    """bias_act on arguments already checked and resolved: x filling its memory, bias contiguous
    and of x's dtype and device, dim in [0, x.dim()), alpha and gain numbers (genfast.nn.Linear's
    way in, which skips the checks its layer makes true)."""
    backend = resolve("bias_act", x.device, _IMPLEMENTED)
    if backend == "reference" or x.numel() == 0:
        return reference.bias_act.bias_act(x, bias, dim, activation, alpha, gain, clamp)
    args = (x, bias, dim, activation, alpha, gain, clamp, backend)
    return bias_act_op(*args) if torch.compiler.is_compiling() else _BiasActFunction.call(*args)[0]


class _LinearBiasActFunction(torch.autograd.Function):
    """F.linear then bias_act over the last dimension as one autograd node: its backward is
    bias_act's pass, then the input's and the weight's products, with no node or Python call
    between them. On a CPU the extension's C++ node (csrc/cpu/linear_bias_act.cpp) does the same
    without a Python call at all."""

    @staticmethod
    def forward(ctx, input, weight, bias, activation, alpha, gain, backend):
        z = F.linear(input, weight)
        ctx.save_for_backward(input, weight, bias, z)
        ctx.params, ctx.backend = (z.dim() - 1, activation, alpha, gain, None), backend
        return _forward(z, bias, *ctx.params, backend)

    @staticmethod
    def backward(ctx, dy):
        input, weight, bias, z = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradients depend on input and weight through z too
            z = F.linear(input, weight)
        dz, dbias = _BiasActBackwardFunction.call(_like(dy, z), z, bias, *ctx.params, 1, ctx.backend)
        dinput = dz.matmul(weight) if ctx.needs_input_grad[0] else None
        dweight = weight_gradient(dz, input) if ctx.needs_input_grad[1] else None
        return dinput, dweight, None if bias is None else dbias, None, None, None, None


def linear_bias_act(input: Tensor, weight: Tensor, bias: Tensor | None, activation: str, alpha: float,
                    gain: float) -> Tensor:
    """genfast.nn.Linear's computation, act(F.linear(input, weight) + bias) * gain, on arguments
    the layer keeps valid: bias None or weight's length, dtype and device."""
    if torch.is_autocast_enabled(input.device.type):  # as F.linear's: float64 stays, the rest in autocast's dtype
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight, bias = (t if t is None or t.dtype == torch.float64 else t.to(dtype)
                               for t in (input, weight, bias))
    backend = resolve("bias_act", input.device, _IMPLEMENTED)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    if not recorded or backend == "reference" or input.numel() == 0 or torch.compiler.is_compiling():
        # F.linear checks input against the weight; its output fills its memory, which the bias matches.
        z = linear(input, weight)
        return run_checked(z, bias, z.dim() - 1, activation, alpha, gain, None)
    if backend == "cpu":
        return kernels(backend, "bias_act").linear_bias_act(input, weight, bias, activation, alpha, gain)
    return _LinearBiasActFunction.apply(input, weight, bias, activation, alpha, gain, backend)
