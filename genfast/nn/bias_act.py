"""A linear layer with its activation fused into the bias add (genfast.ops.bias_act)."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.bias_act import linear_bias_act
from ..ops.linear import linear
from ..ops._checks import check_choice
from ..reference.bias_act import ACTIVATIONS


class Linear(nn.Linear):
    """torch.nn.Linear followed by an activation, ``act(x @ weight.T + bias) * gain``: the matrix
    product, then bias, activation and gain in one pass (and their backward in one, the bias's
    gradient included). Parameters and state_dict are torch.nn.Linear's. A large output for
    inference on a CPU lands in genfast's output memory (genfast.ops.linear).

    activation: None (the plain layer, torch's own) or one of genfast.ops.bias_act's names. Its
    defaults are torch's, not StyleGAN2's: gain 1, and leaky_relu's slope ``alpha`` 0.01 as
    torch.nn.LeakyReLU's. ``Linear(i, o, activation="relu")`` computes ``F.relu(nn.Linear(i, o)(x))``.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
        activation: str | None = None, alpha: float = 0.01, gain: float = 1.0,
    ) -> None:
        if activation is not None:
            check_choice("activation", activation, tuple(ACTIVATIONS))
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation, self.alpha, self.gain = activation, float(alpha), float(gain)

    def forward(self, input: Tensor) -> Tensor:
        if self.activation is None and self.gain == 1:
            return linear(input, self.weight, self.bias)
        return linear_bias_act(input, self.weight, self.bias, self.activation or "linear", self.alpha, self.gain)

    def extra_repr(self) -> str:
        extra = "" if self.activation is None else f", activation={self.activation!r}"
        if self.activation == "leaky_relu":
            extra += f", alpha={self.alpha}"
        return super().extra_repr() + extra + ("" if self.gain == 1 else f", gain={self.gain}")
