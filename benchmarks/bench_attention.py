"""Scaled dot-product attention at the shapes of real models, against torch's own
F.scaled_dot_product_attention (its fused CPU flash kernel, cuDNN or FlashAttention
on a GPU). A sliding window reaches torch as the equivalent bool mask. With dropout,
torch draws its mask from its own generator: the same work, other weights dropped.

flops counts the products that must be done: 4 B H S_q S_k E for the forward, half
of it under causality or the window's share; the backward does 2.5 times the
forward's (FlashAttention's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
from genfast.reference.attention import allowed_keys
from genfast.reference.attention import scaled_dot_product_attention as reference_attention

from .harness import Case, Provider, op_providers

# source: (B, H, H_k, S, E, dtype, devices)
SHAPES = {
    "issue-4 cpu": (4, 8, 8, 1024, 64, torch.float32, ("cpu",)),
    "gpt2-small": (4, 12, 12, 512, 64, torch.float32, ("cpu",)),
    "llama-3-8b gqa": (1, 32, 8, 2048, 128, torch.float32, ("cpu",)),
    "llama-7b bf16": (2, 32, 32, 4096, 128, torch.bfloat16, ("cuda",)),
}
MASKS = {"causal": (True, None), "full": (False, None), "window 256": (True, (256, 0))}


def attention_case(source: str, mask: str, direction: str, quick: bool = False, dropout_p: float = 0.0) -> Case:
    B, H, H_k, S, E, dtype, devices = SHAPES[source]
    is_causal, window = MASKS[mask]

    def make_inputs(device: torch.device) -> dict:
        q = torch.randn(B, H, S, E, device=device, dtype=dtype)
        k, v = (torch.randn(B, H_k, S, E, device=device, dtype=dtype) for _ in range(2))
        return {"q": q, "k": k, "v": v, "is_causal": is_causal, "window": window, "dropout_p": dropout_p}

    pairs = allowed_keys(S, S, is_causal, window, torch.device("cpu")).sum().item()
    forward_flops = 4 * B * H * pairs * E
    flops = forward_flops if direction == "forward" else 5 * forward_flops // 2
    element = torch.finfo(dtype).bits // 8
    moved = B * (2 * H + 2 * H_k) * S * E * element * (1 if direction == "forward" else 2)
    name = f"{source} {mask} {B}x{H}x{S}x{E}" + (f", {H_k} kv heads" if H_k != H else "")
    name += f", dropout {dropout_p}" if dropout_p else ""
    return Case(name, "scaled_dot_product_attention", direction, B * H * S * E, make_inputs, moved,
                flops=flops, quick=quick, variant=mask, devices=devices)


CASES = [
    *(attention_case("issue-4 cpu", mask, direction, quick=True) for mask in ("causal", "full")
      for direction in ("forward", "backward")),
    *(attention_case(source, mask, direction) for source in ("gpt2-small", "llama-3-8b gqa")
      for mask in ("causal", "window 256") for direction in ("forward", "backward")),
    *(attention_case("gpt2-small", "causal", direction, dropout_p=0.1) for direction in ("forward", "backward")),
    *(attention_case("llama-7b bf16", "causal", direction, dropout_p=dropout_p) for dropout_p in (0.0, 0.1)
      for direction in ("forward", "backward")),
]


def _genfast(q, k, v, is_causal, window, dropout_p):
    return genfast.ops.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1], window_size=window
    )


def _mask(q, k, is_causal, window):
    """torch's way to say a window: a bool mask (the causal part rides along)."""
    return allowed_keys(q.shape[2], k.shape[2], is_causal, window, q.device)


def _torch(q, k, v, is_causal, window, dropout_p):
    gqa = k.shape[1] != q.shape[1]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=_mask(q, k, is_causal, window), dropout_p=dropout_p, enable_gqa=gqa
    )


def _reference(q, k, v, is_causal, window, dropout_p):
    return reference_attention(
        q, k, v, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1], window_size=window
    )


def providers(device_type: str) -> list[Provider]:
    return op_providers(device_type, _genfast, _torch, _reference)
