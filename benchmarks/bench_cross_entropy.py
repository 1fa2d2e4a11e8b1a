"""A language model's head and loss, genfast.ops.linear_cross_entropy against torch's
F.cross_entropy(F.linear(input, weight), target), at real models' vocabularies: the loss
alone (evaluation) and the loss with its gradients (a training step's, timed together since
genfast computes the gradients during the forward). The roofline: the matrix products, one
forward and three with gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast

from .harness import Case, op_providers

# source: (tokens, hidden size, vocabulary, dtype, the device types it runs on)
SHAPES = {
    "gpt2-small 4x512": (2048, 768, 50257, torch.float32, ("cpu", "cuda")),
    "llama-3-8b 4x1024 bf16": (4096, 4096, 128256, torch.bfloat16, ("cuda",)),
}


def cross_entropy_case(source: str, direction: str) -> Case:
    tokens, H, V, dtype, devices = SHAPES[source]

    def make_inputs(device: torch.device) -> dict:
        return {
            "input": torch.randn(tokens, H, device=device, dtype=dtype),
            "weight": torch.randn(V, H, device=device, dtype=dtype) / H**0.5,
            "target": torch.randint(0, V, (tokens,), device=device),
        }

    products = 1 if direction == "forward" else 3
    element = dtype.itemsize
    return Case(f"{source} x {V}", "linear_cross_entropy", direction, tokens * V,
                make_inputs, (tokens * H + V * H) * element * products, products * 2 * tokens * H * V,
                quick=source.startswith("gpt2"), variant=str(dtype).removeprefix("torch."), devices=devices)


CASES = [cross_entropy_case(source, direction) for source in SHAPES for direction in ("forward", "forward+backward")]


def _genfast(input, weight, target):
    return genfast.ops.linear_cross_entropy(input, weight, target)


def _torch(input, weight, target):
    return F.cross_entropy(F.linear(input, weight).float(), target)


def providers(device_type: str):
    return op_providers(device_type, _genfast, _torch)
