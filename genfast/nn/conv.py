"""Convolution modules."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from ..ops import conv


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d whose 3x3 stride-1 float32 convolutions on the CPU run genfast's
    Winograd kernel (genfast.ops.conv2d). Parameters and state_dict are torch's.

    ``conv(x)`` is torch's; ``conv(x, upsample=2)`` is ``conv(F.interpolate(x, scale_factor=2))``,
    diffusers' Upsample2D, with the upsampling fused into the kernel's reads; ``conv(x,
    residual=r)`` is ``conv(x) + r``, added as the kernel writes (genfast.ops.conv2d).

    The kernel's transformed filters are kept between calls and made again when the weight
    changes (an optimizer step, load_state_dict): at 256 to 128 channels they take 2 MB, and
    making them took 340 us on a 2-core Xeon, where the convolution of a 4 x 256 x 8 x 8 input
    takes 380-450.
    """

    # (the weight they were made from, its version counter then, the filters)
    _filters: tuple[weakref.ref, int, Tensor] | None = None

    def _winograd_filters(self, weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return conv.winograd_filters(weight)
        if self._filters is None or self._filters[0]() is not weight or self._filters[1] != weight._version:
            self._filters = (weakref.ref(weight), weight._version, conv.winograd_filters(weight))
        return self._filters[2]

    def forward(self, input: Tensor, upsample: int = 1, residual: Tensor | None = None) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = reference.conv.upsample_nearest(input, upsample)
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding, upsample = 0, 1
        return conv.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                           upsample=upsample, residual=residual, filters=self._winograd_filters)
