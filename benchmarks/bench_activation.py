"""Transformer MLP activations: GPT-2's tanh GELU on its 3072-wide hidden
layer, and Llama-7B's SwiGLU (silu(gate) * up) on its 11008-wide one, with
gate and up the two halves of one fused projection's output as served models
hold them. Backward differentiates the activation's inputs.
"""

from __future__ import annotations

import math

import torch

import genfast
from genfast.reference.activation import activate, gated

from .harness import Case, Provider, op_providers

# source: (shape of the activation's output, activation, gated)
CASES_BY_SOURCE = {
    "gpt2-small mlp": ((4, 512, 3072), "gelu_tanh", False),
    "llama-7b mlp": ((1, 2048, 11008), "silu", True),
    "t5-v1.1 mlp": ((4, 512, 2048), "gelu", True),
}


def activation_case(source: str, direction: str, quick: bool = False) -> Case:
    shape, activation, is_gated = CASES_BY_SOURCE[source]

    def make_inputs(device: torch.device) -> dict:
        if is_gated:
            gate, up = torch.randn(*shape[:-1], 2 * shape[-1], device=device).chunk(2, dim=-1)
        else:
            gate, up = torch.randn(shape, device=device), None
        return {"gate": gate, "up": up, "activation": activation}

    tensor = math.prod(shape) * 4
    inputs = 2 if is_gated else 1
    # Forward reads the inputs, writes y; backward reads them and dy, writes their gradients.
    traffic = {"forward": (inputs + 1) * tensor, "backward": (2 * inputs + 1) * tensor}
    variant = ("swiglu" if activation == "silu" else "geglu") if is_gated else activation
    return Case(f"{source} {'x'.join(map(str, shape))} {variant}", "activation", direction, math.prod(shape),
                make_inputs, traffic[direction], quick=quick, variant=variant)


CASES = [
    activation_case(source, direction, quick=source != "t5-v1.1 mlp")
    for source in CASES_BY_SOURCE
    for direction in ("forward", "backward")
]

_GENFAST_GELU = {"gelu": "none", "gelu_tanh": "tanh"}


def _genfast(gate, up, activation):
    if up is None:
        return genfast.ops.silu(gate) if activation == "silu" else genfast.ops.gelu(gate, _GENFAST_GELU[activation])
    if activation == "silu":
        return genfast.ops.swiglu(gate, up)
    return genfast.ops.geglu(gate, up, _GENFAST_GELU[activation])


def _torch(gate, up, activation):
    """What a transformer MLP runs today: torch's activation, then the product."""
    y = activate(gate, activation)
    return y if up is None else y * up


def _reference(gate, up, activation):
    return activate(gate, activation) if up is None else gated(gate, up, activation)


def providers(device_type: str) -> list[Provider]:
    return op_providers(device_type, _genfast, _torch, _reference)
