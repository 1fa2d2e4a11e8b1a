"""Attention: scaled_dot_product_attention (genfast::scaled_dot_product_attention),
drop-in for ``torch.nn.functional.scaled_dot_product_attention``, and decoding over
a KV cache, attention_with_kv_cache (genfast::attention_decode). The formulas, with
what the ops add to torch's (sliding window, ALiBi, logit softcap):
genfast/reference/attention.py.

Both backends (C++ for CPU tensors, Triton) work flash-attention style: no
(S_q, S_k) matrix is stored, and tiles that causality or a window mask out
entirely are skipped. The forward saves each row's largest score and the sum of
its exponentials; the backward recomputes the scores, exactly as the forward
computed them, and the weights from those two. A float attn_mask that requires grad
gets its gradient. Dropout is drawn in the kernels from a counter-based stream
keyed by a seed from torch's generator, so the backward recomputes the same
weights' fate instead of storing it.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels, resolve
from ._autograd import eager_function
from ._checks import FLOAT_DTYPES, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})
_DECODE_IMPLEMENTED = frozenset({"cpu", "triton"})


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns the output (B, H, S_q, D_v) in q's dtype and the softmax's statistics
    (B, H, S_q, 2) in the math type: each row's largest score and the sum of the weights
    before normalising, in the backend's own units (its backward reads them). q, k, v:
    (B, H or H_k, S, D) with a contiguous last dimension; mask expanded to (B, H, S_q, S_k),
    bool or the math type; alibi_slopes expanded to (B, H); softcap 0 and window bounds -1
    mean none; dropout_seed a CPU int64 scalar, or None without dropout."""
    out, stats = kernels(backend, "attention").attention_forward(
        q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p, _seed(dropout_seed)
    )
    return out, stats


def _seed(dropout_seed: Tensor | None) -> int:
    return 0 if dropout_seed is None else int(dropout_seed)


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    dropout_p: float,
    out: Tensor,
    stats: Tensor,
    dout: Tensor,
    mask_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv and the (B, H, S_q, S_k) gradient of an additive mask (empty
    without mask_grad)."""
    dq, dk, dv, dmask = kernels(backend, "attention").attention_backward(
        q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p, _seed(dropout_seed),
        out, stats, dout, mask_grad,
    )
    return dq, dk, dv, q.new_empty(0) if dmask is None else dmask


attention_op = torch.library.custom_op("genfast::scaled_dot_product_attention", _forward, mutates_args=())
attention_backward_op = torch.library.custom_op(
    "genfast::scaled_dot_product_attention_backward", _backward, mutates_args=()
)


def _math_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@attention_op.register_fake
def _(q, k, v, mask, alibi_slopes, dropout_seed, scale, softcap, window_left, window_right, dropout_p, backend):
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty((*q.shape[:3], 2), dtype=_math_dtype(q))


@attention_backward_op.register_fake
def _(q, k, v, mask, alibi_slopes, dropout_seed, scale, softcap, window_left, window_right, dropout_p, out, stats,
      dout, mask_grad, backend):
    dmask = q.new_empty((*q.shape[:3], k.shape[2]), dtype=_math_dtype(q)) if mask_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, alibi_slopes, dropout_seed, *settings, backend = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, mask, alibi_slopes, dropout_seed, out, stats)
    ctx.settings, ctx.backend = settings, backend


def _differentiate(ctx, dout, _dstats, backward):
    if dout is None:
        return (None,) * 12
    q, k, v, mask, alibi_slopes, dropout_seed, out, stats = ctx.saved_tensors
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    mask_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dmask = backward(
        q, k, v, mask, alibi_slopes, dropout_seed, *ctx.settings, out, stats, dout, mask_grad, ctx.backend
    )
    return dq, dk, dv, dmask if mask_grad else None, *(None,) * 8


attention_op.register_autograd(
    functools.partial(_differentiate, backward=attention_backward_op), setup_context=_setup_context
)
_AttentionFunction = eager_function(
    "genfast.Attention", _forward, _setup_context, functools.partial(_differentiate, backward=_backward),
    non_differentiable=(1,),
)


def _as_4d(t: Tensor) -> Tensor:
    """(..., H, S, D) as (batch, H, S, D), the kernels' layout; (S, D) as (1, 1, S, D)."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, *t.shape[-3:])


def _check_window(window_size) -> tuple[int, int] | None:
    if window_size is None:
        return None
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1 for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right), -1 for no bound; got {window_size!r}")
    return int(window_size[0]), int(window_size[1])


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``, flash-attention style.

    query (..., H, S_q, E), key (..., H_k, S_k, E), value (..., H_k, S_k, E_v); fp32,
    fp16, bf16 or fp64. attn_mask: bool (True keeps a pair) or float (added to the
    scores), broadcastable to (..., H, S_q, S_k); its gradient is returned when it
    requires one. is_causal masks key j > query i (aligned at the top left, as torch).
    enable_gqa lets H_k divide H. Beyond torch: window_size=(left, right) keeps keys
    i - left ..= i + right (-1: no bound), alibi_slopes (H,) or (..., H) subtracts
    slope * |i - j|, softcap c replaces a score s by c * tanh(s / c) before the mask.
    dropout_p > 0 zeroes each attention weight with that probability and scales the kept
    ones by 1 / (1 - dropout_p), as torch does; which weights is decided by a counter-based
    stream (genfast/reference/attention.py's dropout_keep) whose seed is drawn from torch's
    default CPU generator, so that torch.manual_seed reproduces it on every backend.
    """
    check_tensor("query", query, min_dim=2)
    check_tensor("key", key, min_dim=2, like=query)
    check_tensor("value", value, min_dim=2, like=query)
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            f"query, key and value must have one dtype, got {query.dtype}, {key.dtype} and {value.dtype}"
        )
    # Compared, not hashed: under torch.export's dynamic shapes the sizes are SymInts.
    if not (query.dim() == key.dim() == value.dim() and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            "query, key and value must have the same leading (batch) dimensions, got "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's head size {key.shape[-1]} must equal query's {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2] or (value.dim() > 2 and value.shape[-3] != key.shape[-3]):
        raise ValueError(f"value {tuple(value.shape)} must have key's heads and length, key {tuple(key.shape)}")
    heads, kv_heads = (query.shape[-3], key.shape[-3]) if query.dim() > 2 else (1, 1)
    if kv_heads != heads and not (enable_gqa and heads % kv_heads == 0):
        raise ValueError(
            f"key's {kv_heads} heads must equal query's {heads}"
            + ("" if enable_gqa else ", or divide them with enable_gqa=True")
        )
    queries, keys = query.shape[-2], key.shape[-2]
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool, *FLOAT_DTYPES), like=query)
        try:
            torch.broadcast_shapes(attn_mask.shape, (*query.shape[:-1], keys))
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' "
                f"{(*query.shape[:-1], keys)}"
            ) from None
        if is_causal:
            raise ValueError("attn_mask and is_causal=True cannot be given together (as in torch)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    window = _check_window(window_size)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, like=query)
        if alibi_slopes.shape not in ((heads,), (*query.shape[:-3], heads)):
            raise ValueError(
                f"alibi_slopes must have shape ({heads},) or {(*query.shape[:-3], heads)}, got {tuple(alibi_slopes.shape)}"
            )
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")

    backend = resolve("scaled_dot_product_attention", query.device, _IMPLEMENTED)
    if backend == "reference" or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return reference.attention.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, alibi_slopes, softcap
        )

    math_dtype = _math_dtype(query)
    q, k, v = (_as_4d(t if t.stride(-1) == 1 else t.contiguous()) for t in (query, key, value))
    batch = q.shape[0]
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(math_dtype)
        mask = _as_4d(mask.expand(*query.shape[:-1], keys)).expand(batch, heads, queries, keys)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(math_dtype).reshape(-1, heads).expand(batch, heads)
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    # reference.random.seed_from_torch's draw, left a tensor so that torch.compile traces it.
    dropout_seed = torch.randint(2**62, ()) if dropout_p > 0 else None
    args = (
        q, k, v, mask, slopes, dropout_seed,
        1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale),
        0.0 if softcap is None else float(softcap),
        left, right, float(dropout_p), backend,
    )
    out, _ = attention_op(*args) if torch.compiler.is_compiling() else _AttentionFunction.call(*args)
    return out.view(*query.shape[:-1], value.shape[-1])


def _decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    scale: float,
    softcap: float,
    window_left: int,
    window_right: int,
    backend: str,
) -> Tensor:
    """The output (B, H, S_q, D_v) of q over each batch element's first lengths[b] cache rows;
    lengths and block_table int64, alibi_slopes expanded to (B, H) in the math type."""
    return kernels(backend, "attention").attention_decode(
        q, k_cache, v_cache, lengths, block_table, alibi_slopes, scale, softcap, window_left, window_right
    )


decode_op = torch.library.custom_op("genfast::attention_decode", _decode, mutates_args=())


@decode_op.register_fake
def _(q, k_cache, v_cache, lengths, block_table, alibi_slopes, scale, softcap, window_left, window_right, backend):
    return q.new_empty((*q.shape[:3], v_cache.shape[3]))


def _append(cache: Tensor, new: Tensor, cache_seqlens: Tensor, block_table: Tensor | None) -> None:
    """new (B, H_k, S_new, E) into cache rows cache_seqlens[b] + [0, S_new), in one indexed write."""
    batch, _, length, _ = new.shape
    positions = cache_seqlens.long()[:, None] + torch.arange(length, device=new.device)
    if block_table is None:
        cache.transpose(1, 2)[torch.arange(batch, device=new.device)[:, None], positions] = new.transpose(1, 2)
    else:
        block_size = cache.shape[2]
        blocks = block_table.long().gather(1, positions // block_size)
        cache.transpose(1, 2)[blocks, positions % block_size] = new.transpose(1, 2)


def attention_with_kv_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: Tensor | None = None,
    *,
    block_table: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Attention of a few new queries over a KV cache, for decoding (FlashAttention's
    flash_attn_with_kvcache in torch's (B, H, S, E) layout; forward only).

    q (B, H, S_q, E). k_cache (B, H_k, S_max, E) and v_cache (B, H_k, S_max, E_v), or paged:
    (blocks, H_k, block_size, E) with block_table (B, max_blocks) of int block indices, logical
    row j of element b lying at row j % block_size of block block_table[b, j // block_size].
    k and v (B, H_k, S_q, E and E_v), when given, are first written into the caches at rows
    cache_seqlens[b] + [0, S_q) (in place). Element b then attends its first L_b rows,
    L_b = cache_seqlens[b] (+ S_q when appending); cache_seqlens None means the whole cache.
    The queries are the last S_q positions (aligned at the bottom right): is_causal, the
    window (left, right) and ALiBi measure from there. The cache is read once per key head
    for all the heads that share it, split along the sequence and combined.
    """
    check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, S_q, E), got {tuple(q.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, like=q)
        if cache.dim() != 4 or cache.dtype != q.dtype:
            raise ValueError(f"{name} must be a 4-D tensor of q's dtype {q.dtype}, got {tuple(cache.shape)} {cache.dtype}")
    batch, heads, queries, dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[3] != dim or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"k_cache must have q's head size {dim} and v_cache k_cache's first three sizes; "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the caches' {kv_heads} heads must divide q's {heads}")
    if block_table is not None:
        check_tensor("block_table", block_table, dtypes=(torch.int32, torch.int64), like=q)
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape ({batch}, max_blocks), got {tuple(block_table.shape)}")
        capacity = block_table.shape[1] * k_cache.shape[2]
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"a contiguous k_cache must have q's batch {batch}, got {k_cache.shape[0]}")
        capacity = k_cache.shape[2]
    if (k is None) != (v is None):
        raise ValueError("give both k and v to append, or neither")
    if k is not None:
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            check_tensor(name, new, like=q)
            if new.dtype != q.dtype or new.shape != (batch, kv_heads, queries, cache.shape[3]):
                raise ValueError(
                    f"{name} must have shape {(batch, kv_heads, queries, cache.shape[3])} and dtype {q.dtype}, "
                    f"got {tuple(new.shape)} {new.dtype}"
                )
    appended = 0 if k is None else queries
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), capacity - appended, dtype=torch.long, device=q.device)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), like=q)
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), got {tuple(cache_seqlens.shape)}")
    # On a GPU, checking the lengths would wait for it.
    if q.device.type == "cpu" and batch and (
        int(cache_seqlens.min()) + appended < queries or int(cache_seqlens.max()) + appended > capacity
    ):
        raise ValueError(
            f"cache_seqlens (+ the {appended} appended rows) must lie in [{queries}, {capacity}]: the queries "
            f"are the last rows of the cache, which holds {capacity}; got {cache_seqlens.tolist()}"
        )
    window = _check_window(window_size)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, like=q)
        if alibi_slopes.shape not in ((heads,), (batch, heads)):
            raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0):
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")

    backend = resolve("attention_with_kv_cache", q.device, _DECODE_IMPLEMENTED)
    if backend == "reference" or q.numel() == 0:
        return reference.attention.attention_with_kv_cache(
            q, k_cache, v_cache, k, v, cache_seqlens, block_table, is_causal, scale, window, alibi_slopes, softcap
        )
    if k is not None:
        _append(k_cache, k, cache_seqlens, block_table)
        _append(v_cache, v, cache_seqlens, block_table)
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    args = (
        q if q.stride(-1) == 1 else q.contiguous(),
        k_cache, v_cache,
        (cache_seqlens.long() + appended).contiguous(),
        None if block_table is None else block_table.long().contiguous(),
        None if alibi_slopes is None else alibi_slopes.to(_math_dtype(q)).reshape(-1, heads).expand(batch, heads),
        1.0 / math.sqrt(dim) if scale is None else float(scale),
        0.0 if softcap is None else float(softcap),
        left, right, backend,
    )
    return decode_op(*args) if torch.compiler.is_compiling() else _decode(*args)
