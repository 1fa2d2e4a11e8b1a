"""Scaled dot-product attention as torch.nn.functional.scaled_dot_product_attention
defines it, plus what its fast paths lack: a sliding window, ALiBi and a logit
softcap. The score of query i and key j, in this order:

    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)             with softcap
    s = s - slope_h * |i - j|                   with ALiBi slopes
    s = s + attn_mask[i, j]                     a float mask; a bool mask keeps s where True
    s = -inf  where j > i (is_causal), or outside i - left <= j <= i + right (window_size)

then softmax over j (a row with no key left gives zeros, as torch's) and the
weighted sum of the values. Positions are aligned at the top left, as torch's
is_causal: query i sits at key position i whatever the lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def allowed_keys(
    queries: int, keys: int, is_causal: bool, window_size: tuple[int, int] | None, device: torch.device
) -> torch.Tensor:
    """The (queries, keys) bool matrix of the pairs that causality and the window let through."""
    i = torch.arange(queries, device=device)[:, None]
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
            s = s + attn_mask.to(s.dtype)
    if is_causal or window_size is not None:
        s = s.masked_fill(~allowed_keys(queries, keys, is_causal, window_size, s.device), -math.inf)
    return s


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
) -> torch.Tensor:
    """softmax(scores) @ value, computed in fp32 for fp16/bf16 inputs and rounded once.

    query (B, H, S_q, E), key (B, H_k, S_k, E), value (B, H_k, S_k, E_v); H_k divides H
    with enable_gqa. attn_mask broadcasts to (B, H, S_q, S_k); alibi_slopes is (H,) or (B, H).
    """
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q, k, v = (t.to(compute) for t in (query, key, value))
    if enable_gqa and v.shape[-3] != q.shape[-3]:
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = scores(q, k, attn_mask, is_causal, scale, enable_gqa, window_size, alibi_slopes, softcap)
    # A row with every key masked out has no softmax; torch gives it zero weights.
    weights = torch.softmax(s, dim=-1).masked_fill(s.isneginf().all(-1, keepdim=True), 0.0)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return (weights @ v).to(query.dtype)
