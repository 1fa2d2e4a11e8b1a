"""A language model's loss: cross-entropy over the logits of a linear layer, the
specification of genfast.ops.linear_cross_entropy.

For each row i of input with target t_i, over the logits z = input_i @ weight^T + bias:
    loss_i = logsumexp(z) - (1 - s) * z[t_i] - s * mean(z)
with label smoothing s, and loss_i = 0 where t_i is ignore_index. The mean divides by the
number of rows not ignored. The logits are rounded to input's dtype, as F.linear's are; the
loss is computed in float32 (float64 for float64 input) and returned in input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """F.cross_entropy(F.linear(input, weight, bias), target, ...) with input (..., H),
    weight (V, H), target (...) of class indices; the loss of each row for reduction="none"."""
    logits = F.linear(input, weight, bias)
    math_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    loss = F.cross_entropy(
        logits.reshape(-1, weight.shape[0]).to(math_dtype),
        target.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return (loss.view(target.shape) if reduction == "none" else loss).to(input.dtype)
