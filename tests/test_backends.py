"""Backend choice: explicit names, the context manager, the environment, and
what happens when a backend cannot run."""

import importlib.machinery
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import backends


def test_use_backend_restores_previous_choice():
    genfast.set_backend("reference")
    try:
        with genfast.use_backend("cpu"):
            assert genfast.get_backend() == "cpu"
        assert genfast.get_backend() == "reference"
    finally:
        genfast.set_backend("auto")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        genfast.set_backend("fastest")


def test_explicit_backend_that_cannot_run_raises():
    x = torch.randn(2, 4, 3)
    with genfast.use_backend("cuda"), pytest.raises(backends.BackendUnavailableError, match="cuda"):
        genfast.ops.group_norm(x, 2)


def test_auto_passes_unproven_kernels_by():
    """A kernel not yet run on its hardware runs when chosen, but auto says why it took the
    reference instead."""
    if backends.unavailable_reason("cpu", "cpu"):
        pytest.skip("the C++ extension is not built")
    implemented = frozenset({"cpu"})
    with pytest.warns(UserWarning, match="not yet run on this hardware"):
        assert backends.resolve("test_op", torch.device("cpu"), implemented, frozenset({"cpu"})) == "reference"
    assert backends.resolve("test_op", torch.device("cpu"), implemented) == "cpu"
    with genfast.use_backend("cpu"):
        assert backends.resolve("test_op", torch.device("cpu"), implemented, frozenset({"cpu"})) == "cpu"


def test_auto_takes_pytorch_kernels_where_an_op_says_they_are_faster():
    """An op names the device types where PyTorch's own kernel beat genfast's: auto answers
    "torch" there and nowhere else; an explicit backend is unaffected."""
    implemented, faster_on_cuda = frozenset({"reference"}), frozenset({"cuda"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve("test_op", cuda, implemented, torch_kernel=faster_on_cuda) == "torch"
    assert backends.resolve("test_op", cuda, implemented, torch_kernel=frozenset({"cpu", "cuda"})) == "torch"
    with genfast.use_backend("reference"):
        assert backends.resolve("test_op", cuda, implemented, torch_kernel=faster_on_cuda) == "reference"
    with pytest.warns(UserWarning, match="running the PyTorch reference"):
        assert backends.resolve("test_op", cpu, implemented, torch_kernel=faster_on_cuda) == "reference"


def test_reference_backend_runs_plain_pytorch():
    x = torch.randn(2, 4, 3, requires_grad=True)
    with genfast.use_backend("reference"):
        y = genfast.ops.group_norm(x, 2, activation="silu")
    assert "genfast" not in type(y.grad_fn).__name__.lower()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_environment_variable_selects_backend():
    result = _run_python("import genfast; print(genfast.get_backend())", GENFAST_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


# What a process without a working extension runs: import, two auto calls (one warning), the
# reference's result, then the cpu backend's error.
_WITHOUT_EXTENSION = """
import warnings
import torch, genfast, genfast.reference.norm
x = torch.randn(2, 4, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = genfast.ops.group_norm(x, 2)
    genfast.ops.group_norm(x, 2)
print(sum("running the PyTorch reference" in str(w.message) for w in caught))
print(torch.equal(y, genfast.reference.norm.group_norm(x, 2)))
try:
    with genfast.use_backend("cpu"):
        genfast.ops.group_norm(x, 2)
except genfast.backends.BackendUnavailableError as error:
    print(error)
"""


def _check_runs_without_extension(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 0, result.stderr
    warnings_count, reference_ran, message = result.stdout.strip().splitlines()
    assert (warnings_count, reference_ran) == ("1", "True")
    assert words in message and "pip install --no-build-isolation" in message, message


def test_missing_extension_keeps_reference_and_explains_cpu():
    # None in sys.modules makes `import genfast._C` raise ModuleNotFoundError, as when never built.
    result = _run_python('import sys; sys.modules["genfast._C"] = None\n' + _WITHOUT_EXTENSION)
    _check_runs_without_extension(result, "not built")


def test_broken_extension_keeps_reference_and_explains_cpu(tmp_path):
    """A failed or mismatched build leaves a file the loader rejects: genfast's Python files next
    to a _C that is not a shared library."""
    package = pathlib.Path(genfast.__file__).parent
    shutil.copytree(package, tmp_path / "genfast", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / "genfast" / f"_C{suffix}").write_bytes(b"the remains of a failed build")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + _WITHOUT_EXTENSION
    result = _run_python(code)
    _check_runs_without_extension(result, "failed to load")


def test_missing_triton_keeps_other_backends_and_explains():
    """Without triton (a GPU machine without it included): import works, the CPU kernels and the
    reference run, and asking for triton, on CPU or CUDA tensors, says it is not installed."""
    code = """
import sys
sys.modules["triton"] = None
import torch, genfast, genfast.reference.norm
x = torch.randn(2, 4, 3)
print(torch.allclose(genfast.ops.group_norm(x, 2), genfast.reference.norm.group_norm(x, 2), atol=1e-6))
try:
    with genfast.use_backend("triton"):
        genfast.ops.group_norm(x, 2)
except genfast.backends.BackendUnavailableError as error:
    print(error)
torch.cuda.is_available = lambda: True  # the reason given on a GPU machine
print(genfast.backends.unavailable_reason("triton", "cuda"))
"""
    result = _run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    matches, cpu_message, cuda_message = result.stdout.strip().splitlines()
    assert matches == "True"
    assert "triton is not installed" in cpu_message and "triton is not installed" in cuda_message


def test_info_lists_backends_and_reasons(capsys):
    from genfast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends for cpu tensors" in out
    assert "reference  available" in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in out
