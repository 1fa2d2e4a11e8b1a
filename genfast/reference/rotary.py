"""Rotary position embedding (RoPE), in the "rotate half" form of GPT-NeoX and
Hugging Face's Llama: the first and second halves of the rotated dimensions
are the two coordinates of each rotated pair."""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """q * cos + rotate_half(q) * sin, and the same for k, over the first R = cos.shape[-1]
    dimensions of the head; the others pass through (partial rotary, as GPT-NeoX's).

    q: (B, H, S, D) with unsqueeze_dim=1, or (B, S, H, D) with unsqueeze_dim=2; k alike with
    its own head count. cos, sin: (B, S, R) or (S, R), R even and at most D. fp16/bf16 are
    computed in fp32 and rounded once.
    """
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # A heads axis to broadcast over; a (S, R) table has no batch axis before it.
    cos, sin = (t.to(compute).unsqueeze(unsqueeze_dim if t.dim() == 3 else unsqueeze_dim - 1) for t in (cos, sin))
    rotary = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute)
        turned = x[..., :rotary] * cos + rotate_half(x[..., :rotary]) * sin
        return torch.cat((turned, x[..., rotary:]), dim=-1)

    return rotate(q).to(q.dtype), rotate(k).to(k.dtype)
