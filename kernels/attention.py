"""Scaled dot-product attention as Triton kernels, FlashAttention-2 style, and their
launchers. The formula: genfast/reference/attention.py; the arguments:
csrc/cpu/attention.h, whose forward and backward these compute too.

The forward keeps a block of queries on chip and streams the keys that block sees,
with an online softmax; it writes the output and each row's largest score and sum
of exponentials. The backward recomputes the scores as the forward computed them,
and the weights from those two (a log-sum-exp would round the sum away at scores
near 1e30): one kernel per block of keys accumulates dk and dv over the queries of
every query head that reads them (and writes the mask's gradient), another per
block of queries accumulates dq. Neither uses atomics, so results do not depend on
scheduling. Dropout's keep mask is recomputed from its seed wherever a tile of
weights is, never stored.
"""

import functools

import torch
import triton
import triton.language as tl

from ..reference.attention import dropout_threshold


@triton.jit
def _tanh(x):
    # exact at both ends: exp(2x) is 0 or inf there
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(
    q, k_t, rows, cols, S_Q, S_K, scale, softcap, slope, mask_rows, mask_stride_j, window_left, window_right,
    on_edge, MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    TRANSPOSED: tl.constexpr = False,
):
    """The scores of queries at positions `rows` and keys `cols` (keys from S_K on do not exist),
    -inf where masked out, and with a softcap c, tanh(products / c) (the backward's chain rule).
    q (M, D) and k_t (D, N) as loaded (zero-padded); slope a scalar or one per row (M, 1);
    mask_rows points at each query's mask entries (MASK_KIND 0: none, 1: bool keep, 2: added).
    The window and the ends of the queries and keys are applied only where on_edge (see
    _tile_split): a padding query's zeros times an infinite key are NaN, which the padding's
    zero weights would carry into dk and dv, sums over the queries (and likewise a padding
    key's into dq).

    TRANSPOSED: the transposed tile, keys by queries, from q = the keys (N, D), k_t = the
    queries transposed (D, M), rows = the keys' positions and cols = the queries'."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    squashed = s
    if HAS_SOFTCAP:
        squashed = _tanh(s / softcap)
        s = softcap * squashed
    i = cols[None, :] if TRANSPOSED else rows[:, None]
    j = rows[:, None] if TRANSPOSED else cols[None, :]
    if HAS_ALIBI:
        s -= slope * tl.abs(i - j).to(s.dtype)
    if MASK_KIND != 0:
        entries = (mask_rows[None, :] if TRANSPOSED else mask_rows[:, None]) + j.to(tl.int64) * mask_stride_j
        entry = tl.load(entries, mask=(i < S_Q) & (j < S_K), other=0)
        s = tl.where(entry != 0, s, float("-inf")) if MASK_KIND == 1 else s + entry.to(s.dtype)
    if on_edge:
        valid = (i < S_Q) & (j < S_K) & ((window_left < 0) | (j >= i - window_left))
        valid &= (window_right < 0) | (j <= i + window_right)
        s = tl.where(valid, s, float("-inf"))
    return s, squashed


@triton.jit
def _dropout_keep(seed, threshold, head, rows, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which weights of queries `rows` and keys j0 + [0, BLOCK_N) of head `head` (b * H + h)
    dropout keeps: word j % 4 of Philox4x32-10 at counter (j // 4, i, head, 0), shifted right by
    8, at least threshold (genfast/reference/attention.py's dropout_keep); j0 a multiple of 4.
    One Philox call per four keys, its words interleaved so that key 4q + l gets word l."""
    zero = tl.zeros((BLOCK_M, BLOCK_N // 4), tl.uint32)
    quads = zero + (j0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :].to(tl.uint32)
    queries = zero + rows[:, None].to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, quads, queries, zero + head.to(tl.uint32), zero)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_N))
    return (words >> 8).to(tl.int32) >= threshold


@triton.jit
def _keep_scale(threshold, dtype: tl.constexpr):
    """1 / the probability that _dropout_keep keeps a weight, in dtype (exact in float64)."""
    return 16777216.0 / (16777216 - threshold).to(dtype)


@triton.jit
def _query_block(H, GROUP, BLOCK_M: tl.constexpr):
    """This program's (batch x head, batch, head, key head, first query): grid (query blocks, B x H)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return bh, b, h, h // GROUP, tl.program_id(0) * BLOCK_M


@triton.jit
def _key_range(i0, BLOCK_M: tl.constexpr, S_Q, S_K, window_left, window_right):
    """The keys [first, last) that some query of [i0, i0 + BLOCK_M) sees."""
    first = tl.where(window_left < 0, 0, tl.maximum(i0 - window_left, 0))
    last = tl.where(window_right < 0, S_K, tl.minimum(tl.minimum(i0 + BLOCK_M, S_Q) + window_right, S_K))
    return first, last


@triton.jit
def _tile_split(last, lowest, end, BLOCK: tl.constexpr):
    """Tiles at multiples of BLOCK below `last` whose every element the window (and the keys'
    end) lets through start in [lowest rounded up, end rounded down - BLOCK]: returns that
    range's bounds, clamped to the tiles that exist. Only the tiles outside it, a few at each
    edge of a band, compute the window mask; lowest and end are never negative."""
    inner_first = tl.minimum(tl.cdiv(lowest, BLOCK) * BLOCK, last)
    return inner_first, tl.maximum(inner_first, end // BLOCK * BLOCK)


@triton.jit
def _inner_key_tiles(i0, BLOCK_M: tl.constexpr, S_K, last, window_left, window_right, BLOCK_N: tl.constexpr):
    """The key tiles that every query of [i0, i0 + BLOCK_M) sees whole: from the last query's
    window start to the first query's window end (both clamped to the keys)."""
    lowest = tl.where(window_left < 0, 0, tl.maximum(i0 + BLOCK_M - 1 - window_left, 0))
    end = tl.where(window_right < 0, S_K, tl.minimum(i0 + window_right + 1, S_K))
    return _tile_split(last, lowest, end, BLOCK_N)


@triton.jit
def _online_softmax_step(s, v, row_max, row_sum, acc, PRECISION: tl.constexpr, keep=None):
    """Folds one tile of scores s (rows x keys) and its values v into the running maximum, sum
    and weighted values of each row; a weight that `keep` (dropout's, if given) does not keep
    is left out of the weighted values but not of the sum."""
    new_max = tl.maximum(row_max, tl.max(s, 1))
    # Until a row sees a key its maximum is -inf: subtracting 0 keeps every exp at 0.
    base = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp(s - base[:, None])
    rescale = tl.exp(row_max - base)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    if keep is not None:
        p = tl.where(keep, p, 0.0)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new_max, row_sum, acc


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, stats_ptr, mask_ptr, slopes_ptr,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss,
    mask_sb, mask_sh, mask_si, mask_sj, slope_sb, slope_sh,
    H, GROUP, S_Q, S_K, D, DV, scale, softcap, window_left, window_right, dropout_seed, drop_threshold,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = dropout(softmax(scores)) v for BLOCK_M queries of one head, and each row's
    statistics: its largest score m and sum exp(scores - m).

    Reads the block's queries once, and every key and value row that one of them sees
    (tiles beyond the causal edge or the window are not visited); writes out's rows in
    out's dtype and the statistics in the math dtype (stats_ptr's, (B, H, S_q, 2)),
    accumulating in it.
    """
    compute = stats_ptr.dtype.element_ty
    bh, b, h, kv, i0 = _query_block(H, GROUP, BLOCK_M)
    rows = i0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None].to(tl.int64) * q_ss + dims[None, :],
                mask=(rows[:, None] < S_Q) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(compute)
    slope = tl.load(slopes_ptr + b * slope_sb + h * slope_sh).to(compute)
    mask_rows = mask_ptr + b * mask_sb + h * mask_sh + rows.to(tl.int64) * mask_si

    row_max = tl.full((BLOCK_M,), float("-inf"), compute)
    row_sum = tl.zeros((BLOCK_M,), compute)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), compute)
    first, last = _key_range(i0, BLOCK_M, S_Q, S_K, window_left, window_right)
    inner_first, inner_end = _inner_key_tiles(i0, BLOCK_M, S_K, last, window_left, window_right, BLOCK_N)
    for j0 in range(first // BLOCK_N * BLOCK_N, last, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_ptr + b * k_sb + kv * k_sh + cols[None, :].to(tl.int64) * k_ss + dims[:, None],
                      mask=(cols[None, :] < S_K) & (dims[:, None] < D), other=0.0)
        v = tl.load(v_ptr + b * v_sb + kv * v_sh + cols[:, None].to(tl.int64) * v_ss + value_dims[None, :],
                    mask=(cols[:, None] < S_K) & (value_dims[None, :] < DV), other=0.0)
        if UPCAST:
            k_t = k_t.to(compute)
            v = v.to(compute)
        s, _ = _scores(q, k_t, rows, cols, S_Q, S_K, scale, softcap, slope, mask_rows, mask_sj, window_left,
                       window_right, (j0 < inner_first) | (j0 >= inner_end), MASK_KIND, HAS_ALIBI, HAS_SOFTCAP,
                       PRECISION)
        keep = None
        if DROPOUT:
            keep = _dropout_keep(dropout_seed, drop_threshold, bh, rows, j0, BLOCK_M, BLOCK_N)
        row_max, row_sum, acc = _online_softmax_step(s, v, row_max, row_sum, acc, PRECISION, keep)
    seen = row_sum > 0
    norm = 1.0 / tl.where(seen, row_sum, 1.0)
    if DROPOUT:
        norm *= _keep_scale(drop_threshold, compute)
    out = acc * norm[:, None]
    tl.store(out_ptr + b * o_sb + h * o_sh + rows[:, None].to(tl.int64) * o_ss + value_dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < S_Q) & (value_dims[None, :] < DV))
    row_stats = stats_ptr + 2 * (bh.to(tl.int64) * S_Q + rows)
    tl.store(row_stats, row_max, mask=rows < S_Q)
    tl.store(row_stats + 1, row_sum, mask=rows < S_Q)


@triton.jit
def _softmax_terms(stats_ptr, row_stats, in_rows):
    """(base, inverse_sum) of the rows at offsets row_stats (b * H + h) * S_Q + i: the forward's
    weights are exp(s - base) * inverse_sum. A row that saw no key has maximum -inf and sum 0:
    base +inf and inverse_sum 0 keep its weights 0."""
    row_max = tl.load(stats_ptr + 2 * row_stats, mask=in_rows, other=float("-inf"))
    row_sum = tl.load(stats_ptr + 2 * row_stats + 1, mask=in_rows, other=0.0)
    base = tl.where(row_max == float("-inf"), float("inf"), row_max)
    return base, tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)


@triton.jit
def _score_gradient(p, dp, delta):
    """dS = P (dP - delta), and 0 where P is 0 (masked out: even where the row's dP or delta is
    NaN, a bad value it never saw, the product would be 0 * NaN) or 1 (the others' weights sum
    below rounding: dS = P sum_k P_k (dP - dP_k) is too, where dP - delta would be a difference
    of two rounded dot products, which a huge query or key multiplies into dk or dq)."""
    return tl.where((p == 0) | (p == 1), 0.0, p * (dp - delta))


@triton.jit
def _through_softcap(ds, squashed):
    """The gradient of the scores before the softcap c tanh(s / c), from squashed = tanh(s / c):
    dS (1 - tanh^2), and 0 where dS is 0: a masked pair's tanh may be NaN (a padding row's
    zeros times an infinite key), and 0 * NaN would reach dk. (tanh recovered from the capped
    score as (c tanh) / c would miss 1 at saturation for some caps, 30 among them.)"""
    return tl.where(ds == 0, 0.0, ds * (1.0 - squashed * squashed))


@triton.jit
def _attention_backward_kv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, stats_ptr, delta_ptr, dk_ptr, dv_ptr, dmask_ptr, mask_ptr, slopes_ptr,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, do_sb, do_sh, do_ss,
    mask_sb, mask_sh, mask_si, mask_sj, slope_sb, slope_sh,
    H, GROUP, S_Q, S_K, D, DV, scale, softcap, window_left, window_right, dropout_seed, drop_threshold,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dk and dv of BLOCK_N keys of one key head, summed over the GROUP query heads that read it:
    dv = sum P_d^T dO, dk = scale sum dS^T q with dS = P (Z dO v^T - delta), P_d = Z P and Z
    dropout's keep_scale where kept, 0 where dropped (1 without dropout); computed as P^T and
    dS^T directly. Reads the block's keys and values once and the queries, output gradients,
    statistics and delta of every query that sees them; writes dk and dv (contiguous) and, with
    MASK_GRAD, dS into dmask (contiguous)."""
    compute = stats_ptr.dtype.element_ty
    bk = tl.program_id(1)
    H_K = H // GROUP
    b = (bk // H_K).to(tl.int64)
    kv = (bk % H_K).to(tl.int64)
    j0 = tl.program_id(0) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    key_rows = (cols[:, None] < S_K)
    k = tl.load(k_ptr + b * k_sb + kv * k_sh + cols[:, None].to(tl.int64) * k_ss + dims[None, :],
                mask=key_rows & (dims[None, :] < D), other=0.0)
    v = tl.load(v_ptr + b * v_sb + kv * v_sh + cols[:, None].to(tl.int64) * v_ss + value_dims[None, :],
                mask=key_rows & (value_dims[None, :] < DV), other=0.0)
    if UPCAST:
        k = k.to(compute)
        v = v.to(compute)
    dk = tl.zeros((BLOCK_N, BLOCK_D), compute)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), compute)
    first = tl.where(window_right < 0, 0, tl.maximum(j0 - window_right, 0))
    last = tl.where(window_left < 0, S_Q, tl.minimum(tl.minimum(j0 + BLOCK_N, S_K) + window_left, S_Q))
    # Queries that see every key of the block: from the last key's window to the first key's.
    # Keys from S_K on need no mask here: their gradients are not stored. The last, partial tile
    # of queries is always an edge tile (the inner range ends at S_Q rounded down at most), so
    # its padding rows are masked.
    inner_first, inner_end = _tile_split(
        last,
        tl.where(window_right < 0, 0, tl.maximum(j0 + BLOCK_N - 1 - window_right, 0)),
        tl.where(window_left < 0, S_Q, tl.minimum(j0 + window_left + 1, S_Q)),
        BLOCK_M,
    )
    for g in range(GROUP):
        h = kv * GROUP + g
        slope = tl.load(slopes_ptr + b * slope_sb + h * slope_sh).to(compute)
        for i0 in range(first // BLOCK_M * BLOCK_M, last, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            in_rows = rows < S_Q
            q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None].to(tl.int64) * q_ss + dims[None, :],
                        mask=in_rows[:, None] & (dims[None, :] < D), other=0.0)
            d_o = tl.load(dout_ptr + b * do_sb + h * do_sh + rows[:, None].to(tl.int64) * do_ss + value_dims[None, :],
                          mask=in_rows[:, None] & (value_dims[None, :] < DV), other=0.0)
            if UPCAST:
                q = q.to(compute)
                d_o = d_o.to(compute)
            row_stats = (b * H + h) * S_Q + rows
            base, inverse_sum = _softmax_terms(stats_ptr, row_stats, in_rows)
            delta = tl.load(delta_ptr + row_stats, mask=in_rows, other=0.0)
            mask_rows = mask_ptr + b * mask_sb + h * mask_sh + rows.to(tl.int64) * mask_si
            # Keys by queries throughout, so that every product takes its operands as loaded.
            s_t, squashed_t = _scores(k, tl.trans(q), cols, rows, S_Q, S_K, scale, softcap, slope, mask_rows, mask_sj,
                                      window_left, window_right, (i0 < inner_first) | (i0 >= inner_end), MASK_KIND,
                                      HAS_ALIBI, HAS_SOFTCAP, PRECISION, TRANSPOSED=True)
            p_t = tl.exp(s_t - base[None, :]) * inverse_sum[None, :]
            weights_t = p_t
            dp_t = tl.dot(v, tl.trans(d_o), input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep(dropout_seed, drop_threshold, b * H + h, rows, j0, BLOCK_M, BLOCK_N)
                factor_t = tl.where(tl.trans(keep), _keep_scale(drop_threshold, compute), 0.0)
                weights_t = p_t * factor_t
                dp_t = dp_t * factor_t
            dv += tl.dot(weights_t.to(d_o.dtype), d_o, input_precision=PRECISION)
            ds_t = _score_gradient(p_t, dp_t, delta[None, :])
            if MASK_GRAD:
                tl.store(dmask_ptr + row_stats[None, :].to(tl.int64) * S_K + cols[:, None], ds_t,
                         mask=in_rows[None, :] & (cols[:, None] < S_K))
            if HAS_SOFTCAP:
                ds_t = _through_softcap(ds_t, squashed_t)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    out_rows = (b * H_K + kv) * S_K + cols[:, None].to(tl.int64)
    tl.store(dk_ptr + out_rows * D + dims[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=key_rows & (dims[None, :] < D))
    tl.store(dv_ptr + out_rows * DV + value_dims[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=key_rows & (value_dims[None, :] < DV))


@triton.jit
def _attention_backward_q_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, stats_ptr, delta_ptr, dq_ptr, mask_ptr, slopes_ptr,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, do_sb, do_sh, do_ss,
    mask_sb, mask_sh, mask_si, mask_sj, slope_sb, slope_sh,
    H, GROUP, S_Q, S_K, D, DV, scale, softcap, window_left, window_right, dropout_seed, drop_threshold,
    MASK_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dq = scale sum dS k for BLOCK_M queries of one head (dS as the other backward kernel's).
    Reads the block's queries and output gradients once and every key and value row they see;
    writes dq (contiguous)."""
    compute = stats_ptr.dtype.element_ty
    bh, b, h, kv, i0 = _query_block(H, GROUP, BLOCK_M)
    rows = i0 + tl.arange(0, BLOCK_M)
    in_rows = rows < S_Q
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None].to(tl.int64) * q_ss + dims[None, :],
                mask=in_rows[:, None] & (dims[None, :] < D), other=0.0)
    d_o = tl.load(dout_ptr + b * do_sb + h * do_sh + rows[:, None].to(tl.int64) * do_ss + value_dims[None, :],
                  mask=in_rows[:, None] & (value_dims[None, :] < DV), other=0.0)
    if UPCAST:
        q = q.to(compute)
        d_o = d_o.to(compute)
    row_stats = bh.to(tl.int64) * S_Q + rows
    base, inverse_sum = _softmax_terms(stats_ptr, row_stats, in_rows)
    delta = tl.load(delta_ptr + row_stats, mask=in_rows, other=0.0)
    slope = tl.load(slopes_ptr + b * slope_sb + h * slope_sh).to(compute)
    mask_rows = mask_ptr + b * mask_sb + h * mask_sh + rows.to(tl.int64) * mask_si
    dq = tl.zeros((BLOCK_M, BLOCK_D), compute)
    first, last = _key_range(i0, BLOCK_M, S_Q, S_K, window_left, window_right)
    inner_first, inner_end = _inner_key_tiles(i0, BLOCK_M, S_K, last, window_left, window_right, BLOCK_N)
    for j0 in range(first // BLOCK_N * BLOCK_N, last, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * k_sb + kv * k_sh + cols[:, None].to(tl.int64) * k_ss + dims[None, :],
                    mask=(cols[:, None] < S_K) & (dims[None, :] < D), other=0.0)
        v = tl.load(v_ptr + b * v_sb + kv * v_sh + cols[:, None].to(tl.int64) * v_ss + value_dims[None, :],
                    mask=(cols[:, None] < S_K) & (value_dims[None, :] < DV), other=0.0)
        if UPCAST:
            k = k.to(compute)
            v = v.to(compute)
        s, squashed = _scores(q, tl.trans(k), rows, cols, S_Q, S_K, scale, softcap, slope, mask_rows, mask_sj,
                              window_left, window_right, (j0 < inner_first) | (j0 >= inner_end), MASK_KIND,
                              HAS_ALIBI, HAS_SOFTCAP, PRECISION)
        p = tl.exp(s - base[:, None]) * inverse_sum[:, None]
        dp = tl.dot(d_o, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(dropout_seed, drop_threshold, bh, rows, j0, BLOCK_M, BLOCK_N)
            dp = dp * tl.where(keep, _keep_scale(drop_threshold, compute), 0.0)
        ds = _score_gradient(p, dp, delta[:, None])
        if HAS_SOFTCAP:
            ds = _through_softcap(ds, squashed)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + row_stats[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=in_rows[:, None] & (dims[None, :] < D))


def tile_config(direction, dtype, block_d, device_type):
    """Tile shape and launch settings: BLOCK_M queries by BLOCK_N keys per step.

    Tensor-core dtypes on a GPU: the fastest of the shapes that
    benchmarks/experiments/attention_tiles.py tried on an H200 (2026-11-26; 128x64 and
    64x128 tiles were slower or, in the backward, overflowed shared memory). fp32 (computed
    exactly, without tf32) and fp64 take 64x64 tiles forward and unpipelined 32x32 ones
    backward, smaller where a tile would overflow the 227 KB of shared memory or spill
    registers (sizes read off ptxas's resource report for sm_90). The interpreter ignores the
    warp and stage counts.
    """
    tensor_cores = dtype in (torch.float16, torch.bfloat16) and device_type == "cuda"
    wide = block_d > 128 or (block_d > 64 and dtype == torch.float64)
    if tensor_cores and direction == "forward":
        return dict(BLOCK_M=128, BLOCK_N=64 if block_d <= 128 else 32, num_warps=4 if block_d <= 64 else 8,
                    num_stages=3 if block_d <= 128 else 2)
    if tensor_cores:
        return dict(BLOCK_M=64 if block_d <= 128 else 32, BLOCK_N=64 if block_d <= 128 else 32,
                    num_warps=4 if block_d <= 128 else 8, num_stages=3 if block_d <= 128 else 2)
    if direction == "backward" and device_type == "cuda":
        # Without tensor cores the products go through registers: pipelined or in 64x64 tiles,
        # the backward kernels spill thousands of bytes per thread (ptxas's report, sm_90).
        block = 16 if wide and dtype == torch.float64 else 32
        return dict(BLOCK_M=block, BLOCK_N=block, num_warps=8 if wide else 4, num_stages=1)
    if not wide:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if block_d <= 64 else 8, num_stages=3)
    if dtype == torch.float64:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=32 if direction == "backward" else 64, BLOCK_N=32, num_warps=8, num_stages=2)


def _settings(q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p, dropout_seed):
    """The kernels' shared arguments after the tensors: strides, sizes and compile-time flags."""
    B, H, S_Q, D = q.shape
    H_K, S_K, DV = k.shape[1], k.shape[2], v.shape[3]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if mask is None:
        mask_kind, mask_arg, mask_strides = 0, q, (0, 0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = mask.stride()
    slopes, slope_strides = (q, (0, 0)) if alibi_slopes is None else (alibi_slopes, alibi_slopes.stride())
    # Triton runs CPU tensors only in its interpreter, whose low-precision tl.dot rounds wrongly
    # (triton#11584): compute in fp32 there. float64 is computed as loaded.
    upcast = q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu"
    block_d, block_dv = max(triton.next_power_of_2(D), 16), max(triton.next_power_of_2(DV), 16)
    threshold = dropout_threshold(dropout_p)
    constants = dict(
        MASK_KIND=mask_kind, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0, DROPOUT=threshold > 0,
        UPCAST=upcast,
        PRECISION="ieee" if upcast or q.dtype in (torch.float32, torch.float64) else None,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
    )
    sizes = (H, H // H_K, S_Q, S_K, D, DV, scale, softcap, window_left, window_right, dropout_seed, threshold)
    return compute, mask_arg, slopes, (*mask_strides, *slope_strides, *sizes), constants


def _scaled_in_float64(q, scale):
    """(q, scale) for a kernel: Triton passes Python floats as fp32, which would round a float64
    scale, so in float64 the scale multiplies q beforehand (the scores are the same products)."""
    return (q * scale, 1.0) if q.dtype == torch.float64 else (q, scale)


def attention_forward(q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p,
                      dropout_seed):
    """Returns out (B, H, S_q, D_v) in q's dtype and the softmax's statistics (B, H, S_q, 2) in
    the math dtype: each row's largest score and sum exp(scores - largest); the arguments as
    csrc/cpu/attention.h's AttentionProblem."""
    B, H, S_Q, _ = q.shape
    q, scale = _scaled_in_float64(q, scale)
    compute, mask_arg, slopes, shared, constants = _settings(
        q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p, dropout_seed
    )
    out = torch.empty(B, H, S_Q, v.shape[3], dtype=q.dtype, device=q.device)
    stats = torch.empty(B, H, S_Q, 2, dtype=compute, device=q.device)
    constants |= tile_config("forward", q.dtype, max(constants["BLOCK_D"], constants["BLOCK_DV"]), q.device.type)
    grid = (triton.cdiv(S_Q, constants["BLOCK_M"]), B * H)
    _attention_forward_kernel[grid](
        q, k, v, out, stats, mask_arg, slopes, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *shared, **constants,
    )
    return out, stats


def attention_backward(q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p,
                       dropout_seed, out, stats, dout, mask_grad):
    """Returns dq, dk, dv (contiguous, in q's dtype) and, with mask_grad, the (B, H, S_q, S_k)
    gradient of an additive mask in the math dtype (else None)."""
    B, H, S_Q, _ = q.shape
    H_K, S_K = k.shape[1], k.shape[2]
    q, kernel_scale = _scaled_in_float64(q, scale)
    compute, mask_arg, slopes, shared, constants = _settings(
        q, k, v, mask, alibi_slopes, kernel_scale, softcap, window_left, window_right, dropout_p, dropout_seed
    )
    delta = (dout.to(compute) * out.to(compute)).sum(-1).contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dmask = torch.zeros(B, H, S_Q, S_K, dtype=compute, device=q.device) if mask_grad else None
    tensors = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    constants |= tile_config("backward", q.dtype, max(constants["BLOCK_D"], constants["BLOCK_DV"]), q.device.type)
    _attention_backward_kv_kernel[(triton.cdiv(S_K, constants["BLOCK_N"]), B * H_K)](
        q, k, v, dout, stats, delta, dk, dv, q if dmask is None else dmask, mask_arg, slopes, *tensors, *shared,
        MASK_GRAD=mask_grad, **constants,
    )
    _attention_backward_q_kernel[(triton.cdiv(S_Q, constants["BLOCK_M"]), B * H)](
        q, k, v, dout, stats, delta, dq, mask_arg, slopes, *tensors, *shared, **constants,
    )
    # With q scaled beforehand, dk = scale dS^T q came out whole; dq = scale dS k lacks its scale.
    return (dq if kernel_scale == scale else dq * scale), dk, dv, dmask


@triton.jit
def _attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, table_ptr, slopes_ptr, max_ptr, sum_ptr, acc_ptr,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, table_sb, slope_sb, slope_sh,
    H, GROUP, S_Q, D, DV, PAGE, CHUNK, scale, softcap, window_left, window_right,
    PAGED: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The partial softmax of one chunk of key head (b, kv)'s cache for the GROUP * S_Q query
    rows that read it (row r: head kv * GROUP + r // S_Q, query r % S_Q at position
    length - S_Q + r % S_Q). Reads the rows' queries and the chunk's cache rows once (through
    the block table when PAGED); writes each row's maximum, sum and weighted values (fp32)."""
    compute = max_ptr.dtype.element_ty
    bk = tl.program_id(0)
    split = tl.program_id(1)
    H_K = H // GROUP
    b = (bk // H_K).to(tl.int64)
    kv = (bk % H_K).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    in_rows = r < GROUP * S_Q
    h = kv * GROUP + r // S_Q
    length = tl.load(lengths_ptr + b)
    position = length - S_Q + r % S_Q
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_sb + h[:, None] * q_sh + (r % S_Q)[:, None].to(tl.int64) * q_ss + dims[None, :],
                mask=in_rows[:, None] & (dims[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(compute)
    slope = tl.load(slopes_ptr + b * slope_sb + h * slope_sh, mask=in_rows, other=0.0).to(compute)
    row_max = tl.full((BLOCK_R,), float("-inf"), compute)
    row_sum = tl.zeros((BLOCK_R,), compute)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), compute)
    start = split * CHUNK
    end = tl.minimum(length, start + CHUNK)
    for j0 in range(start, end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        in_cols = cols < end
        if PAGED:
            block = tl.load(table_ptr + b * table_sb + cols // PAGE, mask=in_cols, other=0).to(tl.int64)
            k_rows = block * k_sb + (cols % PAGE) * k_ss
            v_rows = block * v_sb + (cols % PAGE) * v_ss
        else:
            k_rows = b * k_sb + cols.to(tl.int64) * k_ss
            v_rows = b * v_sb + cols.to(tl.int64) * v_ss
        k_t = tl.load(k_ptr + kv * k_sh + k_rows[None, :] + dims[:, None], mask=in_cols[None, :] & (dims[:, None] < D),
                      other=0.0)
        v = tl.load(v_ptr + kv * v_sh + v_rows[:, None] + value_dims[None, :],
                    mask=in_cols[:, None] & (value_dims[None, :] < DV), other=0.0)
        if UPCAST:
            k_t = k_t.to(compute)
            v = v.to(compute)
        # The rows are at their positions and the chunk ends the keys: no mask tensor to read.
        s, _ = _scores(q, k_t, position, cols, length, end, scale, softcap, slope[:, None], q_ptr, 0, window_left,
                       window_right, True, 0, HAS_ALIBI, HAS_SOFTCAP, PRECISION)
        row_max, row_sum, acc = _online_softmax_step(s, v, row_max, row_sum, acc, PRECISION)
    partial = (bk * tl.num_programs(1) + split).to(tl.int64) * BLOCK_R + r
    tl.store(max_ptr + partial, row_max)
    tl.store(sum_ptr + partial, row_sum)
    tl.store(acc_ptr + partial[:, None] * BLOCK_DV + value_dims[None, :], acc)


@triton.jit
def _attention_decode_combine_kernel(
    max_ptr, sum_ptr, acc_ptr, out_ptr, H, GROUP, S_Q, DV, SPLITS,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s for one query row over its chunks'
    partials, M the largest m_s; zero for a row that saw no key. Writes out (contiguous)."""
    t = tl.program_id(0)
    R = GROUP * S_Q
    bk = t // R
    r = t % R
    s = tl.arange(0, BLOCK_S)
    partial = (bk * SPLITS + s).to(tl.int64) * BLOCK_R + r
    maxima = tl.load(max_ptr + partial, mask=s < SPLITS, other=float("-inf"))
    largest = tl.max(maxima, 0)
    weight = tl.where(largest == float("-inf"), 0.0, tl.exp(maxima - largest))
    total = tl.sum(weight * tl.load(sum_ptr + partial, mask=s < SPLITS, other=0.0), 0)
    value_dims = tl.arange(0, BLOCK_DV)
    acc = tl.load(acc_ptr + partial[:, None] * BLOCK_DV + value_dims[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    H_K = H // GROUP
    h = (bk % H_K) * GROUP + r // S_Q
    row = ((bk // H_K) * H + h).to(tl.int64) * S_Q + r % S_Q
    tl.store(out_ptr + row * DV + value_dims, out.to(out_ptr.dtype.element_ty), mask=value_dims < DV)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(row_bytes, device):
    """Keys per step and the number of programs to aim for, from the bytes of one key row and
    its value row. A chunk's rows, a few steps deep, must fit in 227 KB of shared memory. On a
    GPU, eight programs per SM: on an H200 two per SM ran at 70 to 87% of the copy bandwidth
    from one run to the next, eight at 83% in both (attention_tiles.py). The count is reached
    without reading the lengths back: chunks past an element's length end at once."""
    programs = 8 * _multiprocessors(device) if device.type == "cuda" else 4
    return dict(BLOCK_N=64 if row_bytes <= 1024 else 32 if row_bytes <= 2048 else 16, programs=programs,
                num_warps=4, num_stages=3)


def attention_decode(q, k_cache, v_cache, lengths, block_table, alibi_slopes, scale, softcap, window_left,
                     window_right):
    """Returns the output (B, H, S_q, D_v) in q's dtype; the arguments as csrc/cpu/attention.h's
    DecodeProblem (lengths and block_table int64)."""
    B, H, S_Q, D = q.shape
    H_K, DV = k_cache.shape[1], v_cache.shape[3]
    q, scale = _scaled_in_float64(q, scale)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    upcast = q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu"
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    block_r = max(triton.next_power_of_2(H // H_K * S_Q), 16)
    block_d, block_dv = max(triton.next_power_of_2(D), 16), max(triton.next_power_of_2(DV), 16)
    settings = decode_config((block_d + block_dv) * q.element_size(), q.device)
    block_n, target = settings.pop("BLOCK_N"), settings.pop("programs")
    splits = max(1, min(triton.cdiv(target, B * H_K), triton.cdiv(capacity, block_n)))
    chunk = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = triton.cdiv(capacity, chunk)
    partial_max = torch.empty(B * H_K * splits * block_r, dtype=compute, device=q.device)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty(B * H_K * splits * block_r, block_dv, dtype=compute, device=q.device)
    table, table_stride = (block_table, block_table.stride(0)) if paged else (lengths, 0)
    slopes, slope_strides = (q, (0, 0)) if alibi_slopes is None else (alibi_slopes, alibi_slopes.stride())
    _attention_decode_kernel[(B * H_K, splits)](
        q, k_cache, v_cache, lengths, table, slopes, partial_max, partial_sum, partial_acc,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], table_stride, *slope_strides,
        H, H // H_K, S_Q, D, DV, k_cache.shape[2], chunk, scale, softcap, window_left, window_right,
        PAGED=paged, HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0, UPCAST=upcast,
        PRECISION="ieee" if upcast or q.dtype in (torch.float32, torch.float64) else None,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, **settings,
    )
    out = torch.empty(B, H, S_Q, DV, dtype=q.dtype, device=q.device)
    _attention_decode_combine_kernel[(B * H_K * (H // H_K) * S_Q,)](
        partial_max, partial_sum, partial_acc, out, H, H // H_K, S_Q, DV, splits,
        BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=block_dv,
    )
    return out
