"""Which implementation runs an op: auto | triton | cuda | cpu | reference.

The choice is global (``set_backend``, ``use_backend`` or ``GENFAST_BACKEND``)
and is resolved per call from the tensor's device. Asking for a backend that
cannot run the call is an error; only ``auto`` falls back, with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
BUILD_COMMAND = "`pip install --no-build-isolation -e .` from the genfast checkout"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call on this machine."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _check_name(os.environ.get("GENFAST_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Select the backend for every later genfast op call in this process."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the body with backend ``name``, then restore the previous choice."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def extension():
    """The compiled extension ``genfast._C``, or the ImportError that stopped it."""
    try:
        return importlib.import_module("genfast._C")
    except ImportError as error:
        return error


def kernels(backend: str, family: str):
    """The module whose functions run ``family``'s kernels on ``backend``: genfast.kernels.<family>
    (Triton) for triton, else the compiled extension (C++ for cpu, CUDA C++ for cuda)."""
    if backend == "triton":
        return importlib.import_module(f"genfast.kernels.{family}")
    return extension()


def extension_problem() -> str | None:
    """Why the compiled extension cannot run here, or None if it loaded."""
    ext = extension()
    if isinstance(ext, ModuleNotFoundError):
        return f"the C++ extension is not built ({ext}); build it with {BUILD_COMMAND}"
    if isinstance(ext, ImportError):
        # A build for another torch or Python, or a broken file: the loader's message names which.
        return f"the C++ extension failed to load ({ext}); rebuild it against this torch with {BUILD_COMMAND}"
    return None


@functools.cache
def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` here, or None if it can."""
    if name == "reference":
        return None
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, not {device_type} tensors"
        return extension_problem()
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device_type} tensors"
        if problem := extension_problem():
            return problem
        if not extension().has_cuda:
            return "the C++ extension was built without CUDA (torch had no CUDA at build time)"
        return None
    if name == "triton":
        if problem := _triton_problem():
            return problem
        if device_type == "cpu" and not triton_interpreted():
            return (
                "triton runs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                "before triton is imported (the interpreter, for tests)"
            )
        if device_type not in ("cpu", "cuda"):
            return f"triton runs CUDA tensors, not {device_type} tensors"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available(device_type: str) -> list[str]:
    """The explicit backends that can run ``device_type`` tensors here."""
    return [name for name in BACKENDS[1:] if unavailable_reason(name, device_type) is None]


# Fastest first, as measured (benchmarks/results/): on an H100 the CUDA C++
# GroupNorm beats the Triton one at every benchmarked shape.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


@functools.cache
def _auto(op: str, device_type: str, implemented: frozenset[str], unproven: frozenset[str],
          torch_kernel: frozenset[str]) -> str:
    if device_type in torch_kernel:
        return "torch"
    reasons = []
    for name in _AUTO_ORDER.get(device_type, ()):
        if name not in implemented:
            continue
        reason = unavailable_reason(name, device_type)
        if reason is None and name in unproven:
            reason = f"its kernel has not yet run on this hardware; genfast.use_backend({name!r}) runs it"
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    warnings.warn(
        f"genfast: no native kernel for {op} on {device_type} ({'; '.join(reasons) or 'none written'});"
        " running the PyTorch reference",
        stacklevel=4,
    )
    return "reference"


# torch.compile runs this at trace time and bakes the answer into the graph:
# the backend is a property of the compiled program, like its dtypes.
@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, implemented: frozenset[str],
            unproven: frozenset[str] = frozenset(), torch_kernel: frozenset[str] = frozenset()) -> str:
    """The backend that runs ``op`` on ``device``, or a clear error.

    ``implemented`` names the backends that have a kernel for ``op``; ``unproven``, those of
    them whose kernels have passed their tests only off their hardware (Triton's interpreter,
    nvcc): "auto" passes them by until a run on the hardware has checked them.
    ``torch_kernel`` names the device types where PyTorch's own kernel for this call (cuDNN,
    oneDNN) was measured faster than genfast's: there "auto" answers "torch", and the op calls
    that kernel (DESIGN.md, Backends). No explicit backend is named "torch".
    """
    name = get_backend()
    if name == "auto":
        return _auto(op, device.type, implemented, unproven, torch_kernel)
    if name != "reference" and name not in implemented:
        raise BackendUnavailableError(f"genfast: {op} has no {name} kernel (it has {sorted(implemented)})")
    if reason := unavailable_reason(name, device.type):
        raise BackendUnavailableError(f"genfast: backend {name!r} cannot run {op} here: {reason}")
    return name
