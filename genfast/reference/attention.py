"""Scaled dot-product attention as torch.nn.functional.scaled_dot_product_attention
defines it, plus what its fast paths lack: a sliding window, ALiBi and a logit
softcap. The score of query i and key j, in this order:

    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)             with softcap
    s = s - slope_h * |i - j|                   with ALiBi slopes
    s = s + attn_mask[i, j]                     a float mask; a bool mask keeps s where True
    s = -inf  where j > i (is_causal), or outside i - left <= j <= i + right (window_size)

then softmax over j (a row with no key left gives zeros, as torch's) and the
weighted sum of the values. Dropout zeroes each weight with probability dropout_p and
scales the others to keep the expectation; which it zeroes comes from a counter-based
stream (dropout_keep), so that every backend drops the same weights for one seed. Positions are aligned at the top left, as torch's
is_causal: query i sits at key position i whatever the lengths.
"""

from __future__ import annotations

import math

import torch

from .random import philox4x32, seed_from_torch


def allowed_keys(
    queries: int,
    keys: int,
    is_causal: bool,
    window_size: tuple[int, int] | None,
    device: torch.device,
    first_position: int = 0,
) -> torch.Tensor:
    """The (queries, keys) bool matrix of the pairs that causality and the window let through,
    query i sitting at key position first_position + i."""
    i = torch.arange(queries, device=device)[:, None] + first_position
    j = torch.arange(keys, device=device)[None, :]
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= j <= i
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
    return allowed


def scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The (B, H, S_q, S_k) scores before the softmax, -inf where a pair is masked out."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    s = scale * (query @ key.transpose(-2, -1))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    queries, keys = s.shape[-2], s.shape[-1]
    if alibi_slopes is not None:
        distance = (torch.arange(queries, device=s.device)[:, None] - torch.arange(keys, device=s.device)).abs()
        s = s - alibi_slopes.to(s.dtype)[..., None, None] * distance
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            # -inf masks a pair out whatever its score, even a NaN from a bad key it never sees.
            s = (s + attn_mask.to(s.dtype)).masked_fill(attn_mask.isneginf(), -math.inf)
    if is_causal or window_size is not None:
        s = s.masked_fill(~allowed_keys(queries, keys, is_causal, window_size, s.device), -math.inf)
    return s


def dropout_threshold(dropout_p: float) -> int:
    """A weight is dropped when the top 24 bits of its random word fall below this."""
    return min(round(dropout_p * 2**24), 2**24 - 1)


def dropout_keep(seed: int, dropout_p: float, shape: tuple[int, int, int, int], device=None) -> torch.Tensor:
    """The (B, H, S_q, S_k) bool matrix of the attention weights dropout keeps: weight
    (b, h, i, j) is kept when word j % 4 of Philox4x32-10 at counter (j // 4, i, b * H + h, 0)
    under key seed, shifted right by 8, is at least dropout_threshold(dropout_p). So each
    weight is dropped with probability threshold / 2^24, dropout_p rounded to 2^-24."""
    batch, heads, queries, keys = shape
    j = torch.arange(keys, device=device)
    i = torch.arange(queries, device=device)[:, None]
    head = torch.arange(batch * heads, device=device)[:, None, None]
    words = torch.stack(torch.broadcast_tensors(*philox4x32(seed, j // 4, i, head)))
    word = words.gather(0, (j % 4).expand(1, *words.shape[1:]))[0]
    return ((word >> 8) >= dropout_threshold(dropout_p)).reshape(shape)


def dropout_scale(dropout_p: float) -> float:
    """1 / the probability that dropout_keep keeps a weight."""
    return 2**24 / (2**24 - dropout_threshold(dropout_p))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout_seed: int | None = None,
) -> torch.Tensor:
    """softmax(scores) @ value, computed in fp32 for fp16/bf16 inputs and rounded once.

    query (B, H, S_q, E), key (B, H_k, S_k, E), value (B, H_k, S_k, E_v); H_k divides H
    with enable_gqa. attn_mask broadcasts to (B, H, S_q, S_k); alibi_slopes is (H,) or (B, H).
    dropout_seed keys dropout_keep's stream; None draws it from torch's generator.
    """
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = (t.to(compute) for t in (query, key, value))
    if enable_gqa and v.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = scores(q, k, attn_mask, is_causal, scale, enable_gqa, window_size, alibi_slopes, softcap)
    # A row with every key masked out has no softmax; torch gives it zero weights.
    weights = torch.softmax(s, dim=-1).masked_fill(s.isneginf().all(-1, keepdim=True), 0.0)
    if dropout_p > 0:
        seed = seed_from_torch() if dropout_seed is None else dropout_seed
        # Leading dimensions flattened into the batch, as the kernels see them.
        heads = weights.shape[-3] if weights.dim() > 2 else 1
        shape = (math.prod(weights.shape[:-3]), heads, *weights.shape[-2:])
        keep = dropout_keep(seed, dropout_p, shape, weights.device)
        weights = weights * keep.reshape(weights.shape) * dropout_scale(dropout_p)
    return (weights @ v).to(query.dtype)


def cache_rows(cache: torch.Tensor, batch: int, length: int, block_table: torch.Tensor | None) -> torch.Tensor:
    """Rows [0, length) of batch element `batch` of a KV cache, (H_k, length, E): a contiguous
    cache is (B, H_k, S_max, E); a paged one is (blocks, H_k, block_size, E), whose logical row
    j lies in block block_table[batch, j // block_size] at row j % block_size."""
    if block_table is None:
        return cache[batch, :, :length]
    block_size = cache.shape[2]
    j = torch.arange(length, device=cache.device)
    return cache[block_table[batch, j // block_size].long(), :, j % block_size].transpose(0, 1)


def append_to_cache(
    cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor, block_table: torch.Tensor | None
) -> None:
    """Writes new (B, H_k, S_new, E) into the cache at rows cache_seqlens[b] + [0, S_new)."""
    for b in range(new.shape[0]):
        start = int(cache_seqlens[b])
        for t in range(new.shape[2]):
            j = start + t
            if block_table is None:
                cache[b, :, j] = new[b, :, t]
            else:
                cache[int(block_table[b, j // cache.shape[2]]), :, j % cache.shape[2]] = new[b, :, t]


def attention_with_kv_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decoding: k and v (when given) are appended to the cache at cache_seqlens, then the
    S_q queries q (B, H, S_q, E) attend over the cache's first L_b = cache_seqlens[b] (+ S_q
    when appending) rows, GQA by head groups. The queries are the last S_q positions:
    query i sits at key position L_b - S_q + i (aligned at the bottom right), which is what
    is_causal, the window and ALiBi measure from. cache_seqlens None means the whole cache."""
    batch, heads, queries, _ = q.shape
    if cache_seqlens is None:
        full = k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]
        cache_seqlens = torch.full((batch,), full - (0 if k is None else queries), dtype=torch.long)
    if k is not None:
        append_to_cache(k_cache, k, cache_seqlens, block_table)
        append_to_cache(v_cache, v, cache_seqlens, block_table)
    outputs = []
    for b in range(batch):
        length = int(cache_seqlens[b]) + (0 if k is None else queries)
        keys, values = (cache_rows(c, b, length, block_table)[None] for c in (k_cache, v_cache))
        # The queries are the last positions: shift them to the bottom right.
        first = length - queries
        mask = torch.where(allowed_keys(queries, length, is_causal, window_size, q.device, first), 0.0, -math.inf)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            distance = (torch.arange(queries, device=q.device)[:, None] + first - torch.arange(length, device=q.device))
            mask = mask - slopes.double()[:, None, None] * distance.abs()
        outputs.append(
            scaled_dot_product_attention(
                q[b : b + 1], keys, values, mask, scale=scale, enable_gqa=heads != keys.shape[1], softcap=softcap
            )
        )
    return torch.cat(outputs)
