"""Bias + activation as GANs and VAEs run it after a layer without its own bias: StyleGAN2's
synthesis layer (leaky_relu, gain sqrt(2), clamp 256), a DCGAN discriminator's convolution
(leaky_relu 0.2, channels-last as its convolutions run fastest on CPU), and an MLP's hidden
layer (relu). Backward differentiates x and the bias.
"""

from __future__ import annotations

import math

import torch

import genfast
from genfast.reference.bias_act import bias_act

from .harness import Case, Provider, op_providers

# source: (x's shape, options, channels-last)
CASES_BY_SOURCE = {
    "stylegan2 synthesis 64px": ((4, 512, 64, 64), {"activation": "leaky_relu", "clamp": 256.0}, False),
    "dcgan discriminator": ((64, 128, 16, 16), {"activation": "leaky_relu", "gain": 1.0}, True),
    "mlp hidden": ((256, 1024), {"activation": "relu", "gain": 1.0}, False),
}


def bias_act_case(source: str, direction: str) -> Case:
    shape, options, channels_last = CASES_BY_SOURCE[source]

    def make_inputs(device: torch.device) -> dict:
        x = torch.randn(shape, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        return {"x": x, "bias": torch.randn(shape[1], device=device), **options}

    tensor = math.prod(shape) * 4
    # Forward reads x, writes y; backward reads x and dy, writes dx.
    traffic = {"forward": 2 * tensor, "backward": 3 * tensor}
    layout = " channels-last" if channels_last else ""
    return Case(f"{source} {'x'.join(map(str, shape))}{layout} {options['activation']}", "bias_act", direction,
                math.prod(shape), make_inputs, traffic[direction], quick=source != "mlp hidden")


CASES = [bias_act_case(source, direction) for source in CASES_BY_SOURCE for direction in ("forward", "backward")]


def providers(device_type: str) -> list[Provider]:
    """genfast against the same formula in eager torch (the reference, one op per step) and compiled."""
    return op_providers(device_type, genfast.ops.bias_act, bias_act)
