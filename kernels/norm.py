"""Normalisation Triton kernels and their launchers: GroupNorm (+ SiLU), and
LayerNorm and RMSNorm (+ residual) over the last dimension.

GroupNorm views x as (N, C, S), S the flattened spatial size, through three
strides, so one kernel serves channels-first (S-contiguous) and channels-last
(C-contiguous) tensors. One program owns one (sample, group) and walks it in
[BLOCK_C, BLOCK_S] tiles. Statistics accumulate x - K in float32 (float64 for
float64 inputs) with K the group's first value, so a large mean cannot cancel
the variance away. eps is a constexpr: a float argument reaches a kernel in
float32, 2.5e-9 off in a float64 norm of a near-constant group.
"""

import torch
import triton
import triton.language as tl

from .activation import silu, silu_backward

_TILE = 2048  # values per [BLOCK_C, BLOCK_S] tile


@triton.jit
def _tile(base, c0, s0, cpg, S, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the tile at channel c0, position s0 of a group."""
    cs = c0 + tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    offsets = base + cs[:, None].to(tl.int64) * stride_c + ss[None, :].to(tl.int64) * stride_s
    mask = (cs < cpg)[:, None] & (ss < S)[None, :]
    return offsets, mask


@triton.jit
def _group_norm_forward_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr,
    S, cpg, groups, stride_n, stride_c, stride_s, EPS: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """y = act((x - mean) * rstd * weight + bias) for the group of program (n, g).

    Fuses statistics, normalisation, affine and activation. Reads the group's
    x twice (statistics, then the output pass) and its weight and bias; writes
    y and mean[n, g], rstd[n, g] (the float dtype of mean_ptr).
    """
    pid = tl.program_id(0)
    g = pid % groups
    acc_dtype = mean_ptr.dtype.element_ty
    base = (pid // groups).to(tl.int64) * stride_n + (g * cpg).to(tl.int64) * stride_c
    pivot = tl.load(x_ptr + base).to(acc_dtype)

    total = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    total_sq = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
    for c0 in range(0, cpg, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            offsets, mask = _tile(base, c0, s0, cpg, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
            d = tl.where(mask, tl.load(x_ptr + offsets, mask=mask).to(acc_dtype) - pivot, 0)
            total += d
            total_sq += d * d
    # The moments in float64, as the C++ kernel finishes them: a float32 square of a mean near
    # 1e20 would overflow to inf - inf = NaN where the variance is merely huge (rstd 0). A NaN
    # from an infinite x must survive the clamp, as std::max and torch let it.
    count = cpg * S
    shift_mean = tl.sum(tl.sum(total, axis=1), axis=0).to(tl.float64) / count
    var = tl.maximum(tl.sum(tl.sum(total_sq, axis=1), axis=0).to(tl.float64) / count - shift_mean * shift_mean, 0,
                     propagate_nan=tl.PropagateNan.ALL)
    mean = (pivot + shift_mean).to(acc_dtype)
    rstd = (1 / tl.sqrt(var + EPS)).to(acc_dtype)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)

    for c0 in range(0, cpg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        weight = tl.load(weight_ptr + g * cpg + cs, mask=cs < cpg)
        scale = (weight * rstd)[:, None]
        bias = tl.load(bias_ptr + g * cpg + cs, mask=cs < cpg)[:, None]
        for s0 in range(0, S, BLOCK_S):
            offsets, mask = _tile(base, c0, s0, cpg, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
            # Centred before scaling: the folded x * scale + (bias - mean * scale) rounds at
            # |mean| * scale, which rstd (up to 1/sqrt(eps)) can make dwarf a near-constant
            # group's output. The extra subtraction is free in a pass bound by memory.
            z = (tl.load(x_ptr + offsets, mask=mask).to(acc_dtype) - mean) * scale + bias
            if SILU:
                z = silu(z)
            tl.store(y_ptr + offsets, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_backward_kernel(
    dy_ptr, x_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, dx_ptr, sum_dz_ptr, sum_dz_xhat_ptr,
    C, S, cpg, groups, stride_n, stride_c, stride_s,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = rstd * (w * dz - mean_g(w * dz) - xhat * mean_g(w * dz * xhat)) for group (n, g).

    dz is dy through the activation, recomputed from x in both passes rather
    than stored. Reads the group's x and dy twice, weight, bias, mean, rstd;
    writes dx and the per-(n, c) sums of dz and dz * xhat, which the launcher
    reduces over n into the bias and weight gradients.
    """
    pid = tl.program_id(0)
    n = pid // groups
    g = pid % groups
    acc_dtype = mean_ptr.dtype.element_ty
    base = n.to(tl.int64) * stride_n + (g * cpg).to(tl.int64) * stride_c
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)

    sum_wdz = tl.zeros([BLOCK_C], acc_dtype)
    sum_wdz_xhat = tl.zeros([BLOCK_C], acc_dtype)
    for c0 in range(0, cpg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        weight = tl.load(weight_ptr + g * cpg + cs, mask=cs < cpg, other=0)
        bias = tl.load(bias_ptr + g * cpg + cs, mask=cs < cpg, other=0)
        dz_rows = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
        dz_xhat_rows = tl.zeros([BLOCK_C, BLOCK_S], acc_dtype)
        for s0 in range(0, S, BLOCK_S):
            offsets, mask = _tile(base, c0, s0, cpg, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
            xhat = (tl.load(x_ptr + offsets, mask=mask).to(acc_dtype) - mean) * rstd
            dz = tl.load(dy_ptr + offsets, mask=mask).to(acc_dtype)
            if SILU:
                dz = silu_backward(xhat * weight[:, None] + bias[:, None], dz)
            dz = tl.where(mask, dz, 0)
            dz_rows += dz
            dz_xhat_rows += dz * xhat
        sum_dz = tl.sum(dz_rows, axis=1)
        sum_dz_xhat = tl.sum(dz_xhat_rows, axis=1)
        tl.store(sum_dz_ptr + n * C + g * cpg + cs, sum_dz, mask=cs < cpg)
        tl.store(sum_dz_xhat_ptr + n * C + g * cpg + cs, sum_dz_xhat, mask=cs < cpg)
        sum_wdz += weight * sum_dz
        sum_wdz_xhat += weight * sum_dz_xhat
    count = cpg * S
    mean_wdz = tl.sum(sum_wdz, axis=0) / count
    mean_wdz_xhat = tl.sum(sum_wdz_xhat, axis=0) / count

    for c0 in range(0, cpg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        weight = tl.load(weight_ptr + g * cpg + cs, mask=cs < cpg, other=0)[:, None]
        bias = tl.load(bias_ptr + g * cpg + cs, mask=cs < cpg, other=0)[:, None]
        for s0 in range(0, S, BLOCK_S):
            offsets, mask = _tile(base, c0, s0, cpg, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
            xhat = (tl.load(x_ptr + offsets, mask=mask).to(acc_dtype) - mean) * rstd
            dz = tl.load(dy_ptr + offsets, mask=mask).to(acc_dtype)
            if SILU:
                dz = silu_backward(xhat * weight + bias, dz)
            dx = rstd * (weight * dz - mean_wdz - xhat * mean_wdz_xhat)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(x: torch.Tensor, groups: int):
    """(S, cpg, strides of the (N, C, S) view, BLOCK_C, BLOCK_S) for a dense x."""
    n, c = x.shape[:2]
    spatial = x.numel() // (n * c)
    stride_s = x.stride(-1) if x.dim() > 2 else 1
    cpg = c // groups
    block_c = min(triton.next_power_of_2(cpg), 64)
    block_s = min(triton.next_power_of_2(spatial), max(1, _TILE // block_c))
    return spatial, cpg, (x.stride(0), x.stride(1), stride_s), block_c, block_s


def group_norm_forward(x, weight, bias, groups: int, eps: float, silu: bool):
    """(y, mean, rstd) for a dense, non-empty x; weight, bias and the returned
    statistics are in x's math dtype (float32, or float64 for float64 x)."""
    spatial, cpg, strides, block_c, block_s = _geometry(x, groups)
    y = torch.empty_like(x)
    mean = x.new_empty((x.shape[0], groups), dtype=weight.dtype)
    rstd = torch.empty_like(mean)
    _group_norm_forward_kernel[(x.shape[0] * groups,)](
        x, weight, bias, y, mean, rstd, spatial, cpg, groups, *strides, EPS=eps,
        SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return y, mean, rstd


def group_norm_backward(dy, x, weight, bias, mean, rstd, groups: int, silu: bool):
    """(dx, dweight, dbias); dy is laid out like x."""
    spatial, cpg, strides, block_c, block_s = _geometry(x, groups)
    dx = torch.empty_like(x)
    sum_dz = x.new_empty(x.shape[:2], dtype=weight.dtype)
    sum_dz_xhat = torch.empty_like(sum_dz)
    _group_norm_backward_kernel[(x.shape[0] * groups,)](
        dy, x, weight, bias, mean, rstd, dx, sum_dz, sum_dz_xhat, x.shape[1], spatial, cpg, groups, *strides,
        SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s,
    )
    return dx, sum_dz_xhat.sum(0), sum_dz.sum(0)


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, D, EPS: tl.constexpr,
    RMS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = (h - mean) * rstd * weight + bias for one row, h = x (+ residual).

    RMSNorm (RMS) drops the centring and the bias: y = h * rstd * weight, with
    rstd = 1 / sqrt(mean(h^2) + eps). Fuses the residual add, the statistics
    (two passes over the row held in registers), the normalisation and the
    affine. Reads the row of x (and residual), weight, bias; writes y (and h
    rounded to x's dtype, which is what is normalised), mean and rstd.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offsets = row * D + cols
    acc_dtype = mean_ptr.dtype.element_ty
    h = tl.load(x_ptr + offsets, mask=mask, other=0)
    if RESIDUAL:
        h = (h.to(acc_dtype) + tl.load(residual_ptr + offsets, mask=mask, other=0).to(acc_dtype)).to(h.dtype)
        tl.store(h_ptr + offsets, h, mask=mask)
    v = h.to(acc_dtype)
    if RMS:
        mean = tl.sum(v, axis=0) * 0
        centred = v
    else:
        # Centred on the row's first value (exact for values near it), so a row far from 0
        # keeps the digits its rounded mean would lose.
        pivot = tl.sum(tl.where(cols == 0, v, 0), axis=0)
        d = tl.where(mask, v - pivot, 0)
        shift = tl.sum(d, axis=0) / D
        mean = pivot + shift
        centred = tl.where(mask, d - shift, 0)
    rstd = 1 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + EPS)
    y = centred * rstd * tl.load(weight_ptr + cols, mask=mask)
    if not RMS:
        y += tl.load(bias_ptr + cols, mask=mask)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_backward_kernel(
    dy_ptr, dh_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, partials_ptr, rows, D, rows_per_program,
    RMS: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh), g = dy * weight, for a block of rows.

    RMSNorm has no mean(g) term. Reads the rows of dy, h (and dh), weight and
    the rows' statistics; writes dx and this program's sums of dy * xhat and
    dy over its rows into partials[program, 0 or 1, :], which the launcher
    reduces into the weight and bias gradients.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc_dtype = mean_ptr.dtype.element_ty
    weight = tl.load(weight_ptr + cols, mask=mask, other=0)
    dweight = tl.zeros([BLOCK_D], acc_dtype)
    dbias = tl.zeros([BLOCK_D], acc_dtype)
    first = pid * rows_per_program
    row_start = first.to(tl.int64) * D
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        offsets = row_start + cols
        row_start += D
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (tl.load(h_ptr + offsets, mask=mask, other=0).to(acc_dtype) - mean) * rstd, 0)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        g = dy * weight
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / D)
        if not RMS:
            dx -= tl.sum(g, axis=0) / D
        dx *= rstd
        if DH:
            dx += tl.load(dh_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dweight += dy * xhat
        dbias += dy
    tl.store(partials_ptr + pid * 2 * D + cols, dweight, mask=mask)
    tl.store(partials_ptr + (pid * 2 + 1) * D + cols, dbias, mask=mask)


def layer_norm_forward(x, residual, weight, bias, eps: float, rms: bool):
    """(y, h, mean, rstd) for a contiguous, non-empty x normalised over its last dimension D; h
    is empty without a residual; weight, bias and the statistics (one per row) are in x's math dtype."""
    D = x.shape[-1]
    rows = x.numel() // D
    y = torch.empty_like(x)
    h = x.new_empty(0) if residual is None else torch.empty_like(x)
    mean = x.new_empty(rows, dtype=weight.dtype)
    rstd = torch.empty_like(mean)
    _layer_norm_forward_kernel[(rows,)](
        x, residual, weight, bias, y, h, mean, rstd, D, EPS=eps,
        RMS=rms, RESIDUAL=residual is not None, BLOCK_D=triton.next_power_of_2(D),
    )
    return y, h, mean, rstd


def _backward_programs(rows: int, device: torch.device) -> int:
    """Programs for the backward: a few per SM on a GPU, each summing its own weight-gradient rows."""
    if device.type != "cuda":
        return min(rows, 4)
    return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def layer_norm_backward(dy, dh, h, weight, mean, rstd, rms: bool):
    """(dx, dweight, dbias); dy and dh are contiguous like h."""
    D = h.shape[-1]
    rows = h.numel() // D
    programs = _backward_programs(rows, h.device)
    rows_per_program = triton.cdiv(rows, programs)
    dx = torch.empty_like(h)
    partials = h.new_empty((programs, 2, D), dtype=weight.dtype)
    _layer_norm_backward_kernel[(programs,)](
        dy, dh, h, weight, mean, rstd, dx, partials, rows, D, rows_per_program,
        RMS=rms, DH=dh is not None, BLOCK_D=triton.next_power_of_2(D),
    )
    return dx, partials[:, 0].sum(0), partials[:, 1].sum(0)  # not views of one tensor: outputs may not alias
