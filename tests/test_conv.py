"""genfast.ops.conv2d and genfast.nn.Conv2d against torch's convolution in float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, assert_compiles_like_eager, require

import genfast
from genfast.backends import extension

# (N, C, H, W, K, padding): sizes of 1, primes and images smaller than a tile's stride; the last
# has filters over 1 MB once transformed, which take the kernel's other path (ATen's bmm).
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 7, 5, 5, 1),
    (3, 17, 13, 6, 33, 0),
    (2, 5, 4, 9, 7, 2),
    (1, 32, 3, 3, 16, 1),
    (2, 64, 8, 8, 48, (1, 0)),
    (1, 128, 5, 7, 130, 1),
]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def _laid_out(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other column of a wider image: no dense layout
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _inputs(shape, bias=True):
    n, c, h, w, k, padding = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=generator)
    weight = torch.randn(k, c, 3, 3, generator=generator) / (3 * c**0.5)
    return x, weight, torch.randn(k, generator=generator) if bias else None, padding


def _counted(monkeypatch, name: str) -> list:
    """The arguments of each call of the extension's kernel ``name``: a test tells from them that it ran."""
    require("cpu")
    calls = []
    kernel = getattr(extension(), name)

    def counted(*args):
        calls.append(args)
        return kernel(*args)

    monkeypatch.setattr(extension(), name, counted)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """The calls of the Winograd convolution (the forward's, and the backward's for the input's gradient)."""
    return _counted(monkeypatch, "conv2d_winograd")


@pytest.fixture
def filters_gradient_calls(monkeypatch):
    """The calls of the Winograd kernel of the filters' gradient, whose backward then takes every
    size (it runs only where it measured faster: not at few tiles of many channels)."""
    monkeypatch.setattr(genfast.ops.conv, "BACKWARD_MIN_TILES_PER_THREAD", 0)
    return _counted(monkeypatch, "conv2d_winograd_filters_backward")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, layout, bias, kernel_calls):
    x, weight, b, padding = _inputs(shape, bias)
    x = _laid_out(x, layout)
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, b, padding=padding)
    assert len(kernel_calls) == 1
    want = F.conv2d(x, weight, b, padding=padding)
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=padding)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous() == want.is_contiguous()
    assert_close_to_reference(y, ref, want, 1e-6, f"{shape} {layout}")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[-1]])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("upsample", [2, 3])
def test_upsampled_input_matches_reference(shape, layout, upsample, kernel_calls):
    """conv2d(x, upsample=u) is conv2d(F.interpolate(x, scale_factor=u)): the kernel reads x."""
    x, weight, b, padding = _inputs(shape)
    x = _laid_out(x, layout)
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, b, padding=padding, upsample=upsample)
    assert len(kernel_calls) == 1 and kernel_calls[0][0].shape == x.shape
    big = F.interpolate(x, scale_factor=upsample, mode="nearest")
    ref = F.conv2d(big.double(), weight.double(), b.double(), padding=padding)
    assert_close_to_reference(y, ref, F.conv2d(big, weight, b, padding=padding), 1e-6, f"{shape} {layout}")


# residual: how it is made from the output's shape, and whether the kernel adds it (channels innermost)
RESIDUALS = {
    "channels_last": (lambda n, k, h, w: torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last), True),
    "per channel": (lambda n, k, h, w: torch.randn(n, k, 1, 1), True),
    "bias-like": (lambda n, k, h, w: torch.randn(k, 1, 1), True),
    "contiguous": (lambda n, k, h, w: torch.randn(n, k, h, w), False),
    "per pixel": (lambda n, k, h, w: torch.randn(1, 1, h, w), False),
}


@pytest.mark.parametrize("residual_kind", list(RESIDUALS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[-1]])
def test_residual_matches_reference(residual_kind, layout, shape, kernel_calls):
    x, weight, b, padding = _inputs(shape)
    x = _laid_out(x, layout)
    want = F.conv2d(x, weight, b, padding=padding)
    make, fused = RESIDUALS[residual_kind]
    residual = make(*want.shape)
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, b, padding=padding, residual=residual)
    assert len(kernel_calls) == 1 and (kernel_calls[0][3] is not None) == fused
    ref = F.conv2d(x.double(), weight.double(), b.double(), padding=padding) + residual.double()
    assert y.shape == ref.shape
    assert_close_to_reference(y, ref, want + residual, 1e-6, f"{shape} {layout} {residual_kind}")


@pytest.mark.parametrize("residual_kind", ["channels_last", "per channel"])
def test_residual_gradients(residual_kind):
    require("cpu")
    x, weight, b, padding = _inputs(SHAPES[1])
    residual = RESIDUALS[residual_kind][0](*F.conv2d(x, weight, b, padding=padding).shape)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b, residual)]
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(*leaves[:3], padding=padding, residual=leaves[3], upsample=1)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, weight, b, residual)]
    want = torch.autograd.grad(F.conv2d(*leaves64[:3], padding=padding) + leaves64[3], leaves64, dy.double())
    for name, got, ref in zip(("input", "weight", "bias", "residual"), grads, want, strict=True):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_reach_the_outputs_they_reach_in_torch(bad, kernel_calls):
    """NaN lands where torch's NaN does; an infinity makes the same outputs non-finite (some NaN
    where torch's are infinite: the transforms subtract it from itself)."""
    x, weight, b, padding = _inputs((2, 3, 9, 8, 4, 1))
    x[0, 1, 4, 3], x[1, 0, 0, 7], x[1, 2, 8, 0] = bad, bad, bad
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, b, padding=padding)
    want = F.conv2d(x, weight, b, padding=padding)
    assert len(kernel_calls) == 1
    assert torch.equal(torch.isfinite(y), torch.isfinite(want))
    if bad != bad:
        assert torch.equal(torch.isnan(y), torch.isnan(want))


def _gradients_against_reference(shape, layout, upsample, wanted=(True, True, True)):
    """genfast's gradients of the leaves ``wanted`` (input, weight, bias), each checked against
    float64 under the tests' rule (twice float32 torch's error + 1e-6). A channels-last layout
    lays out the weight so too, as a channels-last model's are."""
    x, weight, b, padding = _inputs(shape)
    x = _laid_out(x, layout)
    if layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_(w) for t, w in zip((x, weight, b), wanted)]
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(*leaves, padding=padding, upsample=upsample)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy)

    def torch_gradients(dtype):
        leaves = [t.to(dtype).requires_grad_(w) for t, w in zip((x, weight, b), wanted)]
        big = F.interpolate(leaves[0], scale_factor=upsample, mode="nearest")
        y = F.conv2d(big, *leaves[1:], padding=padding)
        return torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy.to(dtype))

    names = [name for name, w in zip(("input", "weight", "bias"), wanted) if w]
    for name, got, want, ref in zip(names, grads, torch_gradients(torch.float32), torch_gradients(torch.float64),
                                    strict=True):
        assert got.shape == ref.shape, name
        if name == "weight":  # in the weight's layout, so that autograd need not copy it there
            assert got.stride() == weight.stride(), f"{got.stride()} for a weight of {weight.stride()}"
        assert_close_to_reference(got, ref, want, 1e-6, f"{shape} {layout} upsample {upsample}: {name}")


# Padding 3, and enough tiles (5712) for the filters' gradient to sum them thread by thread
BACKWARD_SHAPES = [*SHAPES, (2, 4, 6, 5, 3, 3), (2, 8, 111, 101, 9, 1)]


@pytest.mark.parametrize("shape", BACKWARD_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("upsample", [1, 2])
def test_gradients_match_reference(shape, layout, upsample, kernel_calls, filters_gradient_calls):
    """The input's gradient by the Winograd kernel (a padding of 3 by ATen's: its full correlation
    would need a negative one), the filters' and the bias's by the Winograd transforms."""
    _gradients_against_reference(shape, layout, upsample)
    padding = shape[-1] if isinstance(shape[-1], int) else max(shape[-1])
    assert len(kernel_calls) == (2 if padding <= 2 else 1)
    assert len(filters_gradient_calls) == 1


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True),
                                    (False, True, True), (True, False, True)])
def test_gradients_of_some_leaves(wanted, kernel_calls, filters_gradient_calls):
    _gradients_against_reference(SHAPES[1], "channels_last", 2, wanted)
    assert len(kernel_calls) == 1 + wanted[0]
    assert len(filters_gradient_calls) == wanted[1]


def test_second_order_gradients_match_reference():
    """An R1-style penalty: the input's gradient taken with create_graph, then differentiated for
    the weights, runs ATen's backward, whose own gradient torch knows."""
    require("cpu")
    x, weight, b, padding = _inputs(SHAPES[3])

    def penalty_gradients(conv, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, b)]
        (dx,) = torch.autograd.grad(conv(*leaves, padding=padding).square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(dx.square().sum(), leaves[1:])

    with genfast.use_backend("cpu"):
        got = penalty_gradients(genfast.ops.conv2d, torch.float32)
    for name, g, want, ref in zip(("weight", "bias"), got, penalty_gradients(F.conv2d, torch.float32),
                                  penalty_gradients(F.conv2d, torch.float64), strict=True):
        assert_close_to_reference(g, ref, want, 1e-6, name)


@pytest.mark.parametrize("shape, winograd", [
    ((1, 128, 8, 8, 256, 1), True),  # 16 tiles
    ((1, 128, 6, 8, 256, 1), False),  # 12 tiles
    ((1, 8, 6, 8, 16, 1), False),  # and few channels
    ((1, 300, 8, 8, 256, 1), False),  # past 256 x 256 channels
])
def test_backward_runs_where_it_measured_faster(monkeypatch, shape, winograd, kernel_calls):
    """genfast's backward up to 256 x 256 channels at 16 tiles a thread or more; else ATen's."""
    calls = _counted(monkeypatch, "conv2d_winograd_filters_backward")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    x, weight, b, padding = _inputs(shape)
    x.requires_grad_(), weight.requires_grad_()
    with genfast.use_backend("cpu"):
        genfast.ops.conv2d(x, weight, b, padding=padding).sum().backward()
    assert (len(calls), len(kernel_calls)) == ((1, 2) if winograd else (0, 1))


@pytest.mark.parametrize("upsample", [1, 2])
@pytest.mark.parametrize("gradient", ["channels_first", "channel_slice"])
def test_input_gradient_keeps_the_inputs_layout(filters_gradient_calls, upsample, gradient):
    """A channels-last input's gradient is channels-last whatever dy's layout (a loss's gradient is
    channels-first, a concatenation's a channel slice), and both gradients match torch's."""
    x, weight, b, padding = _inputs((2, 5, 7, 6, 9, 1))
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_()
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, b, padding=padding, upsample=upsample)
    both = torch.randn(y.shape[0], 2 * y.shape[1], *y.shape[2:]).contiguous(memory_format=torch.channels_last)
    dy = both[:, : y.shape[1]] if gradient == "channel_slice" else both[:, : y.shape[1]].contiguous()
    got = torch.autograd.grad(y, (x, weight), dy)
    upsampled = F.interpolate(x, scale_factor=upsample, mode="nearest")
    want = torch.autograd.grad(F.conv2d(upsampled, weight, b, padding=padding), (x, weight), dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert len(filters_gradient_calls) == 1


def test_unbatched_and_padding_names(kernel_calls):
    x, weight, b, _ = _inputs((1, 6, 9, 11, 4, 1))
    for padding, torch_padding in (("same", "same"), ("valid", "valid"), (2, 2)):
        with genfast.use_backend("cpu"):
            got = genfast.ops.conv2d(x[0], weight, b, padding=padding)
        torch.testing.assert_close(got, F.conv2d(x[0], weight, b, padding=torch_padding), rtol=1e-5, atol=1e-5)
    with genfast.use_backend("cpu"):
        got = genfast.ops.conv2d(x[0], weight, b, padding=1, upsample=2)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest")[0], weight, b, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 4


@pytest.mark.parametrize(
    "kwargs, kernel_size, dtype",
    [({"stride": 2}, 3, torch.float32), ({"dilation": 2}, 3, torch.float32), ({"groups": 2}, 3, torch.float32),
     ({}, 1, torch.float32), ({}, 5, torch.float32), ({}, 3, torch.float64), ({}, 3, torch.bfloat16)],
)
def test_other_convolutions_run_aten(kwargs, kernel_size, dtype, kernel_calls):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 9, generator=generator).to(dtype)
    weight = torch.randn(6, 4 // kwargs.get("groups", 1), kernel_size, kernel_size, generator=generator).to(dtype)
    with genfast.use_backend("cpu"):
        got = genfast.ops.conv2d(x, weight, None, padding=1, **kwargs)
    assert not kernel_calls
    torch.testing.assert_close(got, F.conv2d(x, weight, None, padding=1, **kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backends_without_a_convolution_run_aten(backend, kernel_calls):
    x, weight, b, padding = _inputs(SHAPES[1])
    with genfast.use_backend(backend):
        got = genfast.ops.conv2d(x, weight, b, padding=padding)
    assert not kernel_calls
    torch.testing.assert_close(got, F.conv2d(x, weight, b, padding=padding), rtol=0, atol=0)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_module_loads_torch_weights(padding_mode, kernel_calls):
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(5, 7, 3, padding=1, padding_mode=padding_mode)
    module = genfast.nn.Conv2d(5, 7, 3, padding=1, padding_mode=padding_mode)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 6, 7)
    with genfast.use_backend("cpu"):
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)
        upsampled = module(x, upsample=2)
    torch.testing.assert_close(upsampled, reference(F.interpolate(x, scale_factor=2)), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 2


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("layouts", [("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                     ("contiguous", "contiguous")])
def test_output_layout_follows_torch(kernel_size, layouts):
    """As torch's: channels-last output if the input or the weight is channels-last."""
    require("cpu")
    x, weight = torch.randn(2, 6, 5, 5), torch.randn(8, 6, kernel_size, kernel_size)
    x, weight = (t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                              torch.contiguous_format) for t, layout in zip((x, weight), layouts, strict=True))
    with genfast.use_backend("cpu"):
        y = genfast.ops.conv2d(x, weight, padding=kernel_size // 2)
    want = F.conv2d(x, weight, padding=kernel_size // 2)
    assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous() == want.is_contiguous()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_module_filters_follow_the_weight(kernel_calls):
    """The kept transformed filters are made again after an optimizer step changes the weight."""
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(4, 8, 3, padding=1)
    module = genfast.nn.Conv2d(4, 8, 3, padding=1)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(2, 4, 5, 5)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (reference, module)]
    for _ in range(3):
        with genfast.use_backend("cpu"):
            got = module(x)
        want = reference(x)
        # The two models' weights drift apart by rounding over the steps; stale filters would be
        # off by about lr * gradient, 1e-2 here.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for out, optimizer in zip((want, got), optimizers, strict=True):
            out.square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert len(kernel_calls) == 3


@pytest.mark.parametrize(
    "make_args, kwargs, error, words",
    [
        (lambda: (torch.ones(1, 2, 4, 4, dtype=torch.int32), torch.ones(3, 2, 3, 3)), {}, TypeError,
         "input must have dtype"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3, dtype=torch.float64)), {}, TypeError,
         "weight must have"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 5, 3, 3)), {}, ValueError, "input has 2 channels"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3)), {}, ValueError, "weight must be"),
        (lambda: (torch.ones(2, 4, 4), torch.ones(3, 2, 3, 3), torch.ones(4)), {}, ValueError, "bias must have shape"),
        (lambda: (torch.ones(1, 1, 2, 4, 4), torch.ones(3, 2, 3, 3)), {}, ValueError, "input must be"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3)), {"upsample": 0}, ValueError, "upsample must"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3)), {"residual": torch.ones(3, 4, 4)}, ValueError,
         "residual of shape"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3)), {"residual": torch.ones(2, 3, 2, 2)}, ValueError,
         "residual of shape"),
        (lambda: (torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3)), {"residual": torch.ones(1, dtype=torch.float64)},
         TypeError, "residual must have"),
    ],
)
def test_bad_input(make_args, kwargs, error, words):
    require("cpu")
    with genfast.use_backend("cpu"), pytest.raises(error, match=words):
        genfast.ops.conv2d(*make_args(), **kwargs)


def test_kernel_checks_its_arguments():
    require("cpu")
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3)
    filters = genfast.ops.conv.winograd_filters(weight)
    with pytest.raises(RuntimeError, match="transformed filters"):
        extension().conv2d_winograd(x, filters[:, :3], None, None, 8, 1, 1, 1)
    with pytest.raises(RuntimeError, match="at least the 3x3 filter"):
        extension().conv2d_winograd(torch.randn(1, 4, 1, 5), filters, None, None, 8, 0, 0, 1)
    with pytest.raises(RuntimeError, match="bias must be"):
        extension().conv2d_winograd(x, filters, torch.randn(7), None, 8, 1, 1, 1)
    with pytest.raises(RuntimeError, match="upsample must be"):
        extension().conv2d_winograd(x, filters, None, None, 8, 1, 1, 0)
    with pytest.raises(RuntimeError, match="residual must be"):
        extension().conv2d_winograd(x, filters, None, torch.randn(1, 8, 5, 5), 8, 1, 1, 1)
    with pytest.raises(RuntimeError, match="dy must be"):
        extension().conv2d_winograd_filters_backward(x, torch.randn(1, 8, 4, 5), 1, 1, 1, True, False)
    with pytest.raises(RuntimeError, match="x must be"):
        extension().conv2d_winograd_filters_backward(x.double(), torch.randn(1, 8, 5, 5), 1, 1, 1, True, False)


class _Decoder(torch.nn.Module):
    """A convolution, SiLU, then an upsampling convolution (diffusers' Upsample2D) and a 1x1 one."""

    def __init__(self):
        super().__init__()
        self.conv = genfast.nn.Conv2d(3, 8, 3, padding=1)
        self.upsample = genfast.nn.Conv2d(8, 8, 3, padding=1)
        self.out = genfast.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.upsample(F.silu(self.conv(x)), upsample=2))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    torch.manual_seed(0)
    assert_compiles_like_eager(_Decoder(), torch.randn(2, 3, 9, 7), compiler)
