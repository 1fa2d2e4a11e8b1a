"""Token sampling as one Triton program per row, and its launcher. The specification:
genfast/reference/sampling.py.

A row's logits are read a few dozen times, from cache after the first: for the maximum,
for each bit of the top-k and top-p thresholds, and for the draw. Each threshold is found
by building the order-preserving integer key of the logit it sits at, bit by bit from the
most significant, keeping a bit wherever enough tokens (top-k) or enough probability
(top-p) still lie at or above it. No sort, and ties at a threshold are all kept.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _order_key(x):
    """The logits' fp32 bits as uint32 keys that order as the values do (-0 just below +0)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _row_sums(row_ptr, V, row_max, inv_temperature, threshold, BLOCK: tl.constexpr):
    """(count, probability mass) of the tokens whose key is at least `threshold`; the mass
    relative to the row's maximum."""
    count = tl.zeros((), tl.int32)
    mass = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK):
        columns = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + columns, mask=columns < V, other=float("-inf")).to(tl.float32)
        above = (_order_key(x) >= threshold) & (columns < V)
        count += tl.sum(above.to(tl.int32), 0)
        mass += tl.sum(tl.where(above, tl.exp((x - row_max) * inv_temperature), 0.0), 0)
    return count, mass


@triton.jit
def _sample_kernel(
    logits_ptr, uniform_ptr, token_ptr, V, row_stride, inv_temperature, top_k, top_p,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, BLOCK: tl.constexpr,
):
    """token = the draw of uniform[row] from softmax(logits[row] / T) after top-k and top-p.

    Reads the row of logits (any float dtype, computed in fp32) and its uniform; writes the
    token (int64)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    row_max = tl.full((), float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK):
        columns = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + columns, mask=columns < V, other=float("-inf")).to(tl.float32)
        row_max = tl.maximum(row_max, tl.max(x, 0))

    threshold = tl.zeros((), tl.uint32)
    if HAS_TOP_K:  # the largest key with at least top_k tokens at or above it
        for i in range(32):
            candidate = threshold | (tl.full((), 1, tl.uint32) << (31 - i))
            count, _ = _row_sums(row_ptr, V, row_max, inv_temperature, candidate, BLOCK)
            threshold = tl.where(count >= top_k, candidate, threshold)
    _, kept_mass = _row_sums(row_ptr, V, row_max, inv_temperature, threshold, BLOCK)
    if HAS_TOP_P:
        # The largest key with top_p of the kept mass at or above it. The search starts from 0:
        # below top-k's threshold the mass only grows, so it ends at or above that threshold.
        target = top_p * kept_mass
        threshold = tl.zeros((), tl.uint32)
        for i in range(32):
            candidate = threshold | (tl.full((), 1, tl.uint32) << (31 - i))
            _, mass = _row_sums(row_ptr, V, row_max, inv_temperature, candidate, BLOCK)
            threshold = tl.where(mass >= target, candidate, threshold)
        _, kept_mass = _row_sums(row_ptr, V, row_max, inv_temperature, threshold, BLOCK)

    # The draw: the first kept token, in vocabulary order, whose cumulative mass exceeds u.
    target = tl.load(uniform_ptr + row).to(tl.float32) * kept_mass
    running = tl.zeros((), tl.float32)
    token = tl.full((), V, tl.int32)
    last_kept = tl.zeros((), tl.int32)
    for v0 in range(0, V, BLOCK):
        columns = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + columns, mask=columns < V, other=float("-inf")).to(tl.float32)
        kept = (_order_key(x) >= threshold) & (columns < V)
        weights = tl.where(kept, tl.exp((x - row_max) * inv_temperature), 0.0)
        cumulative = running + tl.cumsum(weights, 0)
        token = tl.minimum(token, tl.min(tl.where(kept & (cumulative > target), columns, V), 0))
        last_kept = tl.maximum(last_kept, tl.max(tl.where(kept, columns, 0), 0))
        running += tl.sum(weights, 0)
    tl.store(token_ptr + row, tl.minimum(token, last_kept).to(tl.int64))


def sample(logits, temperature: float, top_k: int, top_p: float, uniform):
    """Tokens (rows,) int64 for logits (rows, V) with unit stride along V and uniform (rows,)
    float32; top_k 0 or at least V and top_p 1 disable those filters."""
    rows, V = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _sample_kernel[(rows,)](
        logits, uniform, tokens, V, logits.stride(0), 1.0 / temperature, top_k, top_p,
        HAS_TOP_K=0 < top_k < V, HAS_TOP_P=top_p < 1, BLOCK=min(triton.next_power_of_2(V), 4096),
    )
    return tokens
