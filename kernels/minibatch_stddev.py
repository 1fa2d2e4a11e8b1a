"""StyleGAN's minibatch standard deviation layer as Triton kernels. Formula:
genfast/reference/minibatch_stddev.py. Sample n = g M + m is member g of group m; the run of
(m, f) is the C / F x H x W elements channel set f holds in a sample, contiguous in x.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 512
_EPS = tl.constexpr(1e-8)  # a global a kernel reads must be a constexpr (the interpreter would take any)


@triton.jit
def _group_moments(x_ptr, base, positions, mask, sample_stride, GROUP: tl.constexpr, COMPUTE: tl.constexpr):
    """Mean and standard deviation over the group, position by position."""
    mean = tl.zeros(positions.shape, COMPUTE)
    for g in tl.static_range(GROUP):
        mean += tl.load(x_ptr + base + g * sample_stride + positions, mask=mask, other=0).to(COMPUTE)
    mean = mean / GROUP
    variance = tl.zeros(positions.shape, COMPUTE)
    for g in tl.static_range(GROUP):
        d = tl.load(x_ptr + base + g * sample_stride + positions, mask=mask, other=0).to(COMPUTE) - mean
        variance += d * d
    return mean, tl.sqrt(variance / GROUP + _EPS)


@triton.jit
def _statistics_kernel(x_ptr, stats_ptr, members, sets, sample_channels_hw, run,
                       GROUP: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """Reads the group's runs of (m, f) = program (m * sets + f); writes stats[m, f], the mean of
    the standard deviations over them."""
    task = tl.program_id(0)
    m, f = task // sets, task % sets
    base = m.to(tl.int64) * sample_channels_hw + f * run
    total = tl.zeros((BLOCK,), COMPUTE)
    for first in range(0, run, BLOCK):
        positions = first + tl.arange(0, BLOCK)
        mask = positions < run
        _, stddev = _group_moments(x_ptr, base, positions, mask, members * sample_channels_hw, GROUP, COMPUTE)
        total += tl.where(mask, stddev, 0.0)
    tl.store(stats_ptr + task, tl.sum(total, axis=0) / run)


@triton.jit
def _backward_kernel(x_ptr, dout_ptr, dstat_ptr, dx_ptr, members, sets, sample_channels_hw, run, out_sample,
                     GROUP: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    """For one BLOCK of the run of (m, f): reads x and dout there and dstat[m, f]; writes
    dx = dout + dstat (x - mean) / (run G stddev) for each member of the group."""
    task = tl.program_id(0)
    m, f = task // sets, task % sets
    positions = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = positions < run
    base = m.to(tl.int64) * sample_channels_hw + f * run
    mean, stddev = _group_moments(x_ptr, base, positions, mask, members * sample_channels_hw, GROUP, COMPUTE)
    scale = tl.load(dstat_ptr + task).to(COMPUTE) / (run * GROUP)
    for g in tl.static_range(GROUP):
        sample = g * members + m
        x = tl.load(x_ptr + sample.to(tl.int64) * sample_channels_hw + f * run + positions, mask=mask).to(COMPUTE)
        d = tl.load(dout_ptr + sample.to(tl.int64) * out_sample + f * run + positions, mask=mask).to(COMPUTE)
        dx = d + scale * (x - mean) / stddev
        tl.store(dx_ptr + sample.to(tl.int64) * sample_channels_hw + f * run + positions,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x, group: int, channels: int) -> dict:
    n, c, h, w = x.shape
    return {"members": n // group, "sets": channels, "sample_channels_hw": c * h * w, "run": c // channels * h * w}


def _compute(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _sum_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def minibatch_stddev_forward(x, group: int, channels: int):
    """cat(x, the statistics of its groups); x contiguous (N, C, H, W)."""
    n, c, h, w = x.shape
    layout = _layout(x, group, channels)
    stats = torch.empty(layout["members"] * channels, dtype=_sum_dtype(x), device=x.device)
    _statistics_kernel[(layout["members"] * channels,)](
        x, stats, *layout.values(), GROUP=group, COMPUTE=_compute(x), BLOCK=_BLOCK
    )
    broadcast = stats.to(x.dtype).view(1, -1, channels, 1, 1).expand(group, -1, -1, h, w).reshape(n, channels, h, w)
    return torch.cat([x, broadcast], dim=1)


def minibatch_stddev_backward(dout, x, group: int, channels: int):
    n, c, h, w = x.shape
    layout = _layout(x, group, channels)
    # Each statistic's gradient: its copies' over the group's samples and pixels, by torch.
    dstat = dout[:, c:].sum(dim=(2, 3), dtype=_sum_dtype(x)).view(group, -1).sum(0).contiguous()
    dx = torch.empty_like(x)
    grid = (layout["members"] * channels, triton.cdiv(layout["run"], _BLOCK))
    _backward_kernel[grid](x, dout, dstat, dx, *layout.values(), (c + channels) * h * w, GROUP=group,
                           COMPUTE=_compute(x), BLOCK=_BLOCK)
    return dx
