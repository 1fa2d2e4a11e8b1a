"""LSTM and GRU recurrences, the specification of genfast's recurrent ops: torch.nn's cells
and layers written out step by step.

Weights follow torch.nn: weight_ih (G*H, I), weight_hh (G*H, P), biases (G*H,), gates stacked
in the order i, f, g, o (LSTM, G = 4) or r, z, n (GRU, G = 3); P is H, or proj_size for an
LSTM with a projection weight_hr (P, H).

    LSTM: i, f, o = sigmoid(.), g = tanh(.) of x W_ih^T + b_ih + h W_hh^T + b_hh
          c' = f c + i g,   h' = (o tanh(c')) W_hr^T   (without W_hr: o tanh(c'))
    GRU:  r, z = sigmoid(x W_ih^T + b_ih + h W_hh^T + b_hh)   (their rows of each)
          n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)),   h' = (1 - z) n + z h

A layer runs the cell over time (backwards for the reverse direction). With lengths, row b
of the batch has lengths[b] steps: past them its state does not change and its output is 0,
so the reverse direction starts each row at its own last step, as a PackedSequence does.

A layer-normalized LSTM (Ba et al., 2016, as PyTorch's fastrnns LayerNormLSTMCell writes it)
normalizes the two products over their 4H gates and the new cell over its H units, each
LayerNorm with its own weight and bias:

    gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) (+ b_ih + b_hh),   c' = f c + i g,
    h' = o tanh(LN_c(c'))

Zoneout (Krueger et al., 2016) keeps a share of each state unit from the step before: with
masks zoneout_h (T, B, P) and zoneout_c (T, B, H), step t's new states are
    h_t = m_h h_{t-1} + (1 - m_h) h',   c_t = m_c c_{t-1} + (1 - m_c) c'
(h_t is also the step's output). Training draws m from Bernoulli(p); evaluation sets m = p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CellNorms:
    """The LayerNorms of a layer-normalized LSTM: (weight, bias) of LN_ih and LN_hh (4H each)
    and of LN_c (H), and their epsilon."""

    ih: tuple[Tensor, Tensor]
    hh: tuple[Tensor, Tensor]
    c: tuple[Tensor, Tensor]
    eps: float = 1e-5


def _norm(x: Tensor, parameters: tuple[Tensor, Tensor], eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], *parameters, eps)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
              bias_hh: Tensor | None, weight_hr: Tensor | None = None,
              norms: CellNorms | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step for x (B, I), h (B, P), c (B, H): (h', c')."""
    x_gates, h_gates = x @ weight_ih.t(), h @ weight_hh.t()
    if norms is not None:
        x_gates, h_gates = _norm(x_gates, norms.ih, norms.eps), _norm(h_gates, norms.hh, norms.eps)
    gates = x_gates + h_gates
    if bias_ih is not None:
        gates = gates + bias_ih + bias_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c if norms is None else _norm(c, norms.c, norms.eps))
    return (h if weight_hr is None else h @ weight_hr.t()), c


def gru_cell(x: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
             bias_hh: Tensor | None) -> Tensor:
    """One GRU step for x (B, I), h (B, H): h'."""
    x_gates, h_gates = x @ weight_ih.t(), h @ weight_hh.t()
    if bias_ih is not None:
        x_gates, h_gates = x_gates + bias_ih, h_gates + bias_hh
    x_r, x_z, x_n = x_gates.chunk(3, dim=-1)
    h_r, h_z, h_n = h_gates.chunk(3, dim=-1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _run(step, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
         zoneout: tuple[Tensor | None, ...] = ()):
    """Applies step(x_t, *states) -> new states over time; the first state is the output.
    zoneout holds a mask (T, B, size) or None per state."""
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs = [None] * x.shape[0]
    for t in steps:
        new = step(x[t], *states)
        new = new if isinstance(new, tuple) else (new,)
        new = tuple(n if m is None else m[t] * s + (1 - m[t]) * n
                    for n, s, m in zip(new, states, (*zoneout, *(None,) * len(new))))
        if lengths is not None:
            live = (t < lengths).to(x.device)[:, None]
            new = tuple(torch.where(live, n, s) for n, s in zip(new, states))
            outputs[t] = torch.where(live, new[0], 0.0)
        else:
            outputs[t] = new[0]
        states = new
    return torch.stack(outputs), states


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
               bias_hh: Tensor | None, weight_hr: Tensor | None = None, lengths: Tensor | None = None,
               reverse: bool = False, zoneout_h: Tensor | None = None, zoneout_c: Tensor | None = None,
               norms: CellNorms | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one LSTM layer over x (T, B, I): (output (T, B, P), h_n, c_n)."""
    output, (h, c) = _run(
        lambda x_t, h, c: lstm_cell(x_t, h, c, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, norms),
        x, (h0, c0), lengths, reverse, (zoneout_h, zoneout_c),
    )
    return output, h, c


def gru_layer(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
              bias_hh: Tensor | None, lengths: Tensor | None = None, reverse: bool = False,
              zoneout_h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One direction of one GRU layer over x (T, B, I): (output (T, B, H), h_n)."""
    output, (h,) = _run(
        lambda x_t, h: gru_cell(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh), x, (h0,), lengths, reverse,
        (zoneout_h,),
    )
    return output, h
