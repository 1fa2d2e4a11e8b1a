"""Convolution modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import conv


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d whose 3x3 stride-1 float32 convolutions on the CPU run genfast's
    Winograd kernel (genfast.ops.conv2d). Parameters and state_dict are torch's.

    The kernel's transformed filters are kept between calls and made again when the weight
    changes (an optimizer step, load_state_dict): at 256 to 128 channels they take 2 MB, and
    making them costs a third of a call on a 2-core CPU.
    """

    _filters: tuple[tuple[int, int, torch.device], Tensor] | None = None

    def _winograd_filters(self, weight: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or weight is not self.weight:
            return conv.winograd_filters(weight)
        key = (weight._version, weight.data_ptr(), weight.device)
        if self._filters is None or self._filters[0] != key:
            self._filters = (key, conv.winograd_filters(weight))
        return self._filters[1]

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                           filters=self._winograd_filters)
