"""Rotary position embedding of q and k (genfast::rotary_embedding), drop-in
for Hugging Face's ``apply_rotary_pos_emb``: one pass over each of q and k,
out of place for training or in place for inference. The formula:
genfast/reference/rotary.py.

Its backward is the transposed rotation, the same kernel with one flag
flipped, so the op differentiates through itself (to any order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import extension, resolve
from ._autograd import eager_function
from ._checks import check_choice, check_tensor

_IMPLEMENTED = frozenset({"cpu", "triton"})


def _kernel(backend: str):
    if backend == "triton":
        from ..kernels import rotary

        return rotary.rotary_embedding
    return extension().rotary_embedding


def _by_position(t: Tensor, unsqueeze_dim: int) -> Tensor:
    """The (B, S, H, D) view the kernels walk, of a (B, H, S, D) or (B, S, H, D) tensor."""
    return t.transpose(1, 2) if unsqueeze_dim == 1 else t


def _rotate(
    x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None, unsqueeze_dim: int, transpose: bool, backend: str
) -> Tensor:
    """x rotated into out (x itself for in place, None for a new tensor laid out as x)."""
    by_position = _by_position(x, unsqueeze_dim)
    out = _kernel(backend)(by_position, cos, sin, None if out is None else _by_position(out, unsqueeze_dim), transpose)
    return _by_position(out, unsqueeze_dim)


def _forward(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, transpose: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """q and k rotated, or with transpose rotated back; cos, sin: contiguous (1 or B, S, R)."""
    return (_rotate(q, cos, sin, None, unsqueeze_dim, transpose, backend),
            _rotate(k, cos, sin, None, unsqueeze_dim, transpose, backend))


rotary_op = torch.library.custom_op("genfast::rotary_embedding", _forward, mutates_args=())


@rotary_op.register_fake
def _(q, k, cos, sin, unsqueeze_dim, transpose, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _forward_in_place(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, backend: str) -> None:
    _rotate(q, cos, sin, q, unsqueeze_dim, False, backend)
    _rotate(k, cos, sin, k, unsqueeze_dim, False, backend)


rotary_inplace_op = torch.library.custom_op("genfast::rotary_embedding_", _forward_in_place, mutates_args=("q", "k"))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, unsqueeze_dim, transpose, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim, ctx.transpose, ctx.backend = unsqueeze_dim, transpose, backend
    ctx.shapes, ctx.dtype = (q.shape, k.shape), q.dtype


def _differentiate(ctx, dq, dk):
    if dq is None and dk is None:
        return (None,) * 7
    cos, sin = ctx.saved_tensors

    def readable(grad: Tensor | None, shape: torch.Size) -> Tensor:
        """A gradient the kernels can read: zeros for an unused output; a copy of an expanded one
        (the gradient of a sum), whose last dimension is not contiguous."""
        if grad is None:
            return cos.new_zeros(shape, dtype=ctx.dtype)
        return grad if grad.stride(-1) == 1 else grad.contiguous()

    dq, dk = _rotary(readable(dq, ctx.shapes[0]), readable(dk, ctx.shapes[1]), cos, sin, ctx.unsqueeze_dim,
                     not ctx.transpose, ctx.backend)
    return dq, dk, None, None, None, None, None


rotary_op.register_autograd(_differentiate, setup_context=_setup_context)
_RotaryFunction = eager_function("genfast.Rotary", _forward, _setup_context, _differentiate)


def _rotary(q, k, cos, sin, unsqueeze_dim, transpose, backend):
    args = (q, k, cos, sin, unsqueeze_dim, transpose, backend)
    return rotary_op(*args) if torch.compiler.is_compiling() else _RotaryFunction.call(*args)


def _table(name: str, t: Tensor, batch: int, positions: int, math_dtype: torch.dtype) -> Tensor:
    """cos or sin as the contiguous (1 or B, S, R) table the kernels read."""
    check_tensor(name, t)
    table = t.unsqueeze(0) if t.dim() == 2 else t
    if table.dim() != 3 or table.shape[0] not in (1, batch) or table.shape[1] != positions:
        raise ValueError(
            f"{name} must have shape (S, R) or (B, S, R) with B = {batch} and S = {positions} as q's, "
            f"got {tuple(t.shape)}"
        )
    return table.to(math_dtype).contiguous()


def apply_rotary_pos_emb(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Tensor | None = None,
    unsqueeze_dim: int = 1,
    *,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``: (q * cos + rotate_half(q) * sin, the same for k).

    q: (B, H, S, D) with unsqueeze_dim=1 (or (B, S, H, D) with 2); k the same
    but for its own head count (GQA). cos, sin: (B, S, R) as a model's rotary
    module returns them, or (S, R); R even and at most D: a partial rotary
    leaves dimensions R..D as they are. position_ids is unused, as in
    transformers. With inplace=True, q and k are rotated in place and
    returned (inference, e.g. before a KV-cache write); their gradients are
    then not tracked, so they may not require one. cos and sin get no
    gradient.
    """
    check_tensor("q", q)
    check_tensor("k", k, like=q)
    check_choice("unsqueeze_dim", unsqueeze_dim, (1, 2))
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, (B, H, S, D) or (B, S, H, D), got {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    positions = q.shape[3 - unsqueeze_dim]
    if k.shape[0] != q.shape[0] or k.shape[3 - unsqueeze_dim] != positions or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must match q's batch, positions and head size: q {tuple(q.shape)}, k {tuple(k.shape)}")
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos = _table("cos", cos, q.shape[0], positions, math_dtype)
    sin = _table("sin", sin, q.shape[0], positions, math_dtype)
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    rotary = cos.shape[2]
    if rotary % 2 or rotary > q.shape[3]:
        raise ValueError(f"cos and sin must rotate an even number of dimensions, at most {q.shape[3]}, got {rotary}")
    if inplace and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError("inplace=True rotates q and k without tracking gradients; they may not require grad")

    backend = resolve("rotary_embedding", q.device, _IMPLEMENTED)
    if backend == "reference" or q.numel() == 0 or k.numel() == 0:
        q_out, k_out = reference.rotary.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
        if inplace:
            return q.copy_(q_out), k.copy_(k_out)
        return q_out, k_out
    if inplace:
        for name, t in (("q", q), ("k", k)):
            if t.stride(-1) != 1:
                raise ValueError(f"inplace=True needs {name}'s last dimension contiguous, got strides {t.stride()}")
        (rotary_inplace_op if torch.compiler.is_compiling() else _forward_in_place)(
            q, k, cos, sin, unsqueeze_dim, backend
        )
        return q, k
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return _rotary(q, k, cos, sin, unsqueeze_dim, False, backend)
