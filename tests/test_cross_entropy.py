"""genfast.ops.linear_cross_entropy against the reference (genfast/reference/cross_entropy.py)
computed in float64: the loss and the gradients of input, weight and bias, on every backend
and dtype, in one chunk of rows and in many."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, relative_error, require

import genfast
from genfast.backends import extension
from genfast.ops import cross_entropy as op_module
from genfast.reference import cross_entropy as reference

BACKENDS = ("reference", "cpu", "triton")
# dtype -> the bound on the error: absolute for float32 and float64 (float32's over vocabularies
# past 4k elements), added to twice torch's own error for the half types.
DTYPES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

CASES = [  # (leading shape, H, V, bias, label_smoothing, reduction, ignored rows)
    ((7,), 16, 37, False, 0.0, "mean", False),
    ((2, 5), 33, 129, True, 0.1, "sum", True),
    ((1,), 1, 1, False, 0.0, "mean", False),  # one class: every loss is 0
    ((3,), 8, 2, True, 0.0, "none", True),
    ((4, 3), 16, 5003, False, 0.2, "mean", True),  # two blocks of the Triton kernel
    ((), 16, 11, True, 0.0, "mean", False),  # unbatched: input (H,), target ()
]


def make_inputs(case, dtype, device, transposed=False):
    shape, H, V, has_bias, _, _, ignored = case
    generator = torch.Generator().manual_seed(H * V)
    input = torch.randn(*shape, H, generator=generator)
    weight = torch.randn(V, H, generator=generator) / H**0.5
    if transposed:  # both read through transposed views
        input = input.reshape(-1, H).t().contiguous().t().view(*shape, H)
        weight = weight.t().contiguous().t()
    bias = torch.randn(V, generator=generator) if has_bias else None
    target = torch.randint(0, V, shape, generator=generator)
    if ignored:
        target.view(-1)[::3] = -100
    to = dict(device=device, dtype=dtype)
    return input.to(**to), weight.to(**to), target.to(device), None if bias is None else bias.to(**to)


def loss_and_grads(fn, input, weight, target, bias, smoothing, reduction):
    leaves = [t.detach().requires_grad_() for t in (input, weight) + ((bias,) if bias is not None else ())]
    loss = fn(leaves[0], leaves[1], target, leaves[2] if bias is not None else None, smoothing, reduction)
    grad_loss = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    return (loss, *torch.autograd.grad(loss, leaves, grad_loss))


def genfast_fn(input, weight, target, bias, smoothing, reduction):
    return genfast.ops.linear_cross_entropy(input, weight, target, bias, reduction=reduction, label_smoothing=smoothing)


def reference_fn(input, weight, target, bias, smoothing, reduction):
    return reference.linear_cross_entropy(input, weight, target, bias, -100, reduction, smoothing)


def float64(tensors):
    return [None if t is None else t.double() if t.is_floating_point() else t for t in tensors]


@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one chunk", "chunks of 2 rows"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, backend, chunk_rows, monkeypatch):
    device = require(backend)
    if chunk_rows is not None:
        monkeypatch.setattr(op_module, "LOGITS_CHUNK_BYTES", chunk_rows * case[2] * dtype.itemsize)
    input, weight, target, bias = make_inputs(case, dtype, device)
    smoothing, reduction = case[4], case[5]
    with genfast.use_backend(backend):
        outputs = loss_and_grads(genfast_fn, input, weight, target, bias, smoothing, reduction)
    expected = loss_and_grads(reference_fn, *float64((input, weight, target, bias)), smoothing, reduction)
    torch_outputs = loss_and_grads(reference_fn, input, weight, target, bias, smoothing, reduction)
    assert outputs[0].shape == (target.shape if reduction == "none" else torch.Size())
    for name, out, ref, torch_out in zip(("loss", "input", "weight", "bias"), outputs, expected, torch_outputs):
        assert out.dtype == dtype, name
        if dtype in (torch.float32, torch.float64):
            assert relative_error(out, ref) <= DTYPES[dtype], name
        else:
            assert_close_to_reference(out, ref, torch_out, DTYPES[dtype], name)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_strided_input_and_weight(backend):
    device = require(backend)
    case = ((3, 4), 24, 70, True, 0.05, "mean", True)
    input, weight, target, bias = make_inputs(case, torch.float32, device, transposed=True)
    assert not input.is_contiguous() and not weight.is_contiguous()
    with genfast.use_backend(backend):
        outputs = loss_and_grads(genfast_fn, input, weight, target, bias, 0.05, "mean")
    expected = loss_and_grads(reference_fn, *float64((input, weight, target, bias)), 0.05, "mean")
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_gradients(backend):
    """Under no_grad the op computes the loss alone; int32 targets work as int64 ones."""
    device = require(backend)
    input, weight, target, bias = make_inputs(CASES[1], torch.float32, device)
    with genfast.use_backend(backend), torch.no_grad():
        loss = genfast.ops.linear_cross_entropy(input, weight, target.int(), bias, reduction="none")
    expected = F.cross_entropy(F.linear(input, weight, bias).flatten(0, 1), target.flatten(), reduction="none")
    assert relative_error(loss, expected.view(target.shape).double()) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_nan_as_torch(backend):
    device = require(backend)
    input, weight = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    target = torch.full((3,), -1, device=device)
    with genfast.use_backend(backend):
        loss = genfast.ops.linear_cross_entropy(input, weight, target, ignore_index=-1)
    assert loss.isnan() and F.cross_entropy(input @ weight.t(), target, ignore_index=-1).isnan()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_masked_logits(backend, smoothing):
    """Logits near 1e30 keep their loss (it is computed as gaps from the row's maximum), and a
    masked token's -inf logit leaves the loss finite without smoothing, inf with it, as torch's;
    also where the whole first block of the Triton kernel's row (4096 logits) is masked."""
    device = require(backend)
    V = 5000
    generator = torch.Generator().manual_seed(0)
    input = torch.tensor([[1e30], [1.0], [1.0]])
    weight = 1 + torch.rand(V, 1, generator=generator) * 1e-6
    bias = torch.randn(V, generator=generator)
    bias[[7, 4000]] = -math.inf
    bias = torch.stack([torch.zeros(V), bias, torch.where(torch.arange(V) < 4096, -math.inf, bias)])
    target = torch.tensor([3, 5, 4500])
    # Rows of different biases: the logits are x w + bias[row], so each row runs on its own.
    for row in range(3):
        x, t = input[row:row + 1].to(device), target[row:row + 1].to(device)
        w, b = weight.to(device), bias[row].to(device)
        with genfast.use_backend(backend):
            loss = genfast.ops.linear_cross_entropy(x, w, t, b, reduction="none", label_smoothing=smoothing)
        # From the float32 logits (one product each, rounded alike), computed in float64.
        expected = F.cross_entropy(F.linear(x, w, b).double(), t, reduction="none", label_smoothing=smoothing)
        if expected.isinf().any():
            assert torch.equal(loss.double(), expected), (row, loss, expected)
        else:
            assert relative_error(loss, expected) <= 1e-5, (row, loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_vocabulary_gives_zeros(backend):
    """With one token the loss and every gradient are 0, with smoothing too, even for an input of
    1e30: the gradient's terms cancel exactly, not to a rounding that the input multiplies."""
    device = require(backend)
    leaves = [torch.tensor(value, device=device, requires_grad=True) for value in ([[1e30]], [[0.77]], [1.54])]
    target = torch.zeros(1, dtype=torch.long, device=device)
    with genfast.use_backend(backend):
        loss = genfast.ops.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], label_smoothing=0.1)
    assert loss.item() == 0 and all(g.eq(0).all() for g in torch.autograd.grad(loss, leaves))


def test_compiles_without_graph_break():
    require("cpu")
    input, weight, target, bias = make_inputs(CASES[1], torch.float32, "cpu")
    compiled = torch.compile(genfast_fn, fullgraph=True, backend="aot_eager")
    with genfast.use_backend("cpu"):
        for reduction in ("mean", "none"):
            eager = loss_and_grads(genfast_fn, input, weight, target, bias, 0.1, reduction)
            traced = loss_and_grads(compiled, input, weight, target, bias, 0.1, reduction)
            for a, b in zip(eager, traced):
                torch.testing.assert_close(a, b)


BAD_INPUTS = [
    ("integer input", {"input": torch.ones(2, 4, dtype=torch.int64)}, TypeError, "input must have dtype"),
    ("head dims differ", {"weight": torch.randn(5, 3)}, ValueError, r"weight must have shape \(V > 0, 4\)"),
    ("no classes", {"weight": torch.randn(0, 4)}, ValueError, "weight must have shape"),
    ("weight of another dtype", {"weight": torch.randn(5, 4, dtype=torch.float64)}, TypeError, "weight must have"),
    ("bias of another size", {"bias": torch.randn(4)}, ValueError, r"bias must have shape \(5,\)"),
    ("float target", {"target": torch.zeros(2)}, TypeError, "target must have dtype"),
    ("target of another shape", {"target": torch.zeros(3, dtype=torch.int64)}, ValueError, "target must have shape"),
    ("target past the vocabulary", {"target": torch.tensor([0, 5])}, ValueError, r"class indices in \[0, 5\).*got 5"),
    ("negative target", {"target": torch.tensor([-3, 1])}, ValueError, "got -3"),
    ("unknown reduction", {"reduction": "average"}, ValueError, "reduction must be one of"),
    ("smoothing above one", {"label_smoothing": 1.5}, ValueError, "label_smoothing must lie in"),
]


@pytest.mark.parametrize("what, changes, error, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, changes, error, fragment):
    arguments = {"input": torch.randn(2, 4), "weight": torch.randn(5, 4), "target": torch.tensor([1, 4]), **changes}
    with pytest.raises(error, match=fragment):
        genfast.ops.linear_cross_entropy(**arguments)


def test_extension_checks_its_arguments():
    require("cpu")
    logits, target = torch.randn(2, 5), torch.tensor([1, 4])
    with pytest.raises(RuntimeError, match="not a class index"):
        extension().cross_entropy_rows(logits, torch.tensor([1, 5]), -100, 0.0, None)
    with pytest.raises(RuntimeError, match="target must be a contiguous int64"):
        extension().cross_entropy_rows(logits, target.int(), -100, 0.0, None)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        extension().cross_entropy_rows(logits.t(), torch.tensor([1, 1, 1, 1, 1]), -100, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_scale must be"):
        extension().cross_entropy_rows(logits, target, -100, 0.0, torch.ones(2, dtype=torch.float64))


def test_triton_kernel_guards_its_reads():
    """Under torch.compile the op skips its host check of targets; the Triton kernel then
    reads a target outside the vocabulary as class 0 and makes that row's loss and gradient NaN."""
    device = require("triton")
    from genfast.kernels.cross_entropy import cross_entropy_rows

    logits = torch.randn(3, 5, device=device)
    target = torch.tensor([1, 7, -100], device=device)
    loss = cross_entropy_rows(logits, target, -100, 0.0, torch.ones(3, device=device))
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0
    assert logits[0].isfinite().all() and logits[1].isnan().all() and (logits[2] == 0).all()
