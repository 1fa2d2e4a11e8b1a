"""The eager twin of a custom op with autograd.

Under torch.compile and torch.export an op must be a ``torch.library``
custom op, so the graph holds it as one node. Eager calls need not pay for the
op's dispatch (on the H100 machine's host it doubled GroupNorm's time per call:
93 against 44 us forward, 344 against 150 us backward, where the GPU kernels of
an SD-sized input take 35 and 80 us): they run the same kernel and backward
formula through the autograd.Function this module builds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _as_tuple(output) -> tuple:
    """An op's outputs as a tuple: one tensor, or the list the C++ kernels return."""
    return (output,) if isinstance(output, torch.Tensor) else tuple(output)


def eager_function(
    name: str, forward: Callable, setup_context: Callable, backward: Callable, non_differentiable: Sequence[int] = ()
) -> type[torch.autograd.Function]:
    """An autograd.Function named ``name`` (the profiler shows it and its ``name + "Backward"``)
    whose forward returns ``forward(*inputs)``'s outputs, as a tuple.

    ``setup_context`` and ``backward`` are those registered with the custom
    op's ``register_autograd``; ``backward`` receives None for the gradient of
    an output that was not used. The outputs at ``non_differentiable`` (e.g.
    saved statistics) get no gradient.
    """

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)
            outputs = _as_tuple(output)
            ctx.mark_non_differentiable(*(outputs[i] for i in non_differentiable))
            return outputs

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

        @classmethod
        def call(cls, *inputs):
            """apply(), or where no input needs a gradient the kernel alone: recording a graph
            costs more than a small kernel (25 of a LayerNorm call's 50 us on a 2-core CPU)."""
            if torch.is_grad_enabled():
                for t in inputs:  # a loop, not any() over a generator: 1 us less per call
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        return cls.apply(*inputs)
            return _as_tuple(forward(*inputs))

    EagerFunction.__name__ = EagerFunction.__qualname__ = name
    # The backward node's class, which torch's metaclass made and named from the class statement's name.
    EagerFunction._backward_cls.__name__ = EagerFunction._backward_cls.__qualname__ = name + "Backward"
    return EagerFunction
