"""genfast.optimize swaps torch.nn layers for genfast's in place, keeping the
model's outputs, gradients and state."""

import copy

import pytest
import torch
from helpers import require
from torch import nn

import genfast


class _CustomNorm(nn.LayerNorm):
    """A subclass with its own forward: optimize must leave it alone."""

    def forward(self, input):
        return super().forward(input) * 2


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.group_norm = nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.proj = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU("tanh"), nn.Linear(32, 16))
        self.rms = nn.RMSNorm(16, eps=1e-6)
        self.custom = _CustomNorm(16)
        self.shared = self.mlp[0]  # the same module under two names

    def forward(self, x):
        h = self.act(self.group_norm(self.conv(x))).mean(dim=(2, 3))
        h = self.proj(h)
        h = h + self.mlp(h)
        return self.custom(self.rms(self.shared(h)))


def test_swaps_in_place_and_keeps_outputs_and_gradients():
    require("cpu")
    torch.manual_seed(0)
    model = _Model()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            nn.init.normal_(module.weight)
    reference = copy.deepcopy(model)
    layer_norm = model.mlp[0]
    keys = list(model.state_dict())

    swapped = genfast.optimize(model)

    assert swapped == {
        "conv": nn.Conv2d, "group_norm": nn.GroupNorm, "act": nn.SiLU, "mlp.0": nn.LayerNorm, "mlp.2": nn.GELU,
        "rms": nn.RMSNorm,
    }
    assert type(model.mlp[0]) is genfast.nn.LayerNorm and model.mlp[0] is layer_norm and model.shared is layer_norm
    assert type(model.custom) is _CustomNorm
    assert list(model.state_dict()) == keys
    assert genfast.optimize(model) == {}, "a second call finds nothing left to swap"

    x = torch.randn(2, 3, 6, 6)
    with genfast.use_backend("cpu"):
        out = model(x)
        out.square().sum().backward()
    expected = reference(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-4, msg=name)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(10, 4)
        self.cell = nn.GRUCell(4, 6)

    def forward(self, x):
        h = self.gru(self.lstm(x)[0].transpose(0, 1))[0]
        return self.cell(h[-1])


def test_swaps_recurrent_layers():
    require("cpu")
    torch.manual_seed(0)
    model = _Recurrent()
    reference = copy.deepcopy(model)
    assert genfast.optimize(model) == {"lstm": nn.LSTM, "gru": nn.GRU, "cell": nn.GRUCell}
    assert type(model.lstm) is genfast.nn.LSTM and type(model.gru) is genfast.nn.GRU
    x = torch.randn(2, 7, 3)
    with genfast.use_backend("cpu"):
        out = model(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)


def test_swapped_group_norm_has_no_activation():
    norm = nn.GroupNorm(2, 4)
    genfast.optimize(norm)
    assert type(norm) is genfast.nn.GroupNorm and norm.activation is None
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(norm(x), torch.nn.functional.group_norm(x, 2, norm.weight, norm.bias),
                               rtol=1e-5, atol=1e-5)


def test_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genfast.optimize(lambda x: x)
