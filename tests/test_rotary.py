"""genfast.ops.apply_rotary_pos_emb against the float64 reference."""

import pytest
import torch
from helpers import BACKENDS, assert_close_to_reference, assert_compiles_like_eager, interpreted, require

import genfast
from genfast.reference.rotary import apply_rotary_pos_emb as reference_rope

# dtype and the absolute term of the error rule (DESIGN.md's tolerance table).
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]

CONFIGS = [  # (B, H, H_k, S, D, R, table): R rotated dims; table "batched" (B, S, R), "shared" (S, R)
    (1, 1, 1, 1, 2, 2, "batched"),  # one position, one pair
    (2, 4, 2, 7, 16, 16, "batched"),  # GQA, odd S
    (3, 5, 5, 3, 64, 32, "shared"),  # partial rotary (GPT-NeoX), a shared (S, R) table
    (1, 3, 1, 13, 128, 128, "batched"),  # Llama's head size, one KV head
    (2, 2, 2, 5, 10, 6, "single"),  # D not a power of two, a (1, S, R) table
]


def angles(batch, positions, rotary, table, device):
    """A model's cos and sin: HF's layout, the frequencies repeated over both halves."""
    rows = 1 if table != "batched" else batch
    freqs = torch.randn(rows, positions, rotary // 2, device=device) * 3
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    return (cos[0], sin[0]) if table == "shared" else (cos, sin)


def make_qk(B, H, H_k, S, D, unsqueeze_dim, layout, dtype, device):
    def one(heads):
        if layout == "transposed":  # (B, S, H, D) memory seen as (B, H, S, D): what a model's view+transpose gives
            t = torch.randn(B, S, heads, D, device=device).to(dtype)
            return t.transpose(1, 2) if unsqueeze_dim == 1 else t.transpose(1, 2).contiguous().transpose(1, 2)
        shape = (B, heads, S, D) if unsqueeze_dim == 1 else (B, S, heads, D)
        return torch.randn(shape, device=device).to(dtype)

    return one(H), one(H_k)


def check(backend, config, dtype, atol, unsqueeze_dim=1, layout="contiguous"):
    device = require(backend)
    B, H, H_k, S, D, R, table = config
    q, k = make_qk(B, H, H_k, S, D, unsqueeze_dim, layout, dtype, device)
    cos, sin = angles(B, S, R, table, device)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k)]
        out = fn(*leaves, cos.to(cast), sin.to(cast), unsqueeze_dim=unsqueeze_dim)
        loss = (out[0] * dq.to(cast)).sum() + (out[1] * dk.to(cast)).sum()
        return out, torch.autograd.grad(loss, leaves)

    with genfast.use_backend(backend):
        outs, grads = run(genfast.ops.apply_rotary_pos_emb, dtype)
    refs, ref_grads = run(reference_rope, torch.float64)
    torch_outs, torch_grads = run(reference_rope, dtype)  # plain PyTorch in the same dtype
    for name, out, ref, torch_out in zip(("q", "k"), outs, refs, torch_outs):
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close_to_reference(out, ref, torch_out, atol, name)
    for name, grad, ref_grad, torch_grad in zip(("dq", "dk"), grads, ref_grads, torch_grads):
        assert_close_to_reference(grad, ref_grad, torch_grad, atol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference_fp32(backend, config, unsqueeze_dim):
    check(backend, config, torch.float32, 1e-5, unsqueeze_dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol", DTYPES, ids=str)
def test_dtypes(backend, dtype, atol):
    check(backend, CONFIGS[1], dtype, atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_transposed_layout(backend, unsqueeze_dim):
    check(backend, CONFIGS[2], torch.float32, 1e-5, unsqueeze_dim, layout="transposed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[2]], ids=str)
def test_in_place(backend, config):
    """inplace=True rotates q and k themselves (a partial rotary leaves the rest untouched)."""
    device = require(backend)
    B, H, H_k, S, D, R, table = config
    q, k = make_qk(B, H, H_k, S, D, 1, "transposed", torch.float32, device)
    cos, sin = angles(B, S, R, table, device)
    with genfast.use_backend(backend):
        expected = genfast.ops.apply_rotary_pos_emb(q, k, cos, sin)
        q_out, k_out = genfast.ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(k, expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradcheck(backend):
    """First and second order: the backward is the op itself, transposed."""
    device = require(backend)
    q = torch.randn(1, 2, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 1, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    cos, sin = (t.double() for t in angles(1, 3, 4, "batched", device))

    def rope(q, k):
        return genfast.ops.apply_rotary_pos_emb(q, k, cos, sin)

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(rope, (q, k), fast_mode=interpreted(backend))
        assert torch.autograd.gradgradcheck(rope, (q, k), fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_and_missing_gradients(backend):
    """The gradient of a sum is expanded (stride 0); an output left unused has none."""
    device = require(backend)
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, device=device, requires_grad=True)
    cos, sin = angles(1, 3, 8, "batched", device)
    with genfast.use_backend(backend):
        q_out, _k_out = genfast.ops.apply_rotary_pos_emb(q, k, cos, sin)
        q_out.sum().backward()
    ref_q = q.detach().requires_grad_()
    reference_rope(ref_q, k.detach(), cos, sin)[0].sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, rtol=1e-5, atol=1e-5)
    assert k.grad is None or not k.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    device = require(backend)
    q = torch.randn(2, 0, 3, 8, device=device, requires_grad=True)
    k = torch.randn(2, 1, 3, 8, device=device, requires_grad=True)
    cos, sin = angles(2, 3, 8, "batched", device)
    with genfast.use_backend(backend):
        q_out, k_out = genfast.ops.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.shape == q.shape


def _bad(q=(1, 2, 3, 8), k=(1, 2, 3, 8), table=(1, 3, 8), **kwargs):
    """Arguments of apply_rotary_pos_emb: shapes become random tensors, tensors stay."""
    def tensor(t):
        return t if isinstance(t, torch.Tensor) else torch.randn(t)

    return {"q": tensor(q), "k": tensor(k), "cos": tensor(table), "sin": tensor(table), **kwargs}


BAD_INPUTS = [  # (arguments, error type, words the message must contain)
    (_bad(q=(2, 3, 8)), ValueError, "q must have 4 dimensions"),
    (_bad(k=(1, 2, 4, 8)), ValueError, "k must match"),
    (_bad(table=(1, 3, 10)), ValueError, "even number"),
    (_bad(table=(1, 3, 5)), ValueError, "even number"),
    (_bad(table=(1, 4, 8)), ValueError, "cos must have shape"),
    (_bad(sin=torch.randn(1, 3, 6)), ValueError, "sin must have"),
    (_bad(q=torch.ones(1, 2, 3, 8, dtype=torch.int64)), TypeError, "q"),
    (_bad(k=torch.randn(1, 2, 3, 8, dtype=torch.float64)), TypeError, "k must have q's dtype"),
    (_bad(unsqueeze_dim=3), ValueError, "unsqueeze_dim"),
    (_bad(q=torch.randn(1, 2, 3, 8, requires_grad=True), inplace=True), ValueError, "may not require grad"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, error, words", BAD_INPUTS)
def test_bad_input(backend, kwargs, error, words):
    require(backend)
    with genfast.use_backend(backend), pytest.raises(error, match=words):
        genfast.ops.apply_rotary_pos_emb(**kwargs)


def test_extension_checks_its_arguments():
    ext = require("cpu") and genfast.backends.extension()
    x, table = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="cos"):
        ext.rotary_embedding(x, torch.randn(1, 3, 10), table, x.clone(), False)
    with pytest.raises(RuntimeError, match="out"):
        ext.rotary_embedding(x, table, table, torch.randn(1, 3, 2, 7), False)
    with pytest.raises(RuntimeError, match="overlap"):
        ext.rotary_embedding(x, table, table, torch.randn(1, 3, 1, 8).expand(1, 3, 2, 8), False)


class _Attention(torch.nn.Module):
    """Projections and RoPE, as a Llama attention layer starts (in place on the rotated copy)."""

    def __init__(self):
        super().__init__()
        self.qk = torch.nn.Linear(16, 32)

    def forward(self, x):
        q, k = self.qk(x).view(2, 5, 2, 2, 8).permute(3, 0, 2, 1, 4)  # (2, B, H, S, D) each
        freqs = torch.arange(5.0).outer(torch.ones(4)).repeat(1, 2)
        q, k = genfast.ops.apply_rotary_pos_emb(q, k, freqs.cos(), freqs.sin())
        return q * k


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_without_graph_break(compiler):
    assert_compiles_like_eager(_Attention(), torch.randn(2, 5, 16), compiler)
