"""Backend choice: explicit names, the context manager, the environment, and
what happens when a backend cannot run."""

import os
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


def test_missing_extension_keeps_reference_and_explains_cpu():
    """With genfast._C unimportable: import works, auto warns once and runs the
    reference, and the cpu backend's error says how to build the extension."""
    code = """
import sys, warnings
sys.modules["genfast._C"] = None  # makes `import genfast._C` raise ImportError
import torch, genfast
x = torch.randn(2, 4, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    genfast.ops.group_norm(x, 2)
    genfast.ops.group_norm(x, 2)
print(sum("running the PyTorch reference" in str(w.message) for w in caught))
try:
    with genfast.use_backend("cpu"):
        genfast.ops.group_norm(x, 2)
except genfast.backends.BackendUnavailableError as error:
    print(error)
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    warnings_count, message = result.stdout.strip().splitlines()
    assert warnings_count == "1"
    assert "not built" in message and "pip install" in message


def test_info_lists_backends_and_reasons(capsys):
    from genfast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends for cpu tensors" in out
    assert "reference  available" in out
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in out
