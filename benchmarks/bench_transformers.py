"""Transformer models end to end, genfast's layers against torch.nn's with the same weights
(and torch.nn+torch.compile, that model compiled); the matrix products are the same in all
three. Each model runs its forward and a training step (forward, loss, backward):
- the GPT-style decoder LM at GPT-2 small's size (12 layers, d=768), batch 4 x 512 tokens,
  with the next-token cross-entropy (GPT.loss: genfast.ops.linear_cross_entropy in genfast's
  build);
- the BERT-style encoder at BERT-base's size (12 layers, d=768), batch 8 x 128 tokens with
  padding, with a squared-error stand-in for a task head's loss;
- the T5-style encoder-decoder at t5-v1_1-small's size (8 + 8 layers, d=512), batch 4 x 512
  encoder tokens and 128 decoder tokens, with the cross-entropy of the next decoder tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from genfast.models import BERT, GPT, T5, BERTConfig, GPTConfig, T5Config

from .harness import Case, Provider, model_providers, model_step


@dataclass(frozen=True)
class ModelSpec:
    op: str
    name: str
    build: Callable[[bool], nn.Module]  # fused -> the model
    batch: int
    length: int
    vocab_size: int
    loss: Callable[[nn.Module, Tensor], Tensor]  # (model, tokens) -> a scalar loss
    call: Callable[[nn.Module, Tensor], Tensor]  # (model, tokens) -> the forward's output


def _gpt_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return model.loss(tokens[:, :-1], tokens[:, 1:])


def _padding_mask(tokens: Tensor) -> Tensor:
    """Sequence b of the batch holds its last b * 8 positions as padding."""
    lengths = tokens.shape[1] - 8 * torch.arange(tokens.shape[0], device=tokens.device)
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]


def _bert_call(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(tokens, _padding_mask(tokens))


def _bert_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return _bert_call(model, tokens).square().mean()


T5_DECODER_LENGTH = 128


def _t5_call(model: nn.Module, tokens: Tensor) -> Tensor:
    return model(tokens, tokens[:, :T5_DECODER_LENGTH])


def _t5_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    return model.loss(tokens, tokens[:, :T5_DECODER_LENGTH], tokens[:, 1 : T5_DECODER_LENGTH + 1])


MODELS = [
    ModelSpec("gpt_lm", "gpt2-small", lambda fused: GPT(GPTConfig(), fused=fused), 4, 512, GPTConfig().vocab_size,
              _gpt_loss, lambda model, tokens: model(tokens)),
    ModelSpec("bert_encoder", "bert-base", lambda fused: BERT(BERTConfig(), fused=fused), 8, 128,
              BERTConfig().vocab_size, _bert_loss, _bert_call),
    ModelSpec("t5_encoder_decoder", "t5-v1_1-small", lambda fused: T5(T5Config(), fused=fused), 4, 512, T5Config().vocab_size,
              _t5_loss, _t5_call),
]


def _step(model: nn.Module, spec: ModelSpec, tokens: Tensor, training: bool):
    return model_step(model, training, lambda: spec.call(model, tokens), lambda: spec.loss(model, tokens))


def _tokens(spec: ModelSpec, training: bool, **kwargs) -> Tensor:
    # The LM's training step predicts each next token: one more position, shifted.
    extra = int(training and spec.op == "gpt_lm")
    return torch.randint(0, spec.vocab_size, (spec.batch, spec.length + extra), **kwargs)


@functools.cache
def _cost(spec: ModelSpec, training: bool) -> tuple[int, int]:
    """(bytes of weights, flops) of one call, counted on the meta device: shapes only."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = spec.build(False)
        _step(model, spec, _tokens(spec, training), training)
    return sum(p.numel() * p.element_size() for p in model.parameters()), counter.get_total_flops()


def model_case(spec: ModelSpec, training: bool) -> Case:
    def make_inputs(device: torch.device) -> dict:
        torch.manual_seed(0)
        reference = spec.build(False).to(device)
        fused = spec.build(True).to(device)
        fused.load_state_dict(reference.state_dict())
        models = {"genfast": fused, "torch": reference, "compiled": torch.compile(reference)}
        return {"spec": spec, "models": models, "tokens": _tokens(spec, training, device=device),
                "training": training}

    weight_bytes, flops = _cost(spec, training)
    what = "training step" if training else "forward"
    return Case(f"{spec.name} {what} {spec.batch}x{spec.length}", spec.op, "forward", spec.batch * spec.length,
                make_inputs, weight_bytes, flops, variant=what)


CASES = [model_case(spec, training) for spec in MODELS for training in (False, True)]


def providers(device_type: str) -> list[Provider]:
    return model_providers(device_type, _step)
