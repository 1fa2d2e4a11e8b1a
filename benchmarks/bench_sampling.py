"""Drawing the next token from a language model's logits with temperature, top-k and top-p,
against what a Hugging Face generate() loop runs: its temperature, top-k and top-p warpers
(a division, topk, a sort, a softmax and cumsum, two masked fills), then softmax and
torch.multinomial. The roofline: the logits read once.
"""

from __future__ import annotations

import torch

import genfast
from genfast.reference.sampling import sample as reference_sample

from .harness import Case, op_providers

# source: (rows, vocabulary)
SHAPES = {"gpt2 batch 32": (32, 50257), "llama-3 batch 8": (8, 128256)}
SETTINGS = {"t=0.8 top_k=50 top_p=0.9": (0.8, 50, 0.9), "t=1 top_p=0.95": (1.0, 0, 0.95)}


def sampling_case(source: str, setting: str, quick: bool = False) -> Case:
    rows, V = SHAPES[source]
    temperature, top_k, top_p = SETTINGS[setting]

    def make_inputs(device: torch.device) -> dict:
        logits = 3 * torch.randn(rows, V, device=device)
        return {"logits": logits, "temperature": temperature, "top_k": top_k, "top_p": top_p}

    return Case(f"{source} x {V} {setting}", "sample_tokens", "forward", rows * V, make_inputs, rows * V * 4,
                quick=quick, variant=setting)


CASES = [sampling_case(source, setting, quick=source == "gpt2 batch 32") for source in SHAPES for setting in SETTINGS]


def _genfast(logits, temperature, top_k, top_p):
    return genfast.ops.sample_tokens(logits, temperature, top_k, top_p)


def _torch(logits, temperature, top_k, top_p):
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, then its draw."""
    scores = logits / temperature
    if top_k > 0:
        scores = scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], float("-inf"))
    if top_p < 1:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative <= (1 - top_p)
        sorted_to_remove[..., -1:] = False
        scores = scores.masked_fill(sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def _reference(logits, temperature, top_k, top_p):
    return reference_sample(logits, temperature, top_k, top_p, torch.rand(logits.shape[:-1], device=logits.device))


def providers(device_type: str):
    return op_providers(device_type, _genfast, _torch, _reference)
