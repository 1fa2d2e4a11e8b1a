"""GroupNorm + SiLU, as every ResNet block of Stable Diffusion's U-Net and VAE runs it.

The headline case is the U-Net's first stage at batch 8, (8, 320, 64, 64) with
32 groups, forward and backward (the gradients of x, weight and bias). The
full suite adds the other Stable Diffusion shapes, a sweep of the spatial size
at 320 channels, channels_last, and bf16 on GPUs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import genfast
from genfast.reference.activation import activate
from genfast.reference.norm import group_norm as reference_group_norm

from .harness import Case, Provider, Unsupported, cuda_peer, op_providers

GROUPS = 32  # what Stable Diffusion uses everywhere
EPS = 1e-5


def group_norm_cases(
    source: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    quick: bool = False,
    devices: tuple[str, ...] = ("cpu", "cuda"),
) -> list[Case]:
    """The forward and backward cases of GroupNorm(32) + SiLU on an input of shape."""
    channels = shape[1]
    variant = str(dtype).removeprefix("torch.") + (" channels_last" if channels_last else "")
    name = f"{source} {'x'.join(map(str, shape))}" + (f" {variant}" if variant != "float32" else "")

    def make_inputs(device: torch.device) -> dict:
        x = torch.randn(shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = 1 + 0.1 * torch.randn(channels, device=device, dtype=dtype)
        bias = 0.1 * torch.randn(channels, device=device, dtype=dtype)
        return {"x": x, "weight": weight, "bias": bias, "num_groups": GROUPS, "activation": "silu"}

    tensor_bytes = math.prod(shape) * dtype.itemsize
    param_bytes = channels * dtype.itemsize
    # Forward reads x, weight, bias and writes y; backward reads x, dy, weight and writes dx, dweight, dbias.
    traffic = {"forward": 2 * tensor_bytes + 2 * param_bytes, "backward": 3 * tensor_bytes + 3 * param_bytes}
    return [
        Case(
            name,
            "group_norm",
            direction,
            math.prod(shape),
            make_inputs,
            traffic[direction],
            quick=quick,
            variant=variant,
            devices=devices,
        )
        for direction in ("forward", "backward")
    ]


CASES = [
    *group_norm_cases("sd-unet", (8, 320, 64, 64), quick=True),
    *group_norm_cases("sd-unet", (8, 320, 64, 64), channels_last=True),
    *group_norm_cases("sd-unet", (8, 320, 64, 64), dtype=torch.bfloat16, devices=("cuda",)),
    *group_norm_cases("sd-unet", (8, 320, 64, 64), dtype=torch.bfloat16, channels_last=True, devices=("cuda",)),
    *group_norm_cases("sd-unet", (2, 1280, 8, 8)),
    *group_norm_cases("sd-vae", (1, 128, 256, 256)),
    *(case for side in (16, 32, 128) for case in group_norm_cases("sweep", (8, 320, side, side))),
]


def _genfast(x, weight, bias, num_groups, activation):
    return genfast.ops.group_norm(x, num_groups, weight, bias, EPS, activation)


def _torch(x, weight, bias, num_groups, activation):
    """What users run today: PyTorch's own group_norm kernel, then the activation."""
    return activate(F.group_norm(x, num_groups, weight, bias, EPS), activation)


def _reference(x, weight, bias, num_groups, activation):
    return reference_group_norm(x, num_groups, weight, bias, EPS, activation)


def _load_liger():
    """Liger-Kernel's Triton GroupNorm, followed by an eager SiLU (it fuses none)."""
    from liger_kernel.ops.group_norm import LigerGroupNormFunction

    def liger(x, weight, bias, num_groups, activation):
        n, c = x.shape[:2]
        # Liger's backward takes the last dimension for the whole per-channel extent: give it (N, C, H*W).
        y = LigerGroupNormFunction.apply(x.reshape(n, c, -1), weight, bias, c, num_groups, EPS)
        return activate(y.view(x.shape), activation)

    return liger


def _load_apex():
    """NVIDIA apex's fused NHWC GroupNorm + SiLU (apex.contrib.group_norm)."""
    from apex.contrib.group_norm.group_norm import group_norm_nhwc_fprop

    def apex(x, weight, bias, num_groups, activation):
        if not x.is_contiguous(memory_format=torch.channels_last):
            raise Unsupported("apex's group norm takes channels_last tensors only")
        # apex's GroupNorm module switches to its two-pass kernel past 1024 pixels on sm80+; the function asks.
        passes = 2 if math.prod(x.shape[2:]) > 1024 else 1
        y, _sums = group_norm_nhwc_fprop(x, num_groups, weight, bias, EPS, activation or "", passes)
        return y

    return apex


def providers(device_type: str) -> list[Provider]:
    return [
        *op_providers(device_type, _genfast, _torch, _reference),
        cuda_peer("liger", device_type, "Liger-Kernel", _load_liger),
        cuda_peer("apex", device_type, "apex with its group_norm extension", _load_apex),
    ]
