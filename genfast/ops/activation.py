"""Activations and gated activations (SwiGLU, GeGLU) as the custom op
genfast::activation: y = act(x), or act(x) * up in one pass where PyTorch
takes two and a temporary. Formulas: genfast/reference/activation.py.

gate and up may be any tensors whose last dimension is contiguous, such as
the two halves of a fused gate-and-up projection's output
(``gate, up = proj(x).chunk(2, dim=-1)``): they are read in place.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ._autograd import eager_function
from ._checks import check_choice, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def _forward(x: Tensor, up: Tensor | None, activation: str, backend: str) -> Tensor:
    """act(x) (* up) as a contiguous (rows, width) tensor; x and up are (rows, width) with a
    contiguous last dimension; activation is "silu", "gelu" or "gelu_tanh"."""
    return kernels(backend, "activation").activation_forward(x, up, activation)


def _backward(dy: Tensor, x: Tensor, up: Tensor | None, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dup), dup an empty tensor without up."""
    dx, dup = kernels(backend, "activation").activation_backward(dy, x, up, activation)
    return dx, x.new_empty(0) if dup is None else dup


activation_op = torch.library.custom_op("genfast::activation", _forward, mutates_args=())
activation_backward_op = torch.library.custom_op("genfast::activation_backward", _backward, mutates_args=())


@activation_op.register_fake
def _(x, up, activation, backend):
    return x.new_empty(x.shape)


@activation_backward_op.register_fake
def _(dy, x, up, activation, backend):
    return x.new_empty(x.shape), x.new_empty(0) if up is None else x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, up, activation, backend = inputs
    ctx.save_for_backward(x, up)
    ctx.activation, ctx.backend = activation, backend


def _differentiate(ctx, dy, backward):
    if dy is None:
        return None, None, None, None
    x, up = ctx.saved_tensors
    dx, dup = backward(dy.contiguous(), x, up, ctx.activation, ctx.backend)
    return dx, None if up is None else dup, None, None


activation_op.register_autograd(
    functools.partial(_differentiate, backward=activation_backward_op), setup_context=_setup_context
)
_ActivationFunction = eager_function(
    "genfast.Activation", _forward, _setup_context, functools.partial(_differentiate, backward=_backward)
)


def _rows(t: Tensor) -> Tensor:
    """t as (rows, last dimension), without a copy where its last dimension is contiguous and
    its rows do not overlap (a broadcast tensor's do), else as a contiguous copy."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    width = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            rows = t.view(-1, width)
        except RuntimeError:  # leading dimensions that do not flatten to one stride
            pass
        else:
            if rows.shape[0] <= 1 or rows.stride(0) >= width:
                return rows
    return t.reshape(-1, width).contiguous()


def _activation(x: Tensor, up: Tensor | None, activation: str, x_name: str) -> Tensor:
    check_tensor(x_name, x)
    if up is not None:
        check_tensor("up", up, shape=tuple(x.shape), like=x)
        if up.dtype != x.dtype:
            raise TypeError(f"up must have {x_name}'s dtype {x.dtype}, got {up.dtype}")
    backend = resolve("activation", x.device, _IMPLEMENTED)
    if backend == "reference" or x.numel() == 0:
        return reference.activation.activate(x, activation) if up is None else reference.activation.gated(
            x, up, activation
        )
    args = (_rows(x), None if up is None else _rows(up), activation, backend)
    y = activation_op(*args) if torch.compiler.is_compiling() else _ActivationFunction.call(*args)[0]
    return y.view(x.shape)


def _gelu_name(approximate: str) -> str:
    check_choice("approximate", approximate, tuple(_APPROXIMATIONS))
    return _APPROXIMATIONS[approximate]


def silu(input: Tensor) -> Tensor:
    """``torch.nn.functional.silu``: input * sigmoid(input)."""
    return _activation(input, None, "silu", "input")


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """``torch.nn.functional.gelu``: exact (approximate="none") or its tanh form ("tanh")."""
    return _activation(input, None, _gelu_name(approximate), "input")


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, Llama's MLP activation, in one pass. gate and up: same shape and dtype."""
    return _activation(gate, up, "silu", "gate")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up, T5 v1.1's and Gemma's MLP activation, in one pass."""
    return _activation(gate, up, _gelu_name(approximate), "gate")
