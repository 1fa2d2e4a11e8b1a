"""StyleGAN's minibatch standard deviation layer, the discriminator's view of a batch's variety:
x (N, C, H, W) gains `num_channels` channels holding, for each group of `group_size` samples
(sample n is in group n mod N / G, G = min(group_size, N)), the standard deviation over the group
averaged over the channels (split in num_channels sets), height and width:

    s[m, f] = mean over (c, h, w) of sqrt(var over g of x[g M + m, f C / F + c, h, w] + 1e-8)

with M = N / G, and out = cat(x, s broadcast to every sample of the group and every pixel).
"""

import torch

EPS = 1e-8


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, num_channels: int = 1) -> torch.Tensor:
    """fp16/bf16 are computed in fp32 and rounded once."""
    n, c, h, w = x.shape
    group = min(group_size, n)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(compute).reshape(group, -1, num_channels, c // num_channels, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    stats = (y + EPS).sqrt().mean(dim=(2, 3, 4))  # (M, F)
    stats = stats.reshape(-1, num_channels, 1, 1).repeat(group, 1, h, w)
    return torch.cat([x, stats.to(x.dtype)], dim=1)


def minibatch_stddev_backward(dout: torch.Tensor, x: torch.Tensor, group_size: int = 4,
                              num_channels: int = 1) -> torch.Tensor:
    """The gradient for x, as torch ops (so differentiable again): dout's first C channels, plus
    each statistic's gradient dstat spread over its elements, d stat / d x = (x - mean) / (run G std)
    with run = C / F x H x W the elements each sample gives the statistic."""
    n, c, h, w = x.shape
    group = min(group_size, n)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(compute).reshape(group, -1, num_channels, c // num_channels, h, w)
    deviation = y - y.mean(dim=0)
    stddev = (deviation.square().mean(dim=0) + EPS).sqrt()
    dstat = dout[:, c:].to(compute).sum(dim=(2, 3)).reshape(group, -1, num_channels).sum(dim=0)  # (M, F)
    run = c // num_channels * h * w
    spread = dstat[None, :, :, None, None, None] * deviation / (run * group * stddev)
    return (dout[:, :c].to(compute) + spread.reshape(n, c, h, w)).to(x.dtype)
