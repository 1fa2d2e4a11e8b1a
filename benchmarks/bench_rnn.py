"""LSTM and GRU layers and cells, genfast.nn against torch.nn with the same weights:
- PyTorch's fastrnns shape (T=100, batch 64, input = hidden = 512), forward and a training
  step (forward, loss, backward), where both sit near the matrix-product rate;
- the same batch packed with lengths spread over 1..T (a PackedSequence);
- streaming inference, batch 1, input = hidden = 256, T=100, where per-step overhead rules;
- a user's loop over LSTMCell and GRUCell for 100 steps, batch 16, hidden 256;
- on a GPU, against cuDNN: fastrnns, streaming, and batch 16 at hidden 512;
- a layer-normalized LSTM (fastrnns' LayerNormLSTMCell) at the fastrnns shape, against the
  same cell written in PyTorch and run step by step, as a user without genfast writes it.
torch.compile is left out: it refuses to trace nn.LSTM and nn.GRU (a graph break).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import genfast
from genfast.reference import rnn as reference_rnn

from .harness import Case, Provider, genfast_providers


@dataclass(frozen=True)
class Shape:
    name: str
    steps: int
    batch: int
    size: int  # input and hidden
    packed: bool = False
    cell: bool = False
    layer_norm: bool = False
    devices: tuple[str, ...] = ("cpu",)


SHAPES = [
    Shape("fastrnns", 100, 64, 512, devices=("cpu", "cuda")),
    Shape("fastrnns packed", 100, 64, 512, packed=True),
    Shape("streaming", 100, 1, 256, devices=("cpu", "cuda")),
    Shape("cell loop", 100, 16, 256, cell=True),
    Shape("small batch", 100, 16, 512, devices=("cuda",)),
    Shape("layer-norm fastrnns", 100, 64, 512, layer_norm=True, devices=("cpu", "cuda")),
]
KINDS = {"lstm": 4, "gru": 3}  # gates


class _StepByStepLayerNormLSTM(nn.Module):
    """A layer-normalized LSTM in plain PyTorch, one step at a time (genfast/reference/rnn.py's),
    over the parameters of the genfast module it wraps."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        m = self.fused
        norms = reference_rnn.CellNorms(*((getattr(m, f"layer_norm_{part}_weight_l0"),
                                           getattr(m, f"layer_norm_{part}_bias_l0")) for part in ("ih", "hh", "c")))
        state = x.new_zeros(x.shape[1], m.hidden_size)
        return reference_rnn.lstm_layer(x, state, state, m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0,
                                        norms=norms)[:1]


def _models(kind: str, shape: Shape, device: torch.device) -> dict[str, nn.Module]:
    """{"genfast": ..., "torch": ...} with the same weights."""
    if shape.layer_norm:
        fused = genfast.nn.LSTM(shape.size, shape.size, layer_norm=True).to(device)
        return {"genfast": fused, "torch": _StepByStepLayerNormLSTM(fused)}
    name = kind.upper() + ("Cell" if shape.cell else "")
    reference = getattr(nn, name)(shape.size, shape.size).to(device)
    fused = getattr(genfast.nn, name)(shape.size, shape.size).to(device)
    fused.load_state_dict(reference.state_dict())
    return {"genfast": fused, "torch": reference}


def _call(kind: str, shape: Shape, model: nn.Module, x, training: bool):
    if shape.cell:
        state = None
        outputs = []
        for t in range(x.shape[0]):
            state = model(x[t], state)
            outputs.append(state[0] if kind == "lstm" else state)
        output = torch.stack(outputs)
    else:
        output = model(x)[0]
        output = output.data if shape.packed else output
    if training:
        output.square().mean().backward()
    return output


def _lengths(shape: Shape) -> torch.Tensor:
    """A packed batch's lengths, spread evenly from T down to 1."""
    return torch.linspace(shape.steps, 1, shape.batch).round().long()


def rnn_case(kind: str, shape: Shape, training: bool) -> Case:
    def make_inputs(device: torch.device) -> dict:
        torch.manual_seed(0)
        x = torch.randn(shape.steps, shape.batch, shape.size, device=device)
        if shape.packed:
            x = pack_padded_sequence(x, _lengths(shape))
        return {"kind": kind, "shape": shape, "models": _models(kind, shape, device), "x": x, "training": training}

    products = 3 if training else 1
    steps = int(_lengths(shape).sum()) if shape.packed else shape.steps * shape.batch  # summed over rows
    flops = products * 2 * steps * KINDS[kind] * shape.size * 2 * shape.size
    weight_bytes = KINDS[kind] * shape.size * 2 * shape.size * 4
    what = "training step" if training else "forward"
    return Case(f"{shape.name} {what}, T={shape.steps} batch {shape.batch} size {shape.size}", kind, "forward",
                shape.steps * shape.batch * shape.size, make_inputs, weight_bytes, flops,
                quick=shape.name == "fastrnns" and not training, variant=f"{shape.name}, {what}", devices=shape.devices)


CASES = [
    rnn_case(kind, shape, training)
    for kind in KINDS
    for shape in SHAPES
    if kind == "lstm" or not shape.layer_norm
    for training in ((False, True) if "fastrnns" in shape.name else (False,))
]


def _run(which: str) -> Callable:
    def run(kind, shape, models, x, training):
        model = models[which]
        if not training:
            with torch.no_grad():
                return _call(kind, shape, model, x, False)
        model.zero_grad(set_to_none=True)
        return _call(kind, shape, model, x, True).detach()

    return run


def providers(device_type: str) -> list[Provider]:
    return [*genfast_providers(_run("genfast"), device_type), Provider("torch.nn", _run("torch"))]
