"""torch.nn.MultiheadAttention running genfast's attention kernels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask in torch.nn.MultiheadAttention's convention (bool True: masked out; float: added)
    as a float mask to add to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention: same constructor, parameters and state_dict.

    With need_weights=False, the attention runs in genfast's fused kernel: the projected
    q, k and v are read in place and no (L, S) weight matrix is made. need_weights=True,
    add_bias_kv and add_zero_attn run torch's own forward, which returns the weights.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._project(query, key, value)

        mask = None
        # The is_causal hint stands for attn_mask when nothing else masks: the kernel then skips
        # the masked tiles instead of reading a mask.
        causal = is_causal and key_padding_mask is None
        if not causal:
            if attn_mask is not None:
                mask = _additive(attn_mask, q.dtype)
                if mask.dim() == 3:
                    mask = mask.view(batch, self.num_heads, queries, keys)
            if key_padding_mask is not None:
                padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, keys)
                mask = padding if mask is None else mask + padding
        out = ops.scaled_dot_product_attention(
            q, k, v, mask, self.dropout if self.training else 0.0, is_causal=causal
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, queries, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (N, H, L, head_dim) views of the in-projections; self-attention makes one
        product of query with the stacked weights."""
        heads, head_dim = self.num_heads, self.head_dim

        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (heads, head_dim)).transpose(1, 2)

        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
                return split(q), split(k), split(v)
            weights = self.in_proj_weight.chunk(3)
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return tuple(split(F.linear(x, w, b)) for x, w, b in zip((query, key, value), weights, biases))
