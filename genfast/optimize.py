"""genfast.optimize(model): swap the torch.nn layers genfast has kernels for, in place, and
where transformers is installed the attention, norm and MLP layers of its GPT-2 and Llama
models (genfast/huggingface.py).

Each genfast module subclasses the torch.nn module it replaces (LSTM and GRU: its
base, nn.RNNBase) and overrides only ``forward``, so a swap is a change of class: the module object, its
parameters, buffers, hooks and state_dict keys stay as they were, and so do
the references other code holds to it. Only modules of exactly the torch
class are swapped; a subclass may have its own forward.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from . import nn as genfast_nn

# torch class -> (genfast class, attributes the genfast class adds, with their torch-equivalent value)
_SWAPS: dict[type[nn.Module], tuple[type[nn.Module], dict[str, object]]] = {
    nn.Conv2d: (genfast_nn.Conv2d, {}),
    nn.GroupNorm: (genfast_nn.GroupNorm, {"activation": None}),
    nn.LayerNorm: (genfast_nn.LayerNorm, {}),
    nn.RMSNorm: (genfast_nn.RMSNorm, {}),
    nn.GELU: (genfast_nn.GELU, {}),
    nn.SiLU: (genfast_nn.SiLU, {}),
    nn.MultiheadAttention: (genfast_nn.MultiheadAttention, {}),
    # genfast's LSTM and GRU are siblings of torch's on nn.RNNBase (torch.compile will not
    # trace an nn.LSTM): the same attributes, so the class changes as for a subclass.
    nn.LSTM: (genfast_nn.LSTM, {"zoneout_cell": 0.0, "zoneout_hidden": 0.0, "layer_norm": False}),
    nn.GRU: (genfast_nn.GRU, {"zoneout_hidden": 0.0}),
    nn.LSTMCell: (genfast_nn.LSTMCell, {}),
    nn.GRUCell: (genfast_nn.GRUCell, {}),
}


def _swap(module: nn.Module, huggingface) -> tuple[type[nn.Module], dict[str, object]] | None:
    if swap := _SWAPS.get(type(module)):
        return swap
    genfast_class = None if huggingface is None else huggingface.swap_class(module)
    return None if genfast_class is None else (genfast_class, {})


def optimize(model: nn.Module) -> dict[str, type[nn.Module]]:
    """Swap, in place, every submodule of model (model included) whose class is one genfast
    replaces, and switch transformers models to genfast's attention; returns {qualified name:
    the class it had} of the swapped modules and of the attention layers switched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    huggingface = None
    if importlib.util.find_spec("transformers") is not None:
        from . import huggingface
    swapped = {}
    for name, module in model.named_modules(remove_duplicate=True):
        swap = _swap(module, huggingface)
        if swap is None:
            continue
        genfast_class, added = swap
        swapped[name] = type(module)
        module.__class__ = genfast_class
        for attribute, value in added.items():
            setattr(module, attribute, value)
    if huggingface is not None:
        swapped.update(huggingface.use_genfast_attention(model))
    return swapped
