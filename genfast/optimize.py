"""genfast.optimize(model): swap the torch.nn layers genfast has kernels for, in place.

Each genfast module subclasses the torch.nn module it replaces and overrides
only ``forward``, so a swap is a change of class: the module object, its
parameters, buffers, hooks and state_dict keys stay as they were, and so do
the references other code holds to it. Only modules of exactly the torch
class are swapped; a subclass may have its own forward.
"""

from __future__ import annotations

from torch import nn

from . import nn as genfast_nn

# torch class -> (genfast class, attributes the genfast class adds, with their torch-equivalent value)
_SWAPS: dict[type[nn.Module], tuple[type[nn.Module], dict[str, object]]] = {
    nn.GroupNorm: (genfast_nn.GroupNorm, {"activation": None}),
    nn.LayerNorm: (genfast_nn.LayerNorm, {}),
    nn.RMSNorm: (genfast_nn.RMSNorm, {}),
    nn.GELU: (genfast_nn.GELU, {}),
    nn.SiLU: (genfast_nn.SiLU, {}),
    nn.MultiheadAttention: (genfast_nn.MultiheadAttention, {}),
}


def optimize(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Swap, in place, every submodule of model (model included) whose class is one genfast
    replaces; returns {qualified name: the torch class it had} of the swapped modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped = {}
    for name, module in model.named_modules(remove_duplicate=True):
        swap = _SWAPS.get(type(module))
        if swap is None:
            continue
        genfast_class, added = swap
        swapped[name] = type(module)
        module.__class__ = genfast_class
        for attribute, value in added.items():
            setattr(module, attribute, value)
    return swapped
