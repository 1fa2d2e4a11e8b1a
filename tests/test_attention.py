"""genfast.ops.scaled_dot_product_attention against the float64 reference, and against
torch's own scaled_dot_product_attention in the same dtype (FlashAttention's error rule)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_reference, assert_compiles_like_eager, interpreted, relative_error, require

import genfast
from genfast.backends import extension
from genfast.reference import attention as reference
from genfast.reference.random import seed_from_torch

# The backends with attention kernels (no CUDA C++ one).
BACKENDS = ("reference", "cpu", "triton")

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

SHAPES = [  # (B, H, H_k, S_q, S_k, E, E_v)
    (1, 1, 1, 1, 1, 16, 16),  # one query, one key
    (2, 3, 3, 7, 7, 16, 16),  # odd S
    (2, 4, 2, 67, 67, 32, 32),  # GQA, a prime S over two tiles
    (1, 2, 2, 130, 65, 64, 64),  # more queries than keys
    (1, 2, 2, 65, 130, 64, 64),  # more keys than queries
    (1, 2, 1, 29, 29, 24, 40),  # E not a tile width, E_v != E, one KV head
    (1, 1, 1, 37, 37, 128, 128),
    (1, 1, 1, 17, 70, 256, 256),
]

EXTRAS = {  # name: keyword arguments beyond torch's (those a float mask cannot express come last)
    "window": {"window_size": (5, 3)},
    "window_left": {"window_size": (20, -1), "is_causal": True},
    "alibi": {"alibi_slopes": "per_head"},
    "alibi_batched": {"alibi_slopes": "per_batch"},
    "softcap": {"softcap": 3.0},
    "everything": {"window_size": (40, 10), "alibi_slopes": "per_head", "softcap": 5.0, "scale": 0.3},
}


def make_inputs(shape, dtype, device, layout="contiguous"):
    B, H, H_k, S_q, S_k, E, E_v = shape

    def one(heads, length, size):
        if layout == "transposed":  # a model's (B, S, H, D) projection seen as (B, H, S, D)
            return torch.randn(B, length, heads, size, device=device).transpose(1, 2).to(dtype)
        return torch.randn(B, heads, length, size, device=device).to(dtype)

    return one(H, S_q, E), one(H_k, S_k, E), one(H_k, S_k, E_v)


def resolve_extras(extras, shape, device):
    """EXTRAS' placeholders as tensors."""
    B, H = shape[0], shape[1]
    extras = dict(extras)
    if extras.get("alibi_slopes") == "per_head":
        extras["alibi_slopes"] = torch.rand(H, device=device)
    elif extras.get("alibi_slopes") == "per_batch":
        extras["alibi_slopes"] = torch.rand(B, H, device=device)
    return extras


def torch_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dropout_p=0.0, **extras):
    """PyTorch's own attention in the inputs' dtype: F.scaled_dot_product_attention, or for
    what it cannot express (genfast's extras, its dropout stream), the reference's formula
    run in that dtype."""
    if extras or dropout_p:
        s = reference.scores(q, k, attn_mask, is_causal, scale, enable_gqa, **extras)
        weights = torch.softmax(s, -1).masked_fill(s.isneginf().all(-1, keepdim=True), 0)
        if dropout_p:
            keep = reference.dropout_keep(seed_from_torch(), dropout_p, weights.shape, weights.device)
            weights = weights * keep * reference.dropout_scale(dropout_p)
        if enable_gqa:
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)


def check(backend, shape, dtype, atol, layout="contiguous", mask=None, **kwargs):
    """Output and the gradients of q, k, v (and of a float mask that requires one)."""
    device = require(backend)
    q, k, v = make_inputs(shape, dtype, device, layout)
    kwargs = resolve_extras(kwargs, shape, device)
    kwargs.setdefault("enable_gqa", shape[1] != shape[2])
    mask_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=device)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask.detach() if mask.dtype == torch.bool else mask.detach().to(cast)
        if mask_grad:
            m.requires_grad_()
            leaves.append(m)
        extras = {key: value.to(cast) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        # Each run draws the same dropout seed.
        torch.manual_seed(0)
        out = fn(*leaves[:3], attn_mask=m, **extras)
        return out, torch.autograd.grad((out * dout.to(cast)).sum(), leaves)

    with genfast.use_backend(backend):
        out, grads = run(genfast.ops.scaled_dot_product_attention, dtype)
    ref, ref_grads = run(reference.scaled_dot_product_attention, torch.float64)
    torch_out, torch_grads = run(torch_attention, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_reference(out, ref, torch_out, atol, "out")
    for name, grad, ref_grad, torch_grad in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, torch_grads):
        assert grad.shape == ref_grad.shape
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_fp32(backend, shape, is_causal):
    check(backend, shape, torch.float32, 1e-5, is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_dtypes(backend, dtype, atol, is_causal):
    check(backend, SHAPES[2], dtype, atol, is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_layout(backend):
    """q, k, v as views of (B, S, H, D) projections, read in place."""
    check(backend, SHAPES[3], torch.float32, 1e-5, layout="transposed", is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "float_grad"])
@pytest.mark.parametrize("mask_shape", ["full", "broadcast"])
def test_masks(backend, kind, mask_shape):
    B, H, _, S_q, S_k, _, _ = shape = SHAPES[3]
    size = (B, H, S_q, S_k) if mask_shape == "full" else (1, H, 1, S_k)
    if kind == "bool":
        mask = torch.rand(size) > 0.3
    else:
        mask = torch.randn(size).requires_grad_(kind == "float_grad")
    check(backend, shape, torch.float32, 1e-5, mask=mask.to(require(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", EXTRAS, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5]], ids=str)
def test_extras(backend, name, shape):
    """Sliding window, ALiBi and softcap, alone and together."""
    check(backend, shape, torch.float32, 1e-5, **EXTRAS[name])


BANDS = [  # windows whose edges cross many tiles, so that kernels mask only the tiles on an edge
    {"window_size": (70, 3)},
    {"window_size": (5, 150)},
    {"window_size": (-1, 40)},
    {"window_size": (100, -1), "is_causal": True},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", [DTYPES[0], DTYPES[2]], ids=str)
@pytest.mark.parametrize("band", BANDS, ids=str)
def test_windows_across_tiles(backend, dtype, atol, band):
    check(backend, (1, 2, 1, 300, 270, 32, 32), dtype, atol, **band)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES[2:], ids=str)
def test_extras_low_precision(backend, dtype, atol):
    check(backend, SHAPES[2], dtype, atol, **EXTRAS["everything"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero(backend):
    """A query every key is masked from gets zeros and no gradient, as in torch."""
    device = require(backend)
    q, k, v = (t.requires_grad_() for t in make_inputs(SHAPES[2], torch.float32, device))
    mask = torch.rand(q.shape[2], k.shape[2], device=device) > 0.5
    mask[3] = False
    with genfast.use_backend(backend):
        out = genfast.ops.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
        out.sum().backward()
    assert out[:, :, 3].eq(0).all() and q.grad[:, :, 3].eq(0).all()
    assert out.isfinite().all() and k.grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    device = require(backend)
    q, k, v = make_inputs(SHAPES[1], torch.float32, device)
    q[0, 0, 2, 0] = math.nan
    with genfast.use_backend(backend):
        out = genfast.ops.scaled_dot_product_attention(q, k, v)
    assert out[0, 0, 2].isnan().all() and out[1].isfinite().all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    """Every input that has a gradient, in float64: q, k, v and an additive mask, with ALiBi and
    a softcap in the chain."""
    device = require(backend)
    q, k, v = (t.double().requires_grad_() for t in make_inputs((1, 2, 1, 5, 7, 6, 4), torch.float64, device))
    mask = torch.randn(1, 1, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    slopes = torch.rand(2, dtype=torch.float64, device=device)

    def attention(q, k, v, mask):
        return genfast.ops.scaled_dot_product_attention(
            q, k, v, mask, enable_gqa=True, window_size=(3, 2), alibi_slopes=slopes, softcap=2.0
        )

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(attention, (q, k, v, mask), fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_beyond_four_dimensions(backend):
    """Any leading dimensions, as torch: (S, E) and (N, A, H, S, E)."""
    device = require(backend)
    for shape in ((9, 16), (2, 3, 4, 9, 16)):
        q, k, v = (torch.randn(shape, device=device) for _ in range(3))
        with genfast.use_backend(backend):
            out = genfast.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_no_key_past_the_end(backend):
    """A window that leaves the last block of queries no key (S_q > S_k) reads no key or value
    row past the end: those rows hold NaN here, which any read would carry into the results."""
    device = require(backend)
    q = torch.randn(1, 2, 130, 64, device=device, requires_grad=True)
    k, v = (torch.full((1, 2, 200, 64), math.nan, device=device) for _ in range(2))
    k[:, :, :65], v[:, :, :65] = torch.randn(2, 1, 2, 65, 64, device=device)
    k, v = (t[:, :, :65].requires_grad_() for t in (k, v))
    with genfast.use_backend(backend):
        out = genfast.ops.scaled_dot_product_attention(q, k, v, window_size=(30, 2))
    expected = reference.scaled_dot_product_attention(q, k, v, window_size=(30, 2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert not any(g.isnan().any() for g in grads)



@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_value_stays_out_of_fully_masked_rows(backend):
    """Queries that a boolean mask hides from every key get gradient 0, as the reference's, even
    with a NaN in some value: their pairs get dS 0, not 0 * NaN."""
    device = require(backend)
    q, k, v = make_inputs(SHAPES[2], torch.float32, device)
    mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=device)
    mask[:40] = False
    v[:, :, 5, 0] = math.nan
    outputs = []
    for which in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with genfast.use_backend(which):
            out = genfast.ops.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=True)
        outputs.append([out, *torch.autograd.grad(out[:, :, :40].sum(), leaves)])
    assert outputs[1][1][:, :, :40].eq(0).all()
    for got, want in zip(*outputs):
        assert torch.equal(got.isnan(), want.isnan())
        assert relative_error(got[want.isfinite()], want[want.isfinite()]) <= 1e-4


HUGE = {  # what gets a score near +-1e30, and the extras it needs
    "query": {},  # the query's row: one weight 1, the rest 0
    "key": {},  # the key: weight 1 for every query it wins, 0 for the others
    # Each query masked from its own key: its two neighbours' scores, -1e30 + O(1), round to one
    # value, and share the weight; a log-sum-exp would round their sum away.
    "alibi_slopes": {"attn_mask": "off_diagonal"},
    # Every score huge, each a sum of many products: the backward must round them as the forward
    # did, in the same order (one huge term, as above, would hide any order).
    "every_query": {"is_causal": True},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES[:3], ids=str)  # float16 has no 1e30: it would be inf
@pytest.mark.parametrize("huge", HUGE)
def test_huge_scores(backend, dtype, atol, huge):
    """Scores near 1e30 give the reference's weights and gradients: the backward recomputes the
    forward's scores exactly and its weights from the row's maximum and sum kept apart, and a
    weight of 1 gets dS 0 rather than the 1e23 that a rounding of dP - delta times a huge
    query or key would give."""
    device = require(backend)
    shape = (1, 2, 1, 37, 37, 24, 8)  # a head size of one and a half vectors
    q, k, v = make_inputs(shape, torch.float64, device)
    kwargs = {"enable_gqa": True, **HUGE[huge]}
    if huge == "query":
        q[0, 1, 5, 3] = 1e30
    elif huge == "key":
        k[0, 0, 7, 2] = -1e30
    elif huge == "every_query":
        q *= 1e28
    else:
        kwargs["alibi_slopes"] = torch.full((2,), 1e30, dtype=torch.float64, device=device)
        kwargs["attn_mask"] = ~torch.eye(37, dtype=torch.bool, device=device)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=device)

    def run(fn, cast):
        leaves = [t.to(cast).requires_grad_() for t in (q, k, v)]
        extras = {key: value.to(cast) if value.is_floating_point() else value for key, value in kwargs.items()
                  if isinstance(value, torch.Tensor)}
        out = fn(*leaves, **{**kwargs, **extras})
        return [out, *torch.autograd.grad((out * dout.to(cast)).sum(), leaves)]

    with genfast.use_backend(backend):
        got = run(genfast.ops.scaled_dot_product_attention, dtype)
    # The reference in float32 sets the bound: torch's own CPU attention gives NaN for dq here.
    want = run(reference.scaled_dot_product_attention, torch.float64)
    same_dtype = run(reference.scaled_dot_product_attention, dtype)
    for name, g, w, t in zip(("out", "dq", "dk", "dv"), got, want, same_dtype):
        assert w.isfinite().all() and g.isfinite().all(), name
        assert_close_to_reference(g, w, t, atol, name)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_infinite_key_under_a_softcap(backend):
    """A key with an infinite component scores +-inf, which the softcap turns into +-c: the
    output and dv stay finite, as the reference's, and dk too (dq takes inf times a zero
    gradient: NaN in both). A query's zero component scores NaN against that key, a pair
    causality masks: the reference's chain rule then gives the pair 0 * NaN in dk and dq,
    genfast's a zero dS that stays 0. In Triton's backward the zero rows that pad the last tile of queries
    score NaN likewise, which must not reach dk and dv, sums over queries."""
    device = require(backend)
    q, k, v = make_inputs((1, 1, 1, 37, 37, 4, 4), torch.float32, device)
    k[0, 0, 2, 0] = math.inf
    q[0, 0, 1, 0] = 0.0
    outputs = []
    for which in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with genfast.use_backend(which):
            out = genfast.ops.scaled_dot_product_attention(*leaves, is_causal=True, softcap=5.0)
        outputs.append([out, *torch.autograd.grad(out.sum(), leaves)])
    (out, dq, dk, dv), (want_out, want_dq, want_dk, want_dv) = outputs
    assert out.isfinite().all() and want_out.isfinite().all() and dv.isfinite().all() and want_dv.isfinite().all()
    assert dk.isfinite().all() and not want_dk[0, 0, 2].isfinite().all()
    assert not (~dq.isfinite() & want_dq.isfinite()).any()
    for got, want in ((out, want_out), (dq, want_dq), (dk, want_dk), (dv, want_dv)):
        assert relative_error(got[want.isfinite()], want[want.isfinite()]) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finfo_min_mask(backend):
    """Hugging Face masks with torch.finfo(dtype).min. In base 2 (the C++ kernels' scores) that
    term would overflow to -inf; it stays finite, so a row it masks whole averages the values,
    as the reference and torch do, instead of coming out 0."""
    mask = torch.zeros(67, 67)
    mask[:, 50:] = mask[3] = torch.finfo(torch.float32).min
    check(backend, SHAPES[2], torch.float32, 1e-5, mask=mask.to(require(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    q, k, v = (torch.randn(2, 3, 0, 16, device=device) for _ in range(3))
    with genfast.use_backend(backend):
        assert genfast.ops.scaled_dot_product_attention(q, k, v).shape == (2, 3, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[5]], ids=str)
def test_dropout(backend, shape, is_causal):
    """The kernels drop the weights the reference drops for the same torch seed, forward and
    backward (a weight dropped in one and kept in the other would be far off)."""
    check(backend, shape, torch.float32, 1e-5, is_causal=is_causal, dropout_p=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_dropout_dtypes(backend, dtype, atol):
    check(backend, SHAPES[3], dtype, atol, dropout_p=0.1, window_size=(30, 2), alibi_slopes="per_head")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_mask_gradient(backend):
    mask = torch.randn(1, 2, 1, 130).requires_grad_()
    check(backend, SHAPES[4], torch.float32, 1e-5, mask=mask.to(require(backend)), dropout_p=0.5)


def test_dropout_keep_statistics():
    """dropout_keep keeps each weight with probability 1 - p (within 5 standard errors), a
    fresh pattern per seed, head and row, and the same one for the same seed."""
    shape = (2, 3, 50, 101)
    for p in (0.1, 0.5, 0.9):
        keep = reference.dropout_keep(7, p, shape)
        error = 5 * math.sqrt(p * (1 - p) / keep.numel())
        assert abs(keep.float().mean().item() - (1 - p)) < error
        assert torch.equal(keep, reference.dropout_keep(7, p, shape))
        assert not torch.equal(keep, reference.dropout_keep(8, p, shape))
        assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert reference.dropout_scale(0.5) == 2.0


BAD_INPUTS = [  # (what, changes to the arguments, error type, message fragment)
    ("integer query", {"query": lambda a: a["query"].long()}, TypeError, "query must have dtype"),
    ("mixed dtypes", {"key": lambda a: a["key"].double()}, TypeError, "one dtype"),
    ("head sizes", {"key": lambda a: a["key"][..., :8]}, ValueError, "head size"),
    ("value length", {"value": lambda a: a["value"][:, :, :3]}, ValueError, "value"),
    ("gqa off", {"key": lambda a: a["key"][:, :2], "value": lambda a: a["value"][:, :2]}, ValueError, "enable_gqa"),
    ("mask shape", {"attn_mask": lambda a: torch.ones(5, 3, dtype=torch.bool)}, ValueError, "broadcast"),
    ("mask dtype", {"attn_mask": lambda a: torch.ones(7, 7, dtype=torch.int32)}, TypeError, "attn_mask"),
    ("mask and causal", {"attn_mask": lambda a: torch.ones(7, 7, dtype=torch.bool), "is_causal": lambda a: True},
     ValueError, "is_causal"),
    ("dropout", {"dropout_p": lambda a: 1.5}, ValueError, "dropout_p"),
    ("window", {"window_size": lambda a: (3, -2)}, ValueError, "window_size"),
    ("softcap", {"softcap": lambda a: -1.0}, ValueError, "softcap"),
    ("alibi", {"alibi_slopes": lambda a: torch.ones(5)}, ValueError, "alibi_slopes"),
]


@pytest.mark.parametrize("what, changes, error, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, changes, error, fragment):
    q, k, v = make_inputs(SHAPES[1], torch.float32, "cpu")
    args = {"query": q, "key": k, "value": v}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=fragment):
        genfast.ops.scaled_dot_product_attention(**args)


def test_extension_checks_its_arguments():
    """torch.ops-level callers get TORCH_CHECK errors, not out-of-bounds reads."""
    require("cpu")
    q, k, v = make_inputs(SHAPES[2], torch.float32, "cpu")
    ext = extension()
    with pytest.raises(RuntimeError, match="heads must divide"):
        ext.attention_forward(
            q, torch.randn(2, 3, 67, 32), torch.randn(2, 3, 67, 32), None, None, 1.0, 0.0, -1, -1, 0.0, 0
        )
    with pytest.raises(RuntimeError, match="attn_mask must be expanded"):
        ext.attention_forward(q, k, v, torch.ones(67, 67, dtype=torch.bool), None, 1.0, 0.0, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ext.attention_forward(q.transpose(2, 3), k, v, None, None, 1.0, 0.0, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        ext.attention_forward(q, k, v, None, None, 1.0, 0.0, -1, -1, 1.0, 0)


class _CausalSelfAttention(torch.nn.Module):
    def __init__(self, dropout_p=0.0):
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, x):
        q, k, v = x.chunk(3, dim=-1)
        return genfast.ops.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=True)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles(compiler):
    assert_compiles_like_eager(_CausalSelfAttention(), torch.randn(2, 2, 19, 48), compiler)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_dropout_compiles(compiler):
    """Compiled, the dropout seed is drawn inside the graph: with inductor leaving random ops
    to torch (fallback_random), one torch seed drops the same weights as in eager."""
    require("cpu")
    module = _CausalSelfAttention(dropout_p=0.25)
    x = torch.randn(2, 2, 19, 48)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    with torch._inductor.config.patch(fallback_random=True), genfast.use_backend("cpu"):
        torch.manual_seed(3)
        out = compiled(x)
        torch.manual_seed(3)
        expected = module(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


MHA_CONFIGS = [  # (constructor keyword arguments, self-attention)
    ({"batch_first": True}, True),
    ({"batch_first": False}, True),
    ({"batch_first": True, "bias": False}, False),
    ({"batch_first": True, "kdim": 12, "vdim": 20}, False),
]


def _mha_pair(kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(24, 4, **kwargs)
    ours = genfast.nn.MultiheadAttention(24, 4, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _mha_inputs(kwargs, self_attention, batch=3, queries=11, keys=11):
    def one(length, size):
        shape = (batch, length, size) if kwargs.get("batch_first") else (length, batch, size)
        return torch.randn(shape, requires_grad=True)

    query = one(queries, 24)
    if self_attention:
        return query, query, query
    return query, one(keys, kwargs.get("kdim", 24)), one(keys, kwargs.get("vdim", 24))


MHA_MASKS = {  # name: (key_padding_mask, attn_mask, is_causal) for batch 3, 11 queries, 11 keys
    "none": lambda: (None, None, False),
    "padding": lambda: (torch.arange(11).expand(3, 11) >= torch.tensor([[11], [7], [3]]), None, False),
    "bool mask": lambda: (None, torch.rand(11, 11) > 0.7, False),
    "float mask per head": lambda: (None, torch.randn(3 * 4, 11, 11), False),
    "causal hint": lambda: (None, torch.ones(11, 11, dtype=torch.bool).triu(1), True),
    "causal hint with padding": lambda: (
        torch.arange(11).expand(3, 11) >= torch.tensor([[11], [7], [3]]),
        torch.ones(11, 11, dtype=torch.bool).triu(1),
        True,
    ),
}


@pytest.mark.parametrize("config", MHA_CONFIGS, ids=str)
@pytest.mark.parametrize("masks", MHA_MASKS, ids=str)
def test_multihead_attention_matches_torch(config, masks):
    """Outputs and every gradient equal torch's module's, from the same state_dict."""
    kwargs, self_attention = config
    theirs, ours = _mha_pair(kwargs)
    inputs = _mha_inputs(kwargs, self_attention)
    key_padding_mask, attn_mask, is_causal = MHA_MASKS[masks]()
    results = []
    for module in (theirs, ours):
        out, weights = module(*inputs, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
                              is_causal=is_causal)
        assert weights is None
        leaves = [*dict.fromkeys(inputs), *module.parameters()]
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    (expected, expected_grads), (out, grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_multihead_attention_unbatched_and_weights():
    theirs, ours = _mha_pair({})
    x = torch.randn(7, 24)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)
    out, weights = ours(x, x, x)  # need_weights=True: torch's path, which returns the weights
    expected, expected_weights = theirs(x, x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


def test_multihead_attention_causal_hint_needs_a_mask():
    _, ours = _mha_pair({"batch_first": True})
    x = torch.randn(2, 5, 24)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, need_weights=False, is_causal=True)


def test_optimize_swaps_multihead_attention():
    layer = torch.nn.TransformerEncoderLayer(24, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 9, 24)
    expected = layer(x)
    swapped = genfast.optimize(layer)
    assert swapped["self_attn"] is torch.nn.MultiheadAttention and type(layer.self_attn) is genfast.nn.MultiheadAttention
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


DECODE_BACKENDS = ("reference", "cpu", "triton")

DECODE_CASES = [  # (B, H, H_k, S_q, E, S_max, block_size or None for a contiguous cache, extras)
    (3, 8, 2, 1, 64, 300, None, {}),
    (3, 8, 2, 1, 64, 300, 16, {}),
    (2, 4, 4, 4, 32, 97, None, {"is_causal": True}),
    (2, 6, 3, 3, 24, 530, 32, {"is_causal": True, "window_size": (50, -1), "softcap": 5.0, "alibi_slopes": "per_head"}),
    (1, 2, 1, 1, 128, 1100, 256, {"window_size": (300, 0)}),
]


def _decode_inputs(case, dtype, device):
    B, H, H_k, S_q, E, S_max, block_size, extras = case
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    q = randn(B, H, S_q, E)
    if block_size is None:
        k_cache, v_cache, table = randn(B, H_k, S_max, E), randn(B, H_k, S_max, E), None
    else:
        blocks = -(-S_max // block_size)
        k_cache, v_cache = randn(B * blocks + 2, H_k, block_size, E), randn(B * blocks + 2, H_k, block_size, E)
        table = torch.randperm(B * blocks + 2, generator=generator)[: B * blocks].view(B, blocks).int().to(device)
    lengths = torch.randint(1, S_max - S_q + 1, (B,), generator=generator)
    lengths[0] = S_max - S_q  # one element fills its cache
    k, v = randn(B, H_k, S_q, E), randn(B, H_k, S_q, E)
    return q, k_cache, v_cache, k, v, lengths.to(device), table, resolve_extras(extras, (B, H), device)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_decode_matches_reference(backend, case, dtype, atol):
    """Appending k and v, then attending over the cache: output and the updated caches."""
    device = require(backend)
    q, k_cache, v_cache, k, v, lengths, table, extras = _decode_inputs(case, dtype, device)

    def run(fn, cast):
        caches = (k_cache.to(cast), v_cache.to(cast))
        extras_cast = {key: val.to(cast) if isinstance(val, torch.Tensor) else val for key, val in extras.items()}
        out = fn(q.to(cast), *caches, k.to(cast), v.to(cast), lengths, block_table=table, **extras_cast)
        return out, caches

    with genfast.use_backend(backend):
        out, caches = run(genfast.ops.attention_with_kv_cache, dtype)
    ref, ref_caches = run(reference.attention_with_kv_cache, torch.float64)
    torch_out, _ = run(reference.attention_with_kv_cache, dtype)  # PyTorch's math in the same dtype
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to_reference(out, ref, torch_out, atol, "out")
    for cache, ref_cache in zip(caches, ref_caches):
        torch.testing.assert_close(cache, ref_cache.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
def test_decode_without_appending_equals_attention(backend):
    """A full cache and no new keys: the last S_q queries' causal attention over all of it."""
    device = require(backend)
    q, k_cache, v_cache = (torch.randn(2, 4, n, 32, device=device) for n in (5, 70, 70))
    with genfast.use_backend(backend):
        out = genfast.ops.attention_with_kv_cache(q, k_cache, v_cache, is_causal=True)
    full_q = torch.cat((torch.randn(2, 4, 65, 32, device=device), q), dim=2)
    expected = F.scaled_dot_product_attention(full_q, k_cache, v_cache, is_causal=True)[:, :, -5:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


DECODE_BAD_INPUTS = [  # (what, changes, error type, message fragment)
    ("lengths past the cache", {"cache_seqlens": lambda a: torch.tensor([300, 3])}, ValueError, "cache_seqlens"),
    ("k without v", {"v": lambda a: None}, ValueError, "both k and v"),
    ("k shape", {"k": lambda a: a["k"][:, :, :, :16]}, ValueError, "k must have shape"),
    ("heads", {"k_cache": lambda a: torch.randn(2, 3, 300, 32), "v_cache": lambda a: torch.randn(2, 3, 300, 32),
               "k": lambda a: None, "v": lambda a: None}, ValueError, "heads must divide"),
    ("cache dtype", {"v_cache": lambda a: a["v_cache"].double()}, ValueError, "v_cache"),
    ("lengths dtype", {"cache_seqlens": lambda a: a["cache_seqlens"].float()}, TypeError, "cache_seqlens"),
    ("block table shape", {"block_table": lambda a: torch.zeros(3, 4, dtype=torch.int32)}, ValueError, "block_table"),
]


@pytest.mark.parametrize("what, changes, error, fragment", DECODE_BAD_INPUTS, ids=[b[0] for b in DECODE_BAD_INPUTS])
def test_decode_bad_input(what, changes, error, fragment):
    q, k_cache, v_cache, k, v, lengths, _, _ = _decode_inputs((2, 4, 2, 1, 32, 300, None, {}), torch.float32, "cpu")
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": lengths}
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=fragment):
        genfast.ops.attention_with_kv_cache(**args)


def test_decode_extension_checks_block_table():
    """An out-of-range block index is refused before any read."""
    require("cpu")
    q, k_cache, v_cache = torch.randn(1, 2, 1, 16), torch.randn(4, 2, 16, 16), torch.randn(4, 2, 16, 16)
    with pytest.raises(RuntimeError, match="block_table entries"):
        extension().attention_decode(q, k_cache, v_cache, torch.tensor([20]), torch.tensor([[0, 9]]), None,
                                     1.0, 0.0, -1, -1)
