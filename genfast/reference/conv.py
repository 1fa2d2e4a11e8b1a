"""2-D convolution, the spec of genfast.ops.conv2d: torch's own, after an optional
nearest-neighbour upsampling of the input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """x (N, C, H, W) or (C, H, W) with each pixel repeated factor x factor times: what
    ``F.interpolate(x, scale_factor=factor)`` does to a batch."""
    if factor == 1:
        return x
    batch = x[None] if x.dim() == 3 else x
    return F.interpolate(batch, scale_factor=factor, mode="nearest").view(
        *x.shape[:-2], factor * x.shape[-2], factor * x.shape[-1]
    )


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    upsample: int = 1,
) -> Tensor:
    """``F.conv2d`` of input upsampled ``upsample`` times by nearest neighbours."""
    return F.conv2d(upsample_nearest(input, upsample), weight, bias, stride, padding, dilation, groups)
