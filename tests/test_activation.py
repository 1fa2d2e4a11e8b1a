"""genfast.ops.silu / gelu / swiglu / geglu and their modules against the
float64 reference and PyTorch's own ops."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS, assert_close_to_reference, assert_compiles_like_eager, check_bad_input, interpreted, require,
)

import genfast
from genfast.reference.activation import activate, gated

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

# name: (genfast call, its reference activation, PyTorch's own call); gated ones take (gate, up).
OPS = {
    "silu": (lambda x: genfast.ops.silu(x), "silu", F.silu),
    "gelu": (lambda x: genfast.ops.gelu(x), "gelu", F.gelu),
    "gelu_tanh": (lambda x: genfast.ops.gelu(x, "tanh"), "gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    "swiglu": (genfast.ops.swiglu, "silu", lambda g, u: F.silu(g) * u),
    "geglu": (genfast.ops.geglu, "gelu", lambda g, u: F.gelu(g) * u),
    "geglu_tanh": (lambda g, u: genfast.ops.geglu(g, u, approximate="tanh"), "gelu_tanh",
                   lambda g, u: F.gelu(g, approximate="tanh") * u),
}
GATED = {"swiglu", "geglu", "geglu_tanh"}

SHAPES = [(1,), (7,), (3, 5), (2, 3, 1000), (4, 4097), (2, 11, 13, 3)]


def reference_op(name):
    activation = OPS[name][1]
    return (lambda g, u: gated(g, u, activation)) if name in GATED else (lambda x: activate(x, activation))


def make_inputs(name, shape, layout, dtype, device):
    """gate (or x) and up: contiguous, the halves of one (..., 2w) tensor, or transposed."""
    count = 2 if name in GATED else 1
    if layout == "halves":
        both = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype) * 3
        return list(both.chunk(2, dim=-1))[:count]
    if layout == "transposed":
        return [torch.randn(shape[::-1], device=device).to(dtype).permute(*range(len(shape) - 1, -1, -1)) * 3
                for _ in range(count)]
    return [torch.randn(shape, device=device).to(dtype) * 3 for _ in range(count)]


def check_against_reference(backend, name, shape, dtype, atol, layout="contiguous"):
    device = require(backend)
    inputs = make_inputs(name, shape, layout, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        y = fn(*leaves)
        return y, torch.autograd.grad(y, leaves, dy.to(cast))

    with genfast.use_backend(backend):
        out, grads = run(OPS[name][0], dtype)
    ref, ref_grads = run(reference_op(name), torch.float64)
    torch_out, torch_grads = run(OPS[name][2], dtype)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close_to_reference(out, ref, torch_out, atol, "y")
    for what, grad, ref_grad, torch_grad in zip(("dgate", "dup"), grads, ref_grads, torch_grads):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference_fp32(backend, name, shape):
    if backend == "triton" and shape == (4, 4097) and require(backend) == "cpu":
        pytest.skip("slow in the Triton interpreter; (2, 3, 1000) covers several blocks per row")
    check_against_reference(backend, name, shape, torch.float32, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_dtypes(backend, name, dtype, atol):
    check_against_reference(backend, name, (3, 129), dtype, atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["halves", "transposed"])
@pytest.mark.parametrize("name", ["gelu", "swiglu", "geglu_tanh"])
def test_strided_inputs(backend, name, layout):
    check_against_reference(backend, name, (2, 5, 24), torch.float32, 1e-5, layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_halves_are_read_in_place(backend):
    """The chunks of a fused projection's output go to the kernel as they are, no copy."""
    device = require(backend)
    gate, up = torch.randn(3, 4, 16, device=device).chunk(2, dim=-1)
    with genfast.use_backend(backend):
        y = genfast.ops.swiglu(gate, up)
    torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_up(backend):
    """An expanded (overlapping) up is copied before the kernel reads it."""
    device = require(backend)
    gate = torch.randn(4, 6, device=device)
    up = torch.randn(1, 6, device=device).expand(4, 6)
    with genfast.use_backend(backend):
        y = genfast.ops.swiglu(gate, up)
    torch.testing.assert_close(y, F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_special_values(backend, name):
    """NaN stays NaN, +-inf and huge values saturate as torch's do in float64. (torch's float32
    GELU with AVX-512 returns NaN at +inf, where its scalar and float64 paths return inf.)"""
    device = require(backend)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0, 88.0, -88.0], device=device)
    with genfast.use_backend(backend):
        out = OPS[name][0](x)
    torch.testing.assert_close(out, OPS[name][2](x.double()).float(), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", OPS)
def test_gradcheck(backend, name):
    device = require(backend)
    inputs = [torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
              for _ in range(2 if name in GATED else 1)]
    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(OPS[name][0], inputs, fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    gate = torch.randn(0, 5, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        y = genfast.ops.swiglu(gate, torch.randn(0, 5, device=device))
    assert y.shape == gate.shape
    y.sum().backward()
    assert gate.grad.shape == gate.shape


BAD_INPUTS = [  # (call, error type, words the message must contain)
    (lambda: genfast.ops.gelu(torch.ones(3, dtype=torch.int32)), TypeError, "input"),
    (lambda: genfast.ops.gelu(torch.randn(3), approximate="fast"), ValueError, "approximate"),
    (lambda: genfast.ops.swiglu(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "up"),
    (lambda: genfast.ops.swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)), TypeError, "up"),
    (lambda: genfast.ops.geglu([1.0], torch.randn(1)), TypeError, "gate"),
    (lambda: genfast.ops.swiglu(torch.randn(3, 4), torch.randn(3, 4, device="meta")), ValueError, "up"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, words", BAD_INPUTS)
def test_bad_input(backend, call, error, words):
    check_bad_input(backend, call, error, words)


def test_extension_checks_its_arguments():
    ext = require("cpu") and genfast.backends.extension()
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ext.activation_forward(x, None, "relu6")
    with pytest.raises(RuntimeError, match="up"):
        ext.activation_forward(x, torch.randn(4, 5), "silu")
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ext.activation_forward(x.mT, None, "gelu")
    with pytest.raises(RuntimeError, match="dy"):
        ext.activation_backward(torch.randn(4, 5), x, None, "gelu")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_module(approximate):
    x = torch.randn(3, 10)
    module = genfast.nn.GELU(approximate)
    torch.testing.assert_close(module(x), torch.nn.GELU(approximate)(x), rtol=1e-5, atol=1e-5)
    assert repr(module) == repr(torch.nn.GELU(approximate))
    torch.testing.assert_close(genfast.nn.SiLU()(x), F.silu(x), rtol=1e-5, atol=1e-5)


class _GatedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(genfast.ops.swiglu(gate, up))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_GatedMLP(), torch.randn(2, 5, 8), compiler)
