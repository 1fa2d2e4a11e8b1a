"""Rotary position embedding of q and k as Llama models apply it: q and k
come from one view+transpose of the projections, (B, H, S, D) over
(B, S, H, D) memory, and cos and sin are the model's (B, S, D) tables.
Backward differentiates q and k.
"""

from __future__ import annotations

import torch

import genfast
from genfast.reference.rotary import apply_rotary_pos_emb as reference_rope

from .harness import Case, Provider, op_providers

# source: (B, S, query heads, key heads, head size)
SHAPES = {"llama-7b": (1, 2048, 32, 32, 128), "llama-3-8b gqa": (4, 512, 32, 8, 128)}


def rotary_case(source: str, direction: str, quick: bool = False) -> Case:
    B, S, H, H_k, D = SHAPES[source]

    def make_inputs(device: torch.device) -> dict:
        q = torch.randn(B, S, H, D, device=device).transpose(1, 2)
        k = torch.randn(B, S, H_k, D, device=device).transpose(1, 2)
        freqs = torch.rand(B, S, D // 2, device=device) * S
        emb = torch.cat((freqs, freqs), dim=-1)
        return {"q": q, "k": k, "cos_sin": (emb.cos(), emb.sin())}

    elements = B * S * (H + H_k) * D
    # Forward reads q and k and writes their rotations; backward reads the gradients and writes q's and k's.
    return Case(f"{source} q {B}x{H}x{S}x{D}, k {H_k} heads", "rotary_embedding", direction, elements,
                make_inputs, 2 * elements * 4, quick=quick)


CASES = [rotary_case(source, direction, quick=True) for source in SHAPES for direction in ("forward", "backward")]


def _genfast(q, k, cos_sin):
    return genfast.ops.apply_rotary_pos_emb(q, k, *cos_sin)


def _torch(q, k, cos_sin):
    """transformers' Llama: q * cos + rotate_half(q) * sin in eager PyTorch."""
    return reference_rope(q, k, *cos_sin)


def providers(device_type: str) -> list[Provider]:
    # torch's eager provider is genfast's reference, transformers' formula: no separate reference.
    return op_providers(device_type, _genfast, _torch)
