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


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The normalised input: x, or x + residual rounded to x's dtype, as an unfused `x + residual` is."""
    return x if residual is None else x + residual


def layer_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(h - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape) dimensions.

    h is x, or x + residual; with a residual, returns (y, h), h being what the
    next block adds to (a pre-norm transformer's residual stream). var is the
    biased variance; fp16/bf16 are computed in fp32, as torch does.
    """
    h = _add_residual(x, residual)
    dims = tuple(range(-len(normalized_shape), 0))
    z = h.to(_math_dtype(x))
    mean = z.mean(dim=dims, keepdim=True)
    var = (z - mean).square().mean(dim=dims, keepdim=True)
    z = (z - mean) / torch.sqrt(var + eps)
    if weight is not None:
        z = z * weight.to(z.dtype)
    if bias is not None:
        z = z + bias.to(z.dtype)
    y = z.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """h / sqrt(mean(h^2) + eps) * weight over the last len(normalized_shape) dimensions.

    h and the residual's output as in layer_norm. eps None means
    torch.finfo(x.dtype).eps, as in torch.nn.functional.rms_norm.
    """
    h = _add_residual(x, residual)
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    z = h.to(_math_dtype(x))
    z = z / torch.sqrt(z.square().mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        z = z * weight.to(z.dtype)
    y = z.to(x.dtype)
    return y if residual is None else (y, h)
