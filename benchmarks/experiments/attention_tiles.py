"""Tile shapes of the Triton attention kernels on a GPU: each candidate's time, TFLOP/s (or
GB/s for decoding) and error against torch's own kernel, at the issue's case (bf16, head dim
128, S=4096, causal) and GPT-2's. Picks what kernels/attention.py's tile_config and
decode_config return; writes a table to stdout and every number to the JSON file named.

    python benchmarks/experiments/attention_tiles.py out.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from genfast.kernels import attention as kernels
from genfast.ops import attention_with_kv_cache, scaled_dot_product_attention

SHAPES = {  # name: (B, H, S, E)
    "issue-4 llama-7b": (2, 32, 4096, 128),
    "gpt2": (16, 12, 1024, 64),
}
TILES = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
    (64, 128, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
]
DECODE = [  # BLOCK_N, programs, num_warps, num_stages
    (64, 264, 4, 3), (64, 528, 4, 3), (64, 1056, 4, 3), (128, 528, 4, 3), (128, 528, 8, 3),
    (32, 528, 4, 4), (64, 528, 8, 3), (128, 1056, 8, 2),
]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def with_tiles(tiles, fn):
    """fn() with tile_config returning these tiles for the tensor-core dtypes."""
    chosen = tile_config = kernels.tile_config
    if tiles is not None:
        block_m, block_n, warps, stages = tiles
        chosen = lambda *args: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)  # noqa: E731
    kernels.tile_config = chosen
    try:
        return fn()
    finally:
        kernels.tile_config = tile_config


def attention_rows(name, is_causal):
    B, H, S, E = SHAPES[name]
    q, k, v = (torch.randn(B, H, S, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    forward_flops = 4 * B * H * S * S * E * (0.5 if is_causal else 1.0)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    rows = []

    def measure(provider, tiles, forward):
        out = with_tiles(tiles, forward)
        grads = with_tiles(tiles, lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
        forward_ms = with_tiles(tiles, lambda: do_bench(forward, warmup=25, rep=200, return_mode="median"))
        backward_ms = with_tiles(tiles, lambda: do_bench(
            lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=25, rep=200,
            return_mode="median"))
        rows.append({
            "case": f"{name} {'causal' if is_causal else 'full'}", "provider": provider, "tiles": tiles or "default",
            "forward_ms": forward_ms, "forward_tflops": forward_flops / forward_ms / 1e9,
            "backward_ms": backward_ms, "backward_tflops": 2.5 * forward_flops / backward_ms / 1e9,
            "out_error": relative_error(out, expected),
            "grad_error": max(relative_error(g, e) for g, e in zip(grads, expected_grads)),
        })
        print(rows[-1], flush=True)

    measure("torch", None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))
    for tiles in [None, *TILES]:
        try:
            measure("genfast[triton]", tiles,
                    lambda: scaled_dot_product_attention(q, k, v, is_causal=is_causal))
        except Exception as error:  # noqa: BLE001 - a tile shape that does not fit is reported, not fatal
            rows.append({"case": name, "provider": "genfast[triton]", "tiles": tiles, "error": repr(error)[:300]})
            print(rows[-1], flush=True)
    return rows


def decode_rows():
    B, H, H_K, S, E = 16, 32, 8, 8192, 128
    q = torch.randn(B, H, 1, E, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(B, H_K, S, E, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cache_bytes = 2 * B * H_K * S * E * 2
    expected = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
    rows = []
    candidates = [("torch", None)] + [("genfast[triton]", c) for c in [None, *DECODE]]
    decode_config = kernels.decode_config
    for provider, settings in candidates:
        if settings is not None:
            block_n, programs, warps, stages = settings
            kernels.decode_config = lambda *args: dict(  # noqa: E731
                BLOCK_N=block_n, programs=programs, num_warps=warps, num_stages=stages)
        call = ((lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)) if provider == "torch"
                else (lambda: attention_with_kv_cache(q, k_cache, v_cache)))
        try:
            out = call()
            ms = do_bench(call, warmup=25, rep=200, return_mode="median")
            rows.append({"case": "decode llama-3-8b 16x32x1 over 8192, 8 kv heads", "provider": provider,
                         "settings": settings or "default", "ms": ms, "GB/s": cache_bytes / ms / 1e6,
                         "error": relative_error(out, expected)})
        except Exception as error:  # noqa: BLE001
            rows.append({"provider": provider, "settings": settings, "failure": repr(error)[:300]})
        finally:
            kernels.decode_config = decode_config
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.manual_seed(0)
    rows = decode_rows()
    rows += attention_rows("issue-4 llama-7b", True)
    rows += attention_rows("gpt2", True)
    with open(sys.argv[1] if len(sys.argv) > 1 else "attention_tiles.json", "w") as file:
        json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()
