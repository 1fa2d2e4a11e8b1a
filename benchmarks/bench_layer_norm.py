"""LayerNorm and RMSNorm over a transformer's hidden size, alone and with the
residual add that precedes them in a pre-norm block (``h = h + attn(...);
y = norm(h)``).

Shapes: the issue's GPT-style LM (batch 4, sequence 512, width 768, as
GPT-2 small) and a Llama-7B width (one 2048-token sequence, width 4096).
Backward differentiates x, the residual, weight and bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import genfast
from genfast.reference import norm as reference

from .harness import Case, Provider, cuda_peer, op_providers

EPS = 1e-5
SHAPES = {"gpt2-small": (4, 512, 768), "llama-7b": (1, 2048, 4096)}


def norm_cases(source: str, kind: str, *, residual: bool, dtype=torch.float32, quick=False, devices=("cpu", "cuda")):
    shape = SHAPES[source]
    width = shape[-1]
    variant = str(dtype).removeprefix("torch.") + (" +residual" if residual else "")

    def make_inputs(device: torch.device) -> dict:
        return {
            "kind": kind,
            "x": torch.randn(shape, device=device, dtype=dtype),
            "residual": torch.randn(shape, device=device, dtype=dtype) if residual else None,
            "weight": 1 + 0.1 * torch.randn(width, device=device, dtype=dtype),
            "bias": 0.1 * torch.randn(width, device=device, dtype=dtype) if kind == "layer" else None,
        }

    tensor = math.prod(shape) * dtype.itemsize
    # Forward reads x (and the residual) and writes y (and h); backward reads dy and h, writes dx.
    traffic = {"forward": (4 if residual else 2) * tensor, "backward": 3 * tensor}
    return [
        Case(f"{source} {'x'.join(map(str, shape))} {variant}", f"{kind}_norm", direction, math.prod(shape), make_inputs,
             traffic[direction], quick=quick, variant=variant, devices=devices)
        for direction in ("forward", "backward")
    ]


CASES = [
    case
    for kind in ("layer", "rms")
    for source in SHAPES
    for residual in (False, True)
    for case in norm_cases(source, kind, residual=residual, quick=source == "gpt2-small")
] + [
    case
    for kind in ("layer", "rms")
    for case in norm_cases("llama-7b", kind, residual=True, dtype=torch.bfloat16, devices=("cuda",))
]


def _genfast(kind, x, residual, weight, bias):
    if kind == "rms":
        out = genfast.ops.rms_norm(x, weight.shape, weight, EPS, residual)
    else:
        out = genfast.ops.layer_norm(x, weight.shape, weight, bias, EPS, residual)
    return out if residual is None else out[0]


def _torch(kind, x, residual, weight, bias):
    """What a transformer runs today: the residual add, then torch's norm."""
    h = x if residual is None else x + residual
    return F.rms_norm(h, weight.shape, weight, EPS) if kind == "rms" else F.layer_norm(h, weight.shape, weight, bias, EPS)


def _reference(kind, x, residual, weight, bias):
    if kind == "rms":
        out = reference.rms_norm(x, weight.shape, weight, EPS, residual)
    else:
        out = reference.layer_norm(x, weight.shape, weight, bias, EPS, residual)
    return out if residual is None else out[0]


def _load_liger():
    """Liger-Kernel's Triton norms (they fuse no residual add: the add runs eagerly)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    def liger(kind, x, residual, weight, bias):
        h = x if residual is None else x + residual
        if kind == "rms":
            return LigerRMSNormFunction.apply(h, weight, EPS)
        return LigerLayerNormFunction.apply(h, weight, bias, EPS)

    return liger


def providers(device_type: str) -> list[Provider]:
    return [
        *op_providers(device_type, _genfast, _torch, _reference),
        cuda_peer("liger", device_type, "Liger-Kernel", _load_liger),
    ]
