"""genfast.ops.bias_act against the float64 reference: every activation, bias dimension and
layout, its gradients, and the second-order gradients a GAN's R1 penalty takes."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS, assert_close_to_reference, assert_compiles_like_eager, check_bad_input, interpreted, require,
)

import genfast
from genfast.backends import extension
from genfast.ops import linear as output_memory
from genfast.reference.bias_act import ACTIVATIONS
from genfast.reference.bias_act import bias_act as reference_bias_act

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

# (shape, dim): a linear layer's output, a convolution's, the bias along the last and a middle
# dimension, sizes 1 and primes, and a (4, 4099) input of several tiles per row.
CASES = [((7, 13), 1), ((2, 3, 5, 7), 1), ((3, 5, 11), -1), ((2, 5, 3), 1), ((1, 1), 1), ((17,), 0), ((4, 4099), 0)]


def run(backend, x, bias, dy, dtype, dim, options):
    """bias_act's output and gradients for x and bias, the inputs cast to dtype; backend None
    is the reference."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, bias) if t is not None]
    if backend is None:
        y = reference_bias_act(*leaves[:1], leaves[1] if bias is not None else None, dim, **options)
    else:
        with genfast.use_backend(backend):
            y = genfast.ops.bias_act(*leaves[:1], leaves[1] if bias is not None else None, dim, **options)
    return y, torch.autograd.grad(y, leaves, dy.to(dtype))


def check_against_reference(backend, shape, dim, dtype, atol, *, layout="contiguous", with_bias=True, **options):
    device = require(backend)
    x = torch.randn(shape, device=device) * 2
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.mT.contiguous().mT
    elif layout == "sliced":
        x = torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
    bias = torch.randn(shape[dim], device=device) if with_bias else None
    dy = torch.randn(shape, device=device)
    out, grads = run(backend, x, bias, dy, dtype, dim, options)
    ref, ref_grads = run(None, x, bias, dy, torch.float64, dim, options)
    torch_out, torch_grads = run(None, x, bias, dy, dtype, dim, options)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, ref, torch_out, atol, "y")
    for what, grad, ref_grad, torch_grad in zip(("dx", "dbias"), grads, ref_grads, torch_grads):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, what)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dim", CASES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference_fp32(backend, activation, shape, dim):
    if interpreted(backend) and shape == (4, 4099):
        pytest.skip("slow in the Triton interpreter; (2, 3, 5, 7) covers several channels per block")
    check_against_reference(backend, shape, dim, torch.float32, 1e-5, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["leaky_relu", "gelu", "tanh"])
def test_dtypes(backend, activation, dtype, atol):
    check_against_reference(backend, (3, 10, 7), 1, dtype, atol, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_layouts(backend, layout):
    """A tensor that fills its memory in another order is read in place and the output keeps
    its layout; a sliced one is copied first."""
    y = check_against_reference(backend, (2, 6, 5, 3), 1, torch.float32, 1e-5, layout=layout, activation="silu")
    if layout == "channels_last" and backend != "reference":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [{"activation": "leaky_relu", "alpha": 0.01, "gain": 1.0}, {"activation": "relu", "clamp": 0.7},
     {"activation": "sigmoid", "gain": 3.0, "clamp": 2.5}, {"activation": "linear", "clamp": 0.0},
     {"activation": "leaky_relu", "clamp": 256.0}],
    ids=str,
)
def test_alpha_gain_clamp(backend, options):
    check_against_reference(backend, (5, 8, 3), 1, torch.float32, 1e-5, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["linear", "silu"])
def test_without_bias(backend, activation):
    check_against_reference(backend, (3, 5, 7), 1, torch.float32, 1e-5, with_bias=False, activation=activation)


def test_default_gain_and_alpha():
    """StyleGAN2's defaults: relu and leaky_relu (slope 0.2) scaled by sqrt(2), the others by 1."""
    x = torch.tensor([[-1.0, 2.0]])
    torch.testing.assert_close(genfast.ops.bias_act(x, activation="leaky_relu"),
                               torch.tensor([[-0.2, 2.0]]) * math.sqrt(2))
    torch.testing.assert_close(genfast.ops.bias_act(x, activation="relu"), torch.tensor([[0.0, 2.0]]) * math.sqrt(2))
    torch.testing.assert_close(genfast.ops.bias_act(x, activation="tanh"), torch.tanh(x))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck(backend, activation):
    """Second-order gradients, with a clamp that holds part of the output."""
    device = require(backend)
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)

    def layer(x, bias):
        return genfast.ops.bias_act(x, bias, activation=activation, clamp=1.0)

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(layer, (x, bias), fast_mode=interpreted(backend))
        assert torch.autograd.gradgradcheck(layer, (x, bias), fast_mode=interpreted(backend))


def r1_penalty(backend, x, weight, bias, activation):
    """StyleGAN's R1 penalty of a one-layer discriminator, |d D(x) / dx|^2, and its gradients."""
    x = x.detach().requires_grad_()
    params = [weight.detach().requires_grad_(), bias.detach().requires_grad_()]

    def discriminate(x):
        z = x @ params[0].T
        if backend is None:
            return reference_bias_act(z, params[1], activation=activation)
        with genfast.use_backend(backend):
            return genfast.ops.bias_act(z, params[1], activation=activation)

    (dx,) = torch.autograd.grad(discriminate(x).sum(), x, create_graph=True)
    penalty = dx.square().sum()
    return penalty, torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "gelu"])
def test_r1_penalty(backend, activation):
    device = require(backend)
    x, weight, bias = torch.randn(8, 6, device=device), torch.randn(5, 6, device=device), torch.randn(5, device=device)
    penalty, grads = r1_penalty(backend, x, weight, bias, activation)
    ref, ref_grads = r1_penalty(None, x.double(), weight.double(), bias.double(), activation)
    torch_penalty, torch_grads = r1_penalty(None, x, weight, bias, activation)
    assert_close_to_reference(penalty, ref, torch_penalty, 1e-5, "penalty")
    for what, grad, ref_grad, torch_grad in zip(("dweight", "dbias"), grads, ref_grads, torch_grads):
        assert_close_to_reference(grad, ref_grad, torch_grad, 1e-5, what)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_third_order_is_an_error(backend):
    device = require(backend)
    x = torch.randn(4, 3, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        y = genfast.ops.bias_act(x, torch.randn(3, device=device), activation="silu")
        (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="third order"):
            torch.autograd.grad(ddx.sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values(backend):
    """NaN stays NaN and infinities saturate as in the float64 reference; the clamp holds them."""
    device = require(backend)
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0, 88.0, -88.0]], device=device)
    for activation in ACTIVATIONS:
        for clamp in (None, 3.0):
            with genfast.use_backend(backend):
                out = genfast.ops.bias_act(x, activation=activation, clamp=clamp)
            ref = reference_bias_act(x.double(), activation=activation, clamp=clamp).float()
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True, msg=f"{activation} {clamp}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    x = torch.randn(0, 5, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        y = genfast.ops.bias_act(x, torch.randn(5, device=device), activation="relu")
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


BAD_INPUTS = [  # (call, error type, words the message must contain)
    (lambda: genfast.ops.bias_act(torch.ones(3, 4, dtype=torch.int32)), TypeError, "x"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), torch.randn(3)), ValueError, "bias"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), torch.randn(4, dtype=torch.float64)), TypeError, "bias"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), torch.randn(4), dim=2), ValueError, "dim"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), activation="elu"), ValueError, "activation"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), activation="silu", alpha=0.1), ValueError, "alpha"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), clamp=-1.0), ValueError, "clamp"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), gain=float("nan")), TypeError, "gain"),
    (lambda: genfast.ops.bias_act(torch.randn(3, 4), torch.randn(4, device="meta")), ValueError, "bias"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, words", BAD_INPUTS)
def test_bad_input(backend, call, error, words):
    check_bad_input(backend, call, error, words)


def test_extension_checks_its_arguments():
    ext = require("cpu") and genfast.backends.extension()
    x, bias = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        ext.bias_act_forward(x, bias, "relu6", 0.0, 1.0, None, 1)
    with pytest.raises(RuntimeError, match="must divide"):
        ext.bias_act_forward(x, torch.randn(5), "relu", 0.0, 1.0, None, 1)
    with pytest.raises(RuntimeError, match="dense"):
        ext.bias_act_forward(torch.randn(4, 12)[:, ::2], bias, "relu", 0.0, 1.0, None, 1)
    with pytest.raises(RuntimeError, match="dy"):
        ext.bias_act_backward(x.mT.contiguous().mT, x, bias, "relu", 0.0, 1.0, None, 1, 1)
    with pytest.raises(RuntimeError, match="order"):
        ext.bias_act_backward(x, x, bias, "relu", 0.0, 1.0, None, 1, 3)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return genfast.ops.bias_act(self.conv(x), self.bias, activation="leaky_relu", clamp=2.0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_Layer(), torch.randn(2, 3, 9, 9), compiler)


# activation: torch's module applied after torch.nn.Linear.
TORCH_ACTIVATIONS = {
    None: torch.nn.Identity(), "relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(), "gelu": torch.nn.GELU(),
    "silu": torch.nn.SiLU(), "tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", TORCH_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_torch_linear_then_activation(backend, activation, bias):
    device = require(backend)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(13, 7, bias=bias), TORCH_ACTIVATIONS[activation]).to(device)
    layer = genfast.nn.Linear(13, 7, bias=bias, activation=activation, device=device)
    layer.load_state_dict(reference[0].state_dict())
    assert layer.state_dict().keys() == reference[0].state_dict().keys()
    x = torch.randn(2, 5, 13, device=device)
    expected, expected_grads = run_module(reference, x)
    with genfast.use_backend(backend):
        out, grads = run_module(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def run_module(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    leaves = [x, *module.parameters()]
    return out, torch.autograd.grad(out, leaves, torch.ones_like(out))


def test_large_linear_outputs_reuse_memory_in_inference():
    """A CPU output from 2 MB comes from genfast's output memory when nothing needs a gradient: a
    freed output's block serves the next call, where a fresh tensor takes a page fault per 4 KB
    page. The values are torch's, bit for bit; with a gradient to compute, the layer is torch's."""
    require("cpu")
    assert output_memory._FROM_BYTES == extension().output_memory_from_bytes
    torch.manual_seed(0)
    layer = genfast.nn.Linear(48, 4096)
    x = torch.randn(3, 61, 48)  # a (3, 61, 4096) float32 output: 3 MB
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        first = layer(x)
        block = first.data_ptr()
        torch.testing.assert_close(first, expected, rtol=0, atol=0)
        del first
        again = layer(x)
    assert again.data_ptr() == block
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    trained = layer(x.requires_grad_())
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    assert trained.grad_fn is not None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "relu"])
def test_linear_second_order(backend, activation):
    """Gradients of gradients through the layer (a GAN's R1 penalty on a discriminator's head),
    which reach the input and the weight through the product's output too."""
    device = require(backend)
    layer = genfast.nn.Linear(5, 4, activation=activation, dtype=torch.float64, device=device)
    leaves = (torch.randn(3, 5, dtype=torch.float64, device=device), layer.weight.detach(), layer.bias.detach())

    def forward(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    leaves = tuple(t.clone().requires_grad_() for t in leaves)
    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(forward, leaves, fast_mode=interpreted(backend))
        assert torch.autograd.gradgradcheck(forward, leaves, fast_mode=interpreted(backend))


def test_linear_weight_gradients_reuse_memory():
    """A CPU weight gradient from 2 MB comes from genfast's output memory: the block that
    zero_grad frees serves the next backward, where a fresh tensor from torch takes a page fault
    per 4 KB page (about 1300 a step in an MLP of 1024-wide layers). The values are torch's."""
    require("cpu")
    torch.manual_seed(0)
    reference = torch.nn.Linear(1024, 640)  # a 2.5 MB weight
    layer = genfast.nn.Linear(1024, 640, activation="relu")
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 9, 1024)
    F.relu(reference(x)).sum().backward()
    layer(x).sum().backward()
    block = layer.weight.grad.data_ptr()
    assert block % (2 << 20) == 0  # a huge page's block, not torch's allocation
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    assert layer.weight.grad.data_ptr() == block
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)


@pytest.mark.parametrize("activation", ["relu", None])
def test_linear_under_autocast(activation):
    """Under CPU autocast the layer computes in bfloat16 as torch.nn.Linear does, its parameters'
    gradients in their own float32."""
    require("cpu")
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(24, 16), TORCH_ACTIVATIONS[activation])
    layer = genfast.nn.Linear(24, 16, activation=activation)
    layer.load_state_dict(reference[0].state_dict())
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = run_module(reference, x)
        out, grads = run_module(layer, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected_grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=2e-2)


def test_linear_options():
    layer = genfast.nn.Linear(4, 3, activation="leaky_relu", alpha=0.2, gain=math.sqrt(2))
    x = torch.randn(5, 4)
    expected = F.leaky_relu(F.linear(x, layer.weight, layer.bias), 0.2) * math.sqrt(2)
    torch.testing.assert_close(layer(x), expected)
    assert repr(layer) == ("Linear(in_features=4, out_features=3, bias=True, activation='leaky_relu', alpha=0.2, "
                           "gain=1.4142135623730951)")
    assert repr(genfast.nn.Linear(4, 3)) == repr(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="activation"):
        genfast.nn.Linear(4, 3, activation="elu")
