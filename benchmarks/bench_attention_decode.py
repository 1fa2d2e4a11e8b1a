"""Decoding attention: one new token per sequence attending over a full KV cache,
against torch's F.scaled_dot_product_attention over the same cache (GQA through
enable_gqa). Memory-bound: the roofline is the cache's bytes, read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import genfast
from genfast.reference.attention import attention_with_kv_cache as reference_decode

from .harness import Case, Provider, op_providers

# source: (B, H, H_k, cached tokens, E, dtype, devices)
SHAPES = {
    "llama-3-8b": (4, 32, 8, 4096, 128, torch.float32, ("cpu",)),
    "llama-7b": (4, 32, 32, 2048, 128, torch.float32, ("cpu",)),
    "llama-3-8b bf16": (16, 32, 8, 8192, 128, torch.bfloat16, ("cuda",)),
}


def decode_case(source: str) -> Case:
    B, H, H_k, S, E, dtype, devices = SHAPES[source]

    def make_inputs(device: torch.device) -> dict:
        q = torch.randn(B, H, 1, E, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(B, H_k, S, E, device=device, dtype=dtype) for _ in range(2))
        return {"q": q, "k_cache": k_cache, "v_cache": v_cache}

    cache_bytes = 2 * B * H_k * S * E * (torch.finfo(dtype).bits // 8)
    name = f"{source} {B}x{H}x1 over {S} cached" + (f", {H_k} kv heads" if H_k != H else "")
    return Case(name, "attention_with_kv_cache", "forward", B * H_k * S * E, make_inputs, cache_bytes,
                flops=4 * B * H * S * E, quick=source == "llama-3-8b", devices=devices)


CASES = [decode_case(source) for source in SHAPES]


def _genfast(q, k_cache, v_cache):
    return genfast.ops.attention_with_kv_cache(q, k_cache, v_cache)


def _torch(q, k_cache, v_cache):
    return F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=k_cache.shape[1] != q.shape[1])


def _reference(q, k_cache, v_cache):
    return reference_decode(q, k_cache, v_cache)


def providers(device_type: str) -> list[Provider]:
    return op_providers(device_type, _genfast, _torch, _reference)
