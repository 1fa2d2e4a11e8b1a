"""Token sampling from logits, the specification: temperature, then top-k, then top-p
(Hugging Face's warpers in that order), then one draw per row by inverse CDF.

What the kernels must match, on any backend:
- Temperature divides the logits: p_i is proportional to exp(x_i / T).
- top_k keeps every token whose logit is at least the k-th largest (ties at the edge stay).
- top_p then keeps every token whose probability is at least that of the token at which the
  descending cumulative probability, renormalised over the tokens top_k kept, first reaches
  top_p: the smallest such set, ties at its edge included.
- The draw: with u in [0, 1) for the row, the first token in vocabulary order at which the
  cumulative probability of the kept tokens exceeds u times their total.

Given the same u, every backend picks the same token wherever no cumulative sum lies
within rounding of u's target.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kept_tokens(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Which tokens each row may draw (bool, logits' shape); logits (..., V)."""
    x = logits.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        keep = x >= kth
    if top_p < 1:
        weights = torch.where(keep, torch.exp((x - x.amax(-1, keepdim=True)) / temperature), 0.0)
        descending = weights.sort(dim=-1, descending=True).values
        cumulative = descending.cumsum(-1)
        # The first position whose cumulative mass reaches top_p of the kept mass.
        edge = (cumulative < top_p * cumulative[..., -1:]).sum(-1, keepdim=True).clamp(max=x.shape[-1] - 1)
        keep &= weights >= descending.gather(-1, edge)
    return keep


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, uniform: Tensor) -> Tensor:
    """The drawn token of each row, int64 of shape logits.shape[:-1]; uniform has that shape."""
    x = logits.double()
    keep = kept_tokens(logits, temperature, top_k, top_p)
    weights = torch.where(keep, torch.exp((x - x.amax(-1, keepdim=True)) / temperature), 0.0)
    cumulative = weights.cumsum(-1)
    target = uniform.double().unsqueeze(-1) * cumulative[..., -1:]
    token = torch.searchsorted(cumulative, target, right=True).squeeze(-1)
    # u * total can round up to the total itself: the last kept token then.
    last_kept = x.shape[-1] - 1 - keep.flip(-1).int().argmax(-1)
    return torch.minimum(token, last_kept)
