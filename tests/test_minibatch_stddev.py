"""genfast.ops.minibatch_stddev against the float64 reference: group sizes, channel sets, odd
shapes, dtypes, and its gradients of first and second order."""

import pytest
import torch
from helpers import (
    BACKENDS, assert_close_to_reference, assert_compiles_like_eager, check_bad_input, interpreted, require,
)

import genfast
from genfast.reference.minibatch_stddev import minibatch_stddev as reference

DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

# (shape, group_size, num_channels): StyleGAN's defaults, a group of the whole batch, batch 1,
# prime sizes, several channel sets, and a run of several Triton blocks.
CASES = [((8, 6, 3, 5), 4, 1), ((3, 7, 5, 3), 4, 1), ((1, 5, 2, 2), 4, 1), ((6, 6, 1, 1), 2, 3), ((4, 2, 17, 19), 4, 2),
         ((10, 4, 4, 4), 5, 4)]


def check_against_reference(backend, shape, group_size, num_channels, dtype, atol):
    device = require(backend)
    x = torch.randn(shape, device=device) * 2 + 1
    dout = torch.randn(shape[0], shape[1] + num_channels, *shape[2:], device=device)

    def run(fn, cast):
        leaf = x.detach().to(cast).requires_grad_()
        y = fn(leaf, group_size, num_channels)
        return y, torch.autograd.grad(y, leaf, dout.to(cast))[0]

    with genfast.use_backend(backend):
        out, grad = run(genfast.ops.minibatch_stddev, dtype)
    ref, ref_grad = run(reference, torch.float64)
    torch_out, torch_grad = run(reference, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_reference(out, ref, torch_out, atol, "y")
    assert_close_to_reference(grad, ref_grad, torch_grad, atol, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, group_size, num_channels", CASES, ids=str)
def test_matches_reference_fp32(backend, shape, group_size, num_channels):
    check_against_reference(backend, shape, group_size, num_channels, torch.float32, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_dtypes(backend, dtype, atol):
    check_against_reference(backend, (4, 6, 5, 3), 2, 2, dtype, atol)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradgradcheck(backend):
    """Second order, as a GAN's R1 penalty takes it through the discriminator."""
    device = require(backend)
    x = torch.randn(4, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: genfast.ops.minibatch_stddev(x, 2, 2), (x,),
                                        fast_mode=interpreted(backend))
        assert torch.autograd.gradgradcheck(lambda x: genfast.ops.minibatch_stddev(x, 2, 2), (x,),
                                            fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_input(backend):
    device = require(backend)
    x = torch.randn(4, 3, 5, 5, device=device).to(memory_format=torch.channels_last)
    with genfast.use_backend(backend):
        torch.testing.assert_close(genfast.ops.minibatch_stddev(x), reference(x))


BAD_INPUTS = [  # (call, error type, words the message must contain)
    (lambda: genfast.ops.minibatch_stddev(torch.randn(4, 3, 5)), ValueError, "x must be"),
    (lambda: genfast.ops.minibatch_stddev(torch.ones(4, 3, 2, 2, dtype=torch.int32)), TypeError, "x"),
    (lambda: genfast.ops.minibatch_stddev(torch.randn(6, 4, 2, 2)), ValueError, "group_size"),
    (lambda: genfast.ops.minibatch_stddev(torch.randn(4, 3, 2, 2), num_channels=2), ValueError, "num_channels"),
    (lambda: genfast.ops.minibatch_stddev(torch.randn(4, 3, 2, 2), group_size=0), ValueError, "group_size"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, error, words", BAD_INPUTS)
def test_bad_input(backend, call, error, words):
    check_bad_input(backend, call, error, words)


def test_extension_checks_its_arguments():
    ext = require("cpu") and genfast.backends.extension()
    x = torch.randn(4, 6, 3, 3)
    with pytest.raises(RuntimeError, match="group"):
        ext.minibatch_stddev_forward(x, 3, 1)
    with pytest.raises(RuntimeError, match="channels"):
        ext.minibatch_stddev_forward(x, 2, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.minibatch_stddev_forward(x.transpose(2, 3), 2, 1)
    with pytest.raises(RuntimeError, match="dout"):
        ext.minibatch_stddev_backward(torch.randn(4, 6, 3, 3), x, 2, 1)


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3)

    def forward(self, x):
        return self.conv(genfast.ops.minibatch_stddev(x, 2))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_Head(), torch.randn(4, 3, 6, 6), compiler)
