"""F.linear, and its weight's gradient, whose large results on a CPU come from genfast's output
memory (csrc/cpu/memory.h): from 2 MB, huge pages, and the blocks of freed outputs reused. A
fresh tensor from torch takes a page fault per 4 KB page as it is first written: GPT-2's logits
at 4 x 512 tokens (412 MB) took 100 000 of them, about 130 ms of a 2.3 s forward on a 2-core
Xeon; an MLP's weight gradients, 784 -> 1024 -> 1024, up to 1350 a training step there (1.7 ms
of 7.3), as many as glibc's history of frees decides. The products are torch's own (MKL),
written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import extension, extension_problem, get_backend


# csrc/cpu/memory.h's OutputCache::kMinBytes (the extension's output_memory_from_bytes, which a
# test compares): below it an output comes from glibc's heap, which keeps it mapped.
_FROM_BYTES = 2 << 20


def _into_output_memory(input: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the product goes into genfast's output memory: a large CPU output in inference
    (torch's out= products do not differentiate), operands that F.linear takes as they are."""
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1] or not input.is_cpu:
        return False
    output_bytes = input.numel() // max(1, input.shape[-1]) * weight.shape[0] * input.element_size()
    tensors = (input, weight) if bias is None else (input, weight, bias)
    return (
        output_bytes >= _FROM_BYTES and get_backend() in ("auto", "cpu") and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and all(t.dtype == input.dtype and t.is_cpu for t in tensors)
        and (bias is None or bias.shape == weight.shape[:1])
        and extension_problem() is None
    )


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """torch.nn.functional.linear: input (*, in) W^T (+ bias) -> (*, out)."""
    if not _into_output_memory(input, weight, bias):
        return F.linear(input, weight, bias)
    out = extension().empty_output([*input.shape[:-1], weight.shape[0]], input)
    rows, columns = input.reshape(-1, input.shape[-1]), out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=columns)
    else:
        torch.addmm(bias, rows, weight.t(), out=columns)
    return out


def weight_gradient(grad_output: Tensor, input: Tensor) -> Tensor:
    """F.linear's weight gradient, grad_output^T input summed over the leading dimensions:
    (out, in). Where autograd does not record it (no double backward), a CPU one from 2 MB lands
    in genfast's output memory: a training step's parameter gradient is freed by zero_grad and
    taken again by the next backward, each time a fresh tensor for torch."""
    rows = grad_output.reshape(-1, grad_output.shape[-1]).t()
    columns = input.reshape(-1, input.shape[-1])
    if torch.is_grad_enabled() or not input.is_cpu or rows.dtype != columns.dtype or extension_problem() is not None:
        return rows.mm(columns)
    return torch.mm(rows, columns, out=extension().empty_output([rows.shape[0], columns.shape[1]], input))
