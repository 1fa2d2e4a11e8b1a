"""Normalisation layers."""

import torch

from .activation import activate


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """act((x - mean) / sqrt(var + eps) * weight + bias), statistics per (sample, group).

    x is (N, C, *spatial); group g holds channels [g*C/G, (g+1)*C/G). var is
    the biased variance. fp16/bf16 inputs are computed in fp32, as torch does.
    """
    input_dtype = x.dtype
    compute_dtype = torch.float32 if input_dtype in (torch.float16, torch.bfloat16) else input_dtype
    x = x.to(compute_dtype)
    n, c = x.shape[:2]
    groups = x.reshape(n, num_groups, x.shape[1:].numel() // num_groups)
    mean = groups.mean(dim=-1)
    var = (groups - mean.unsqueeze(-1)).square().mean(dim=-1)
    spatial_ones = (1,) * (x.dim() - 2)

    def per_channel(stat: torch.Tensor) -> torch.Tensor:  # (N, G) -> (N, C, 1, ...)
        return stat.repeat_interleave(c // num_groups, dim=1).reshape(n, c, *spatial_ones)

    z = (x - per_channel(mean)) / torch.sqrt(per_channel(var) + eps)
    if weight is not None:
        z = z * weight.to(compute_dtype).reshape(c, *spatial_ones)
    if bias is not None:
        z = z + bias.to(compute_dtype).reshape(c, *spatial_ones)
    return activate(z, activation).to(input_dtype)
