"""Argument checks shared by every op: each error names the argument, what it
expected and what it got, and is raised before any kernel runs."""

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    min_dim: int | None = None,
    shape: tuple[int, ...] | None = None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check ``value`` is a tensor of ``dtypes``; optionally its rank, shape and
    that it sits on the same device as ``like``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {_names([value.dtype])}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the input, got {value.device}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(x: torch.Tensor) -> bool:
    """Whether x is dense with channels innermost, (N, *spatial, C) in memory."""
    if x.dim() <= 2 or x.is_contiguous():
        return False
    if memory_format := _MEMORY_FORMATS.get(x.dim()):  # a stride check, where movedim makes a view (2 us)
        return x.is_contiguous(memory_format=memory_format)
    return x.movedim(1, -1).is_contiguous()


def fills_memory(x: torch.Tensor) -> bool:
    """Whether x is a permutation of a contiguous tensor: its elements fill its memory span, each once."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(x.shape, x.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if channels-first or channels-last dense, else a contiguous copy:
    the two layouts every channel-wise kernel reads."""
    return x if x.is_contiguous() or channels_last(x) else x.contiguous()


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (same shape as x, dense) laid out in memory like x."""
    if channels_last(x):
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()
