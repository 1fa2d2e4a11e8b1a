"""StyleGAN's minibatch standard deviation where discriminators run it, before their head:
StyleGAN2's at 4x4 with 512 channels (batch 32, groups of 4), and at 8x8 with 256 channels
(batch 64). Backward differentiates x.
"""

from __future__ import annotations

import math

import torch

import genfast
from genfast.reference.minibatch_stddev import minibatch_stddev

from .harness import Case, Provider, op_providers

SHAPES = {"stylegan2 discriminator 4x4": (32, 512, 4, 4), "discriminator 8x8": (64, 256, 8, 8)}


def minibatch_stddev_case(source: str, direction: str) -> Case:
    shape = SHAPES[source]

    def make_inputs(device: torch.device) -> dict:
        return {"x": torch.randn(shape, device=device), "group_size": 4, "num_channels": 1}

    tensor = math.prod(shape) * 4
    # Forward reads x and writes it with the statistics; backward reads x and dout, writes dx.
    traffic = {"forward": 2 * tensor, "backward": 3 * tensor}
    return Case(f"{source} {'x'.join(map(str, shape))}", "minibatch_stddev", direction, math.prod(shape), make_inputs,
                traffic[direction], quick=True)


CASES = [minibatch_stddev_case(source, direction) for source in SHAPES for direction in ("forward", "backward")]


def providers(device_type: str) -> list[Provider]:
    """genfast against StyleGAN's formula in eager torch (the reference) and compiled."""
    return op_providers(device_type, genfast.ops.minibatch_stddev, minibatch_stddev)
