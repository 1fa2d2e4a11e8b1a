"""Token sampling from logits (genfast::sample_tokens): temperature, top-k and top-p in one
kernel per row, forward only. The specification: genfast/reference/sampling.py."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from ._checks import FLOAT_DTYPES, check_int, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})


def _kernel(backend: str, logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    if backend == "triton":
        from ..kernels import sampling

        return sampling.sample(logits, temperature, top_k, top_p, uniform)
    return extension().sample(logits, uniform, temperature, top_k, top_p)


@torch.library.custom_op("genfast::sample_tokens", mutates_args=())
def sample_tokens_op(
    logits: Tensor, uniform: Tensor, temperature: float, top_k: int, top_p: float, backend: str
) -> Tensor:
    return _kernel(backend, logits, uniform, temperature, top_k, top_p)


@sample_tokens_op.register_fake
def _(logits, uniform, temperature, top_k, top_p, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
) -> Tensor:
    """One token per row of ``logits`` (..., V), int64 of shape logits.shape[:-1]: a draw
    from softmax(logits / temperature) over the tokens that top-k and then top-p keep, as
    Hugging Face's warpers in that order followed by torch.multinomial.

    top_k 0 and top_p 1 keep every token; tokens tied with the last one kept stay too.
    Each row's draw uses one uniform number in [0, 1), from ``generator`` (on logits'
    device) or given as ``uniform`` (logits.shape[:-1]), which makes the draw reproducible
    across backends. float64 logits on a GPU are sampled by the reference. A row with a NaN or
    +inf logit, or with no logit above -inf, is a ValueError on the CPU, as torch.multinomial's.
    """
    check_tensor("logits", logits, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one token in its last dimension, got shape "
                         f"{tuple(logits.shape)}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    check_int("top_k", top_k, minimum=0)
    rows_shape = tuple(logits.shape[:-1])
    if uniform is None:
        uniform = torch.rand(rows_shape, generator=generator, device=logits.device)
    else:
        check_tensor("uniform", uniform, dtypes=FLOAT_DTYPES, shape=rows_shape, like=logits)

    # torch.multinomial's rule: a row with a NaN or +inf logit, or none above -inf (-inf marks a
    # masked token), has no distribution to draw from. One reduction finds all three. On a GPU it
    # would wait for the device, and torch.compile cannot branch on it: there such a row's token
    # is unspecified.
    if logits.is_cpu and logits.numel() and not torch.compiler.is_compiling() and not logits.amax(-1).isfinite().all():
        raise ValueError("logits must be free of NaN and +inf, with a finite logit in every row")
    backend = resolve("sample_tokens", logits.device, _IMPLEMENTED)
    if backend == "triton" and logits.dtype == torch.float64:
        backend = "reference"
    if backend == "reference" or logits.numel() == 0:
        return reference.sampling.sample(logits, float(temperature), top_k, float(top_p), uniform)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    args = (rows, uniform.reshape(-1).float().contiguous(), float(temperature), top_k, float(top_p))
    tokens = sample_tokens_op(*args, backend) if torch.compiler.is_compiling() else _kernel(backend, *args)
    return tokens.view(rows_shape)
