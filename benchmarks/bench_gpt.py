"""The GPT-style decoder LM end to end at GPT-2 small's size (12 layers, d=768,
batch 4 x 512 tokens): the forward to the logits, and a training step (forward,
cross-entropy loss, backward). genfast builds the model from its layers; torch.nn
from torch's with the same weights; torch.nn+torch.compile compiles that model.
The matrix products are the same in all three.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import genfast
from genfast.models import GPT, GPTConfig

from .harness import Case, Provider, genfast_providers

CONFIG = GPTConfig()
BATCH, LENGTH = 4, 512


def _step(model, tokens, training: bool):
    if not training:
        with torch.no_grad():
            return model(tokens)
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach()


@functools.cache
def _cost(training: bool) -> tuple[int, int]:
    """(bytes of weights, flops) of one call, counted on the meta device: shapes only."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = GPT(CONFIG)
        _step(model, torch.zeros(BATCH, LENGTH + training, dtype=torch.long), training)
    return sum(p.numel() * p.element_size() for p in model.parameters()), counter.get_total_flops()


def gpt_case(training: bool) -> Case:
    def make_inputs(device: torch.device) -> dict:
        torch.manual_seed(0)
        reference = GPT(CONFIG).to(device)
        fused = GPT(CONFIG, fused=True).to(device)
        fused.load_state_dict(reference.state_dict())
        tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, LENGTH + training), device=device)
        models = {"genfast": fused, "torch": reference, "compiled": torch.compile(reference)}
        return {"models": models, "tokens": tokens, "training": training}

    weight_bytes, flops = _cost(training)
    what = "training step" if training else "forward"
    return Case(f"gpt2-small {what} {BATCH}x{LENGTH}", "gpt_lm", "forward", BATCH * LENGTH, make_inputs,
                weight_bytes, flops, variant=what)


CASES = [gpt_case(training=False), gpt_case(training=True)]


def _run(which: str):
    def run(models, tokens, training):
        return _step(models[which], tokens, training)

    return run


def providers(device_type: str) -> list[Provider]:
    return [
        *genfast_providers(_run("genfast"), device_type),
        Provider("torch.nn", _run("torch")),
        # The model compiled; its first (untimed) call compiles.
        Provider("torch.nn+torch.compile", _run("compiled")),
    ]
