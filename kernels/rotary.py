"""Rotary position embedding as a Triton kernel and its launcher. The formula:
genfast/reference/rotary.py; the arguments: csrc/cpu/rotary.h, whose map and
transposed map (the backward) this kernel computes too.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_embedding_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, D, R,
    x_stride_b, x_stride_s, x_stride_h, out_stride_b, out_stride_s, out_stride_h, table_stride_b,
    TRANSPOSE: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    """Rotates the BLOCK_H heads of position (b, s) by that position's (cos, sin) row.

    out1 = x1 cos1 - x2 sin1 and out2 = x2 cos2 + x1 sin2 over the halves of
    the first R dimensions (TRANSPOSE: out1 = x1 cos1 + x2 sin2, out2 = x2
    cos2 - x1 sin1); with COPY_REST, dimensions R..D are copied. Reads x's rows
    and one row of each table; writes out's rows (out may be x).
    """
    bs = tl.program_id(0)
    b = (bs // S).to(tl.int64)
    s = (bs % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    half = R // 2
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    table = b * table_stride_b + s * R
    compute = cos_ptr.dtype.element_ty
    cos1 = tl.load(cos_ptr + table + cols, mask=col_mask)[None, :]
    cos2 = tl.load(cos_ptr + table + half + cols, mask=col_mask)[None, :]
    sin1 = tl.load(sin_ptr + table + cols, mask=col_mask)[None, :]
    sin2 = tl.load(sin_ptr + table + half + cols, mask=col_mask)[None, :]
    if TRANSPOSE:
        sin1, sin2 = -sin2, -sin1
    mask = (heads < H)[:, None] & col_mask[None, :]
    x_rows = x_ptr + b * x_stride_b + s * x_stride_s + heads[:, None].to(tl.int64) * x_stride_h
    out_rows = out_ptr + b * out_stride_b + s * out_stride_s + heads[:, None].to(tl.int64) * out_stride_h
    x1 = tl.load(x_rows + cols[None, :], mask=mask).to(compute)
    x2 = tl.load(x_rows + half + cols[None, :], mask=mask).to(compute)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_rows + cols[None, :], (x1 * cos1 - x2 * sin1).to(out_dtype), mask=mask)
    tl.store(out_rows + half + cols[None, :], (x2 * cos2 + x1 * sin2).to(out_dtype), mask=mask)
    if COPY_REST:
        rest = R + tl.arange(0, BLOCK_REST)
        rest_mask = (heads < H)[:, None] & (rest < D)[None, :]
        tl.store(out_rows + rest[None, :], tl.load(x_rows + rest[None, :], mask=rest_mask), mask=rest_mask)


def rotary_embedding(x, cos, sin, out, transpose: bool):
    """Writes into out (B, S, H, D) the rotation of x (same shape, last dimensions contiguous,
    out may be x, or None for a new tensor laid out as x) and returns out; cos, sin: contiguous
    (1 or B, S, R) in x's math dtype."""
    out = torch.empty_like(x) if out is None else out
    B, S, H, D = x.shape
    R = cos.shape[2]
    block_h = min(triton.next_power_of_2(H), 16)
    same = x.data_ptr() == out.data_ptr()
    _rotary_embedding_kernel[(B * S, triton.cdiv(H, block_h))](
        x, cos, sin, out, S, H, D, R, *x.stride()[:3], *out.stride()[:3], 0 if cos.shape[0] == 1 else S * R,
        TRANSPOSE=transpose, COPY_REST=R < D and not same, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(max(R // 2, 1)), BLOCK_REST=triton.next_power_of_2(max(D - R, 1)),
    )
    return out
