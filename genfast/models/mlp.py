"""A multilayer perceptron, built from torch.nn layers or genfast's from the same weights: the
genfast build runs each hidden layer's bias and activation in the matrix product's epilogue
pass (genfast.nn.Linear), and its backward in one pass with the bias's gradient."""

from __future__ import annotations

from torch import Tensor, nn

from .. import nn as genfast_nn
from ..reference.bias_act import ACTIVATIONS


class MLP(nn.Module):
    """in_features -> hidden... -> out_features, activation after each hidden layer (a name of
    genfast.ops.bias_act's, with torch's slope 0.01 for leaky_relu), none after the last."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (1024, 1024), out_features: int = 10,
                 activation: str = "relu", fused: bool = False):
        super().__init__()
        self.activation, self.fused = activation, fused
        widths = (in_features, *hidden, out_features)
        layers = []
        for index, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            hidden_layer = index < len(hidden)
            if fused:
                layers.append(genfast_nn.Linear(a, b, activation=activation if hidden_layer else None))
            else:
                layers.append(nn.Linear(a, b))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = layer(x) if self.fused else ACTIVATIONS[self.activation].function(layer(x), 0.01)
        return self.layers[-1](x)
