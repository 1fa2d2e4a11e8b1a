"""genfast.ops.layer_norm / rms_norm (with and without a residual) and their
modules against the float64 reference and PyTorch's own ops."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close_to_reference, assert_compiles_like_eager, interpreted, require

import genfast
from genfast.backends import extension, triton_interpreted
from genfast.reference import norm as reference

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]
KINDS = ["layer", "rms"]

SHAPES = [  # (shape of x, normalized_shape)
    ((1, 1), (1,)),  # one row of one element
    ((3, 7), (7,)),  # a prime width
    ((2, 5, 33), (33,)),  # leading dimensions, an odd width
    ((4, 1000), (1000,)),  # wider than a vector block, not a power of two
    ((2, 3, 4), (3, 4)),  # normalised over two dimensions
    ((97,), (97,)),  # a single unbatched row
    ((67, 64), (64,)),  # more rows than the backward has tasks or programs
]


def make_input(shape, layout, dtype, device):
    if layout == "transposed":  # the same values, the first two dimensions' strides swapped
        return torch.randn(shape[::-1], device=device).to(dtype).mT if len(shape) == 2 else pytest.skip("2-d only")
    if layout == "strided":  # every other element of the last dimension
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
    return torch.randn(shape, device=device).to(dtype)


def genfast_norm(kind, x, shape, weight, bias, eps, residual):
    if kind == "rms":
        return genfast.ops.rms_norm(x, shape, weight, eps, residual)
    return genfast.ops.layer_norm(x, shape, weight, bias, eps, residual)


def reference_norm(kind, x, shape, weight, bias, eps, residual):
    if kind == "rms":
        return reference.rms_norm(x, shape, weight, eps, residual)
    return reference.layer_norm(x, shape, weight, bias, eps, residual)


def torch_norm(kind, x, shape, weight, bias, eps, residual):
    """PyTorch's own ops, the baseline of the error rule."""
    h = x if residual is None else x + residual
    y = F.rms_norm(h, shape, weight, eps) if kind == "rms" else F.layer_norm(h, shape, weight, bias, eps)
    return y if residual is None else (y, h)


def check_against_reference(backend, kind, x_shape, shape, dtype, atol, *, residual=False, affine=True,
                            layout="contiguous", scale=2.0, shift=0.5):
    device = require(backend)
    x = make_input(x_shape, layout, dtype, device) * scale + shift
    res = torch.randn(x_shape, device=device).to(dtype) if residual else None
    weight = torch.randn(shape, device=device).to(dtype) if affine else None
    bias = torch.randn(shape, device=device).to(dtype) if affine and kind == "layer" else None
    dy, dh = (torch.randn(x_shape, device=device).to(dtype) for _ in range(2))
    eps = 1e-5
    if kind == "layer" and math.prod(shape) == 1:
        # One value per row: var = 0, so rstd = eps^-1/2 multiplies every rounding error of the
        # backward (whose exact dx is 0), in PyTorch's composite reference too.
        atol *= eps**-0.5

    def run(fn, cast):
        inputs = [None if t is None else t.detach().to(cast).requires_grad_() for t in (x, res, weight, bias)]
        xs, rs, ws, bs = inputs
        out = fn(kind, xs, shape, ws, bs, eps, rs)
        y, h = out if residual else (out, None)
        loss = (y * dy.to(cast)).sum() + ((h * dh.to(cast)).sum() if residual else 0)
        leaves = [t for t in inputs if t is not None]
        return (y, h), torch.autograd.grad(loss, leaves)

    with genfast.use_backend(backend):
        (out, h), grads = run(genfast_norm, dtype)
    (ref, ref_h), ref_grads = run(reference_norm, torch.float64)
    (torch_out, torch_h), torch_grads = run(torch_norm, dtype)

    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, ref, torch_out, atol, "y")
    if residual:
        assert h.dtype == dtype
        if backend == "triton" and triton_interpreted() and dtype == torch.bfloat16:
            # The interpreter rounds float32 to bfloat16 toward zero, GPUs to nearest: one ulp apart.
            torch.testing.assert_close(h, x + res, rtol=2**-7, atol=0)
        else:
            assert torch.equal(h, x + res), "h is x + residual rounded to x's dtype"
    names = [name for name, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, res, weight, bias)) if t is not None]
    for name, grad, ref_grad, torch_grad in zip(names, grads, ref_grads, torch_grads):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("x_shape, shape", SHAPES)
def test_matches_reference_fp32(backend, kind, x_shape, shape, residual):
    check_against_reference(backend, kind, x_shape, shape, torch.float32, 1e-5, residual=residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_dtypes(backend, kind, dtype, atol, residual):
    check_against_reference(backend, kind, (6, 129), (129,), dtype, atol, residual=residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous(backend, kind, layout):
    check_against_reference(backend, kind, (5, 24), (24,), torch.float32, 1e-5, layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_without_affine(backend, kind):
    check_against_reference(backend, kind, (4, 50), (50,), torch.float32, 1e-5, residual=True, affine=False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype, atol", [DTYPES[0], DTYPES[2]], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_model_widths(backend, kind, dtype, atol):
    """GPT-2 and Llama widths, with more rows than a CPU task holds."""
    if require(backend) == "cpu" and backend == "triton":
        pytest.skip("too large for the Triton interpreter")
    for width in (768, 4096):
        check_against_reference(backend, kind, (2, 67, width), (width,), dtype, atol, residual=True)


@pytest.mark.parametrize("dtype, atol, rows", [(torch.float32, 1e-5, 701), (torch.bfloat16, 2e-2, 1402)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cold_outputs_are_streamed_alike(kind, dtype, atol, rows):
    """An output block of genfast's output memory given back long ago (more than
    output_memory_cold_after_bytes since) is written with streaming stores, a fresh or recent one
    with plain stores: the same values either way. Rows of an odd width start off the streaming
    stores' 32-byte alignment, so each row has a head and a tail of plain stores."""
    require("cpu")
    torch.manual_seed(0)
    x, residual, dy, dh = (torch.randn(rows, 771).to(dtype) for _ in range(4))  # 2.2 MB each: output memory
    weight, bias = torch.randn(771), torch.randn(771)

    def run(shift):
        leaves = [t.add(shift).requires_grad_() for t in (x, residual)]
        with genfast.use_backend("cpu"):
            y, h = genfast_norm(kind, leaves[0], (771,), weight, bias, 1e-5, leaves[1])
        grads = torch.autograd.grad((y, h), leaves, (dy, dh))
        outputs = (y, h, *grads)
        return {t.data_ptr() for t in outputs}, [t.detach().clone() for t in outputs]  # the blocks given back

    check_against_reference("cpu", kind, (rows, 771), (771,), dtype, atol, residual=True)
    run(0)
    warm_blocks, warm = run(1)  # in the blocks the call before just gave back
    run(0)  # leaves other values in them, which a missed store would show
    # More than the cold line's worth of other blocks given back after those.
    count = extension().output_memory_cold_after_bytes // (6 << 20) + 2
    flush = [extension().empty_output([6 << 18], weight) for _ in range(count)]
    del flush
    cold_blocks, cold = run(1)
    assert cold_blocks == warm_blocks  # the same blocks, all taken back cold
    for a, b in zip(warm, cold, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_large_mean_keeps_variance(backend):
    """x = 1e4 + noise: a one-pass E[x^2] - E[x]^2 in float32 would cancel to garbage, and a
    rounded mean costs half an ulp of 1e4 in every output (as the plain-PyTorch reference's does)."""
    check_against_reference(backend, "layer", (3, 300), (300,), torch.float32, 1e-5, scale=1.0, shift=1e4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(backend, kind):
    device = require(backend)
    x, residual = (torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))

    def norm(x, residual, weight, bias):
        y, h = genfast_norm(kind, x, (2, 5), weight, bias, 1e-5, residual)
        return y, h * h

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(norm, (x, residual, weight, bias if kind == "layer" else None),
                                        fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_stays_in_its_row(backend, kind):
    device = require(backend)
    x = torch.randn(3, 8, device=device)
    x[1, 2] = float("nan")
    with genfast.use_backend(backend):
        out = genfast_norm(kind, x, (8,), None, None, 1e-5, None)
    assert out[1].isnan().all()
    assert out[0].isfinite().all() and out[2].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    x = torch.randn(0, 6, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        y, h = genfast.ops.layer_norm(x, 6, residual=torch.zeros(0, 6, device=device))
    assert y.shape == h.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_weight_gradient_is_deterministic():
    """The weight and bias gradients add up per task in a fixed order, whatever the threads."""
    require("cpu")
    x = torch.randn(1000, 96, requires_grad=True)
    weight, bias = (torch.randn(96, requires_grad=True) for _ in range(2))
    grads = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with genfast.use_backend("cpu"):
                y = genfast.ops.layer_norm(x, 96, weight, bias)
            grads.append(torch.autograd.grad(y.square().sum(), (weight, bias)))
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


BAD_INPUTS = [  # (arguments, error type, words the message must contain)
    (lambda: (torch.randn(2, 6), 5), ValueError, "normalized_shape"),
    (lambda: (torch.randn(6), (2, 6)), ValueError, "normalized_shape"),
    (lambda: (torch.randn(2, 6), ()), TypeError, "normalized_shape"),
    (lambda: (torch.randn(2, 6), 6.0), TypeError, "normalized_shape"),
    (lambda: (torch.randn(2, 6), 6, torch.randn(5)), ValueError, "weight"),
    (lambda: (torch.randn(2, 6), 6, torch.ones(6, dtype=torch.int64)), TypeError, "weight"),
    (lambda: (torch.ones(2, 6, dtype=torch.int32), 6), TypeError, "x"),
    (lambda: ([1.0, 2.0], 2), TypeError, "x"),
    (lambda: (torch.randn(2, 6), 6, torch.randn(6, device="meta")), ValueError, "weight"),
    (lambda: (torch.randn(2, 6), 6, None, -1.0), ValueError, "eps"),
    (lambda: (torch.randn(2, 6), 6, None, 1e-5, torch.randn(2, 5)), ValueError, "residual"),
    (lambda: (torch.randn(2, 6), 6, None, 1e-5, torch.randn(2, 6, dtype=torch.float64)), TypeError, "residual"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_args, error, words", BAD_INPUTS)
def test_bad_input(backend, make_args, error, words):
    require(backend)
    x, shape, weight, eps, residual = (*make_args(), None, 1e-5, None)[:5]
    with genfast.use_backend(backend), pytest.raises(error, match=words):
        genfast.ops.rms_norm(x, shape, weight, eps, residual)
    with genfast.use_backend(backend), pytest.raises(error, match=words):
        genfast.ops.layer_norm(x, shape, weight, None, eps, residual)


def test_extension_checks_its_arguments():
    """The C++ entry points check again, so calling genfast._C directly is safe."""
    ext = require("cpu") and genfast.backends.extension()
    x, weight = torch.randn(4, 6), torch.ones(6)
    with pytest.raises(RuntimeError, match="weight"):
        ext.layer_norm_forward(x, None, torch.ones(5), weight, 1e-5, False)
    with pytest.raises(RuntimeError, match="residual"):
        ext.layer_norm_forward(x, torch.randn(4, 5), weight, weight, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.layer_norm_forward(x.mT, None, torch.ones(4), torch.ones(4), 1e-5, False)
    with pytest.raises(RuntimeError, match="rstd"):
        ext.layer_norm_backward(x, None, x, weight, torch.zeros(4), torch.zeros(3), False)


@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_module_loads_torch_state_dict(module, affine):
    torch_norm = getattr(torch.nn, module)((3, 16), eps=1e-6, elementwise_affine=affine)
    for param in torch_norm.parameters():
        torch.nn.init.normal_(param)
    norm = getattr(genfast.nn, module)((3, 16), eps=1e-6, elementwise_affine=affine)
    norm.load_state_dict(torch_norm.state_dict())
    assert norm.state_dict().keys() == torch_norm.state_dict().keys()
    x, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(norm(x), torch_norm(x), rtol=1e-5, atol=1e-5)
    y, h = norm(x, residual)
    torch.testing.assert_close(y, torch_norm(x + residual), rtol=1e-5, atol=1e-5)
    assert torch.equal(h, x + residual)


def test_layer_norm_module_without_bias():
    torch_norm = torch.nn.LayerNorm(8, bias=False)
    norm = genfast.nn.LayerNorm(8, bias=False)
    assert norm.state_dict().keys() == torch_norm.state_dict().keys()
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), torch_norm(x), rtol=1e-5, atol=1e-5)


class _PreNormBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.norm = genfast.nn.RMSNorm(16)
        self.final = genfast.nn.LayerNorm(16)

    def forward(self, x):
        y, h = self.norm(x, self.linear(x))
        return self.final(h + y)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_PreNormBlock(), torch.randn(2, 5, 16), compiler)
