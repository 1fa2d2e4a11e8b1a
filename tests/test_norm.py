"""genfast.ops.group_norm and genfast.nn.GroupNorm against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
import helpers
from helpers import (
    assert_close_to_reference, assert_compiles_like_eager, interpreted, relative_error, require,
)

import genfast
from genfast.reference.norm import group_norm as reference_group_norm

BACKENDS = (*helpers.BACKENDS, "cuda")  # GroupNorm has a CUDA kernel too

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

SHAPES = [  # (shape, groups)
    ((1, 3, 1, 1), 1),  # batch 1, 1x1 spatial, C=3 in one group
    ((2, 6, 7, 13), 3),  # odd spatial sizes, C=6 in 3 groups
    ((3, 8, 5), 4),  # 1-d spatial
    ((2, 4, 3, 5, 2), 2),  # 3-d spatial
    ((5, 12), 3),  # no spatial dimensions
    ((2, 64, 9, 11), 32),  # many small groups
    ((1, 10, 37, 3), 1),  # one group of 10 channels with a prime spatial size
    ((2, 40, 5, 7), 5),  # channels-last: two blocks of 16 channels and a short one, groups across them
]


def make_input(shape, layout, dtype, device):
    """A tensor of ``shape`` whose memory is laid out as ``layout``."""
    if layout == "channels_last":
        if len(shape) < 3:
            pytest.skip("channels-last needs spatial dimensions")
        return torch.randn(shape, device=device).to(dtype).movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":  # every other element of the last dimension: neither layout
        wide = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)
        return wide[..., ::2]
    return torch.randn(shape, device=device).to(dtype)


def torch_group_norm(x, groups, weight, bias, eps, activation):
    """PyTorch's own kernels, the baseline of the error rule."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def check_against_reference(backend, shape, groups, layout, dtype, atol, activation, affine=True):
    device = require(backend)
    x = make_input(shape, layout, dtype, device) * 2 + 0.5
    channels = shape[1]
    params = [torch.randn(channels, device=device).to(dtype) for _ in range(2)] if affine else [None, None]
    dy = torch.randn(shape, device=device).to(dtype)
    eps = 1e-5

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, *params) if t is not None]
        args = leaves if affine else leaves + [None, None]
        y = fn(args[0], groups, args[1], args[2], eps, activation)
        return y, torch.autograd.grad(y, leaves, dy.to(cast))

    with genfast.use_backend(backend):
        out, grads = run(genfast.ops.group_norm, dtype)
    ref, ref_grads = run(reference_group_norm, torch.float64)
    torch_out, torch_grads = run(torch_group_norm, dtype)

    assert out.dtype == dtype and out.shape == x.shape
    if layout != "strided":
        assert out.stride() == x.stride(), "y keeps the memory layout of x"
    assert_close_to_reference(out, ref, torch_out, atol, "y")
    for name, grad, ref_grad, torch_grad in zip(("dx", "dweight", "dbias"), grads, ref_grads, torch_grads):
        assert grad.dtype == dtype
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape, groups", SHAPES)
def test_matches_reference_fp32(backend, shape, groups, layout, activation):
    check_against_reference(backend, shape, groups, layout, torch.float32, 1e-5, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_dtypes(backend, dtype, atol, layout, activation):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels take float32, float16 and bfloat16")
    check_against_reference(backend, (2, 6, 7, 13), 3, layout, dtype, atol, activation)


# At least as many groups as an H100 has SMs, where the CUDA forward keeps each group on chip
# (registers and shared memory); one shape vectorises in both layouts, the other in neither.
MANY_GROUPS = [((3, 512, 4, 6), 64), ((5, 64, 7, 13), 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, atol", [DTYPES[0], DTYPES[2]], ids=str)
@pytest.mark.parametrize("shape, groups", MANY_GROUPS)
def test_many_groups(backend, shape, groups, dtype, atol, layout):
    check_against_reference(backend, shape, groups, layout, dtype, atol, "silu")


# Groups of 40960 and 23616 elements, larger than any test above: the benchmark's headline
# shape, and one whose groups the CUDA forward splits between registers and shared memory at a
# count of vectors that is not a multiple of its block, in both layouts.
LARGE_GROUPS = [((8, 320, 64, 64), 32), ((5, 256, 41, 72), 32)]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype, atol", [DTYPES[0], DTYPES[2]], ids=str)
@pytest.mark.parametrize("shape, groups", LARGE_GROUPS, ids=str)
def test_large_groups(backend, shape, groups, dtype, atol, layout):
    if require(backend) == "cpu" and backend == "triton":
        pytest.skip("too large for the Triton interpreter")
    check_against_reference(backend, shape, groups, layout, dtype, atol, "silu")


@pytest.mark.parametrize("batch", [5, 6])
def test_channels_last_cpu_splits_agree(batch):
    """The CPU kernels split a channels-last batch by whole samples where it divides evenly among
    the threads, else by blocks of rows: the same sums in the same order, so every thread count
    gives the same bits, forward and backward."""
    require("cpu")
    shape, groups = (batch, 40, 9, 15), 5  # 135 rows a sample: three row blocks, the last short
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            check_against_reference("cpu", shape, groups, "channels_last", torch.float32, 1e-5, "silu")
            torch.manual_seed(0)
            x = make_input(shape, "channels_last", torch.float32, "cpu").requires_grad_()
            weight, bias = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
            with genfast.use_backend("cpu"):
                y = genfast.ops.group_norm(x, groups, weight, bias, 1e-5, "silu")
            results.append((y, *torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_affine(backend):
    check_against_reference(backend, (2, 6, 4, 5), 2, "contiguous", torch.float32, 1e-5, "silu", affine=False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    device = require(backend)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    w, b = (torch.randn(6, dtype=torch.float64, device=device, requires_grad=True) for _ in range(2))
    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: genfast.ops.group_norm(a[0], 3, a[1], a[2], activation="silu"),
                                        (x, w, b), fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_keeps_variance(backend):
    """x = 1e4 + noise: a one-pass sum of squares in float32 would cancel to garbage."""
    device = require(backend)
    x = 1e4 + torch.randn(2, 8, 6, 6, device=device)
    with genfast.use_backend(backend):
        out = genfast.ops.group_norm(x, 4)
    ref = reference_group_norm(x.double(), 4)
    assert relative_error(out, ref) < 1e-2



@pytest.mark.parametrize("backend", BACKENDS)
def test_near_constant_and_huge_groups(backend):
    """A near-constant group (|mean| * rstd near 1e5) keeps the accuracy of torch's GroupNorm:
    x * scale + (bias - mean * scale) would round at |mean| * scale. A group holding 1e30
    overflows float32's sum of squares, as torch's does: its outputs stay finite (rstd 0), where
    finishing the moments in float32 too gave inf - inf = NaN."""
    device = require(backend)
    generator = torch.Generator().manual_seed(0)
    x = 1e3 + 1e-4 * torch.randn(2, 8, 5, 7, generator=generator)
    x[1, :2, 0, 0] = 1e30
    w, b = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    x, w, b = x.to(device), w.to(device), b.to(device)
    with genfast.use_backend(backend):
        out = genfast.ops.group_norm(x, 4, w, b, eps=1e-5, activation="silu")
    ref = reference_group_norm(x.double(), 4, w.double(), b.double(), 1e-5, activation="silu")
    assert out.isfinite().all()
    assert_close_to_reference(out, ref, F.silu(F.group_norm(x, 4, w, b, 1e-5)), 1e-5, "group_norm")

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_group(backend):
    device = require(backend)
    x = torch.randn(2, 4, 3, 3, device=device)
    x[0, 0, 1, 1] = float("nan")
    with genfast.use_backend(backend):
        out = genfast.ops.group_norm(x, 2, activation="silu")
    assert out[0, :2].isnan().all()
    assert out[0, 2:].isfinite().all() and out[1].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    device = require(backend)
    x = torch.randn(0, 6, 4, 4, device=device, requires_grad=True)
    with genfast.use_backend(backend):
        out = genfast.ops.group_norm(x, 3, activation="silu")
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


BAD_INPUTS = [  # (make arguments, error type, words the message must contain)
    (lambda: (torch.randn(2, 6, 4), 4), ValueError, "num_groups"),
    (lambda: (torch.randn(2, 6, 4), 0), ValueError, "num_groups"),
    (lambda: (torch.randn(2, 6, 4), 3, torch.randn(5)), ValueError, "weight"),
    (lambda: (torch.randn(2, 6, 4), 3, None, torch.randn(6, 1)), ValueError, "bias"),
    (lambda: (torch.ones(2, 6, 4, dtype=torch.int32), 3), TypeError, "x"),
    (lambda: (torch.randn(2, 6, 4), 3, torch.ones(6, dtype=torch.int64)), TypeError, "weight"),
    (lambda: (torch.randn(6), 3), ValueError, "x"),
    (lambda: ([1.0, 2.0], 1), TypeError, "x"),
    (lambda: (torch.randn(2, 6, 4), 3, torch.randn(6, device="meta")), ValueError, "weight"),
    (lambda: (torch.randn(2, 6, 4), 3, None, None, 1e-5, "gelu"), ValueError, "activation"),
    (lambda: (torch.randn(2, 6, 4), 3, None, None, -1.0), ValueError, "eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_args, error, words", BAD_INPUTS)
def test_bad_input(backend, make_args, error, words):
    require(backend)
    with genfast.use_backend(backend), pytest.raises(error, match=words):
        genfast.ops.group_norm(*make_args())


@pytest.mark.parametrize("activation", [None, "silu"])
def test_module_loads_torch_state_dict(activation):
    torch_norm = torch.nn.GroupNorm(4, 12)
    torch.nn.init.normal_(torch_norm.weight)
    torch.nn.init.normal_(torch_norm.bias)
    norm = genfast.nn.GroupNorm(4, 12, activation=activation)
    norm.load_state_dict(torch_norm.state_dict())
    assert norm.state_dict().keys() == torch_norm.state_dict().keys()
    x = torch.randn(3, 12, 5, 5)
    expected = torch_norm(x)
    if activation == "silu":
        expected = F.silu(expected)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    assert f"activation={activation!r}" in repr(norm)


def test_autograd_nodes_carry_the_op_name():
    """What torch's profiler and a grad_fn show: the op, not a generic autograd.Function."""
    x = torch.randn(2, 4, 3, requires_grad=True)
    with genfast.use_backend("cpu"):
        y = genfast.ops.group_norm(x, 2, activation="silu")
    assert y.grad_fn.name() == "genfast.GroupNormBackward"


def test_module_without_affine():
    norm = genfast.nn.GroupNorm(2, 4, affine=False, activation="silu")
    assert dict(norm.state_dict()) == {}
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(norm(x), F.silu(F.group_norm(x, 2)), rtol=1e-5, atol=1e-5)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = genfast.nn.GroupNorm(4, 8, activation="silu")

    def forward(self, x):
        return self.norm(self.conv(x)) + x


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_Block(), torch.randn(2, 8, 6, 6), compiler)


def test_large_outputs_reuse_memory():
    """Outputs of 2 MB or more come from genfast's CPU output cache: a freed one's memory serves
    the next call, whose kernel overwrites all of it."""
    require("cpu")
    x = torch.randn(2, 64, 256, 256)  # 33.5 MB
    with genfast.use_backend("cpu"):
        first = genfast.ops.group_norm(x * 3 + 1, 8, activation="silu")
        address = first.data_ptr()
        del first
        second = genfast.ops.group_norm(x, 8, activation="silu")
    assert second.data_ptr() == address
    torch.testing.assert_close(second, F.silu(F.group_norm(x, 8)), rtol=1e-5, atol=1e-5)
