"""Recurrent modules: torch.nn.LSTM, GRU, LSTMCell and GRUCell running genfast's recurrence
(genfast.ops.lstm_layer, gru_layer, lstm_cell, gru_cell), with torch's constructors,
parameters and state_dicts. The cells subclass torch's and override forward. LSTM and GRU
are their torch counterparts' siblings instead, built on the same nn.RNNBase: torch.compile
refuses to trace any instance of nn.LSTM or nn.GRU, which is the graph break they remove.

A PackedSequence runs as a padded batch with each row's length masked inside the time loop,
and comes back packed as it came. Beyond torch, LSTM and GRU take zoneout (Krueger et al.,
2016), fused into the time loop: each step keeps each unit of its state from the step before
with probability zoneout_hidden (zoneout_cell for an LSTM's cell), and in evaluation keeps
that share of it. LSTM(..., layer_norm=True) is a layer-normalized LSTM (PyTorch's fastrnns
LayerNormLSTMCell, genfast/reference/rnn.py), its LayerNorms' weights and biases named
layer_norm_{ih,hh,c}_{weight,bias}_l{k}[_reverse].
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import ops


def _packed_rows(batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """(lengths (B,) of the sorted rows, the index in a (T * B) padded batch of each packed row)."""
    present = torch.arange(int(batch_sizes[0]))[None, :] < batch_sizes[:, None]  # (T, B): row b has step t
    return present.sum(0), present.flatten().nonzero().squeeze(1)


# A layer-normalized LSTM's LayerNorms: over x W_ih^T, over h W_hh^T and over the cell.
_NORMED = ("ih", "hh", "c")


def _probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _zoneout_mask(module: nn.Module, p: float, like: Tensor, steps: int, size: int) -> Tensor | None:
    """The (T, B, size) zoneout mask of one layer and direction: Bernoulli(p) draws in training,
    p in evaluation; None without zoneout."""
    if not p:
        return None
    shares = like.new_full((steps, like.shape[1], size), p)
    return torch.bernoulli(shares) if module.training else shares


def _run_layers(module: nn.RNNBase, x: Tensor, h0: Tensor, c0: Tensor | None, lengths: Tensor | None):
    """The stacked, possibly bidirectional layers over x (T, B, I): (output, h_n, c_n)."""
    lstm = c0 is not None
    directions = 2 if module.bidirectional else 1
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            weights = [getattr(module, f"{name}{suffix}", None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            k = layer * directions + direction
            zoneout_h = _zoneout_mask(module, module.zoneout_hidden, x, x.shape[0], h0.shape[-1])
            if lstm:
                zoneout_c = _zoneout_mask(module, module.zoneout_cell, x, x.shape[0], c0.shape[-1])
                norms = None
                if module.layer_norm:
                    norms = ops.CellNorms(*((getattr(module, f"layer_norm_{part}_weight{suffix}"),
                                             getattr(module, f"layer_norm_{part}_bias{suffix}")) for part in _NORMED))
                out, h, c = ops.lstm_layer(x, h0[k], c0[k], *weights, getattr(module, f"weight_hr{suffix}", None),
                                           lengths, reverse=direction == 1, zoneout_h=zoneout_h, zoneout_c=zoneout_c,
                                           norms=norms)
                c_n.append(c)
            else:
                out, h = ops.gru_layer(x, h0[k], *weights, lengths, reverse=direction == 1, zoneout_h=zoneout_h)
            outputs.append(out)
            h_n.append(h)
        x = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            x = F.dropout(x, module.dropout, training=True)
    return x, torch.stack(h_n), torch.stack(c_n) if lstm else None


def _forward(module: nn.RNNBase, input, hx, lstm: bool):
    """torch.nn.LSTM's and GRU's forward over genfast's layers."""
    directions = 2 if module.bidirectional else 1
    state_size = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0])
        lengths, rows = _packed_rows(batch_sizes)
        if hx is not None:  # the states of the user's rows, in the packed (sorted) order
            hx = tuple(h.index_select(1, sorted_indices) for h in hx) if lstm else hx.index_select(1, sorted_indices)
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"{type(module).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if module.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        batch, lengths, batch_sizes = input.shape[0 if module.batch_first else 1], None, None
    if hx is None:
        like = data if packed else input
        h0 = like.new_zeros(module.num_layers * directions, batch, state_size)
        hx = (h0, like.new_zeros(module.num_layers * directions, batch, module.hidden_size)) if lstm else h0
    module.check_forward_args(data if packed else input, hx, batch_sizes)

    if packed:
        steps = batch_sizes.numel()
        x = data.new_zeros(steps * batch, data.shape[-1]).index_copy(0, rows.to(data.device), data)
        x = x.view(steps, batch, -1)
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    output, h_n, c_n = _run_layers(module, x, hx[0] if lstm else hx, hx[1] if lstm else None,
                                   None if lengths is None else lengths.to(x.device))

    if packed:
        output = PackedSequence(output.flatten(0, 1).index_select(0, rows.to(output.device)), batch_sizes,
                                sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = None if c_n is None else c_n.index_select(1, unsorted_indices)
    else:
        output = output.transpose(0, 1) if module.batch_first else output
        if not batched:
            output = output.squeeze(0 if module.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
    return (output, (h_n, c_n)) if lstm else (output, h_n)


class LSTM(nn.RNNBase):
    """torch.nn.LSTM: every constructor argument (num_layers, bias, batch_first, dropout,
    bidirectional, proj_size), unbatched input, initial states and PackedSequence; and
    zoneout_cell, zoneout_hidden (the module docstring)."""

    def __init__(self, *args, zoneout_cell: float = 0.0, zoneout_hidden: float = 0.0, layer_norm: bool = False,
                 **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.zoneout_cell = _probability("zoneout_cell", zoneout_cell)
        self.zoneout_hidden = _probability("zoneout_hidden", zoneout_hidden)
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:
            factory = {"device": self.weight_ih_l0.device, "dtype": self.weight_ih_l0.dtype}
            for layer in range(self.num_layers):
                for suffix in (f"_l{layer}", f"_l{layer}_reverse")[: 2 if self.bidirectional else 1]:
                    for part, size in zip(_NORMED, (4 * self.hidden_size, 4 * self.hidden_size, self.hidden_size)):
                        self.register_parameter(f"layer_norm_{part}_weight{suffix}",
                                                nn.Parameter(torch.ones(size, **factory)))
                        self.register_parameter(f"layer_norm_{part}_bias{suffix}",
                                                nn.Parameter(torch.zeros(size, **factory)))

    def reset_parameters(self) -> None:
        """torch's initialisation, and LayerNorm's (ones and zeros) for the norms."""
        super().reset_parameters()
        for name, parameter in self.named_parameters():
            if name.startswith("layer_norm_") and "_weight" in name:
                nn.init.ones_(parameter)
            elif name.startswith("layer_norm_"):
                nn.init.zeros_(parameter)

    def extra_repr(self) -> str:
        extras = f", zoneout_cell={self.zoneout_cell}" if self.zoneout_cell else ""
        extras += f", zoneout_hidden={self.zoneout_hidden}" if self.zoneout_hidden else ""
        return super().extra_repr() + extras + (", layer_norm=True" if self.layer_norm else "")

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None):
        return _forward(self, input, hx, lstm=True)


class GRU(nn.RNNBase):
    """torch.nn.GRU: every constructor argument, unbatched input, initial state and PackedSequence;
    and zoneout_hidden (the module docstring)."""

    def __init__(self, *args, zoneout_hidden: float = 0.0, **kwargs):
        super().__init__("GRU", *args, **kwargs)
        self.zoneout_hidden = _probability("zoneout_hidden", zoneout_hidden)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", zoneout_hidden={self.zoneout_hidden}" if self.zoneout_hidden else "")

    def forward(self, input, hx=None):
        return _forward(self, input, hx, lstm=False)


def _cell_input(cell: nn.Module, input: Tensor) -> Tensor:
    if input.dim() not in (1, 2):
        raise ValueError(f"{type(cell).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    return input if input.dim() == 2 else input.unsqueeze(0)


class LSTMCell(nn.LSTMCell):
    """torch.nn.LSTMCell: (h', c') from input (B, I) or (I,) and hx = (h, c) or None."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        batched = input.dim() == 2
        input = _cell_input(self, input)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = ops.lstm_cell(input, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(nn.GRUCell):
    """torch.nn.GRUCell: h' from input (B, I) or (I,) and hx = h or None."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        batched = input.dim() == 2
        input = _cell_input(self, input)
        if hx is None:
            hx = input.new_zeros(input.shape[0], self.hidden_size)
        elif not batched:
            hx = hx.unsqueeze(0)
        h = ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h if batched else h.squeeze(0)
