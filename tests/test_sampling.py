"""genfast.ops.sample_tokens against the reference (genfast/reference/sampling.py): the same
token for the same uniform number, on every backend and dtype."""

import pytest
import torch
from helpers import interpreted, require, safe_uniform

import genfast
from genfast.backends import extension
from genfast.reference import sampling as reference

BACKENDS = ("reference", "cpu", "triton")
KERNELS = ("cpu", "triton")  # the backends whose draws are compared with the reference's
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

CASES = [  # (rows, V, temperature, top_k, top_p)
    (8, 1000, 0.7, 50, 0.9),
    (5, 37, 1.3, 0, 0.5),  # top-p alone, a prime vocabulary
    (3, 1, 1.0, 0, 1.0),  # one token
    (4, 257, 1.0, 0, 1.0),  # plain softmax sampling
    (6, 300, 2.0, 7, 1.0),  # top-k alone
    (4, 300, 1.0, 500, 0.3),  # top_k beyond V
    (2, 5003, 0.8, 100, 0.95),  # more than one block of the Triton kernel
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    device = require(backend)
    rows, V, temperature, top_k, top_p = case
    logits = (3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(V))).to(device, dtype)
    u = safe_uniform(logits, temperature, top_k, top_p, seed=rows)
    with genfast.use_backend(backend):
        tokens = genfast.ops.sample_tokens(logits, temperature, top_k, top_p, uniform=u)
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    assert torch.equal(tokens.cpu(), reference.sample(logits, temperature, top_k, top_p, u).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_a_threshold_stay(backend):
    """top_k=2 over three equal largest logits keeps all three: u=0.9 draws the third."""
    device = require(backend)
    logits = torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0]], device=device)
    with genfast.use_backend(backend):
        for top_k, top_p in ((2, 1.0), (0, 0.5)):
            token = genfast.ops.sample_tokens(logits, 1.0, top_k, top_p, uniform=torch.tensor([0.9], device=device))
            assert token.item() == 2


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("top_k, top_p", [(0, 0.3), (0, 0.75), (40, 0.6), (3, 1.0)], ids=str)
def test_logits_with_many_ties(backend, top_k, top_p):
    """Logits of five distinct values: thresholds land inside tie groups."""
    device = require(backend)
    logits = torch.randint(0, 5, (16, 200), generator=torch.Generator().manual_seed(7)).float().to(device)
    u = safe_uniform(logits, 1.0, top_k, top_p, seed=8)
    with genfast.use_backend(backend):
        tokens = genfast.ops.sample_tokens(logits, 1.0, top_k, top_p, uniform=u)
    assert torch.equal(tokens.cpu(), reference.sample(logits, 1.0, top_k, top_p, u).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_follow_the_distribution(backend):
    """Draws with a generator: each kept token's frequency within 4.5 standard deviations
    of its probability, and the tokens top-k and top-p drop never drawn."""
    device = require(backend)
    if interpreted(backend):
        pytest.skip("20000 programs take minutes in Triton's interpreter; test_matches_reference checks its draws")
    draws = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0], device=device).expand(draws, 7)
    generator = torch.Generator(device).manual_seed(0)
    with genfast.use_backend(backend):
        tokens = genfast.ops.sample_tokens(logits, 0.9, 5, 0.8, generator=generator)
    keep = reference.kept_tokens(logits[:1], 0.9, 5, 0.8)[0].cpu()
    probabilities = torch.where(keep, torch.softmax(logits[0].double().cpu() / 0.9, -1), 0.0)
    probabilities /= probabilities.sum()
    frequencies = torch.bincount(tokens.cpu(), minlength=7).double() / tokens.numel()
    assert keep.sum() == 3
    assert (frequencies[~keep] == 0).all()
    assert (frequencies - probabilities).abs().max() < 4.5 * (0.25 / draws) ** 0.5


@pytest.mark.parametrize("backend", KERNELS)
def test_leading_dimensions_and_strides(backend):
    """(B, S, V) logits sliced along V's neighbour: one token per (b, s)."""
    device = require(backend)
    logits = torch.randn(2, 9, 50, device=device)[:, ::2]
    u = safe_uniform(logits, 1.0, 10, 0.9, seed=3)
    with genfast.use_backend(backend):
        tokens = genfast.ops.sample_tokens(logits, 1.0, 10, 0.9, uniform=u)
    assert tokens.shape == (2, 5)
    assert torch.equal(tokens.cpu(), reference.sample(logits, 1.0, 10, 0.9, u).cpu())


BAD_INPUTS = [
    ("integer logits", {"logits": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "logits must have dtype"),
    ("no tokens", {"logits": torch.ones(2, 0)}, ValueError, "at least one token"),
    ("zero temperature", {"temperature": 0.0}, ValueError, "temperature must be positive"),
    ("top_p zero", {"top_p": 0.0}, ValueError, "top_p must lie in"),
    ("top_p above one", {"top_p": 1.5}, ValueError, "top_p must lie in"),
    ("negative top_k", {"top_k": -1}, ValueError, "top_k must be >= 0"),
    ("float top_k", {"top_k": 2.5}, TypeError, "top_k must be an int"),
    ("uniform of another shape", {"uniform": torch.rand(3)}, ValueError, "uniform must have shape"),
]


@pytest.mark.parametrize("what, changes, error, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, changes, error, fragment):
    arguments = {"logits": torch.randn(2, 5), **changes}
    with pytest.raises(error, match=fragment):
        genfast.ops.sample_tokens(**arguments)


def test_extension_checks_its_arguments():
    require("cpu")
    logits, uniform = torch.randn(2, 5), torch.rand(2)
    with pytest.raises(RuntimeError, match="uniform must be"):
        extension().sample(logits, uniform.double(), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        extension().sample(logits.t(), torch.rand(5), 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="temperature > 0"):
        extension().sample(logits, uniform, 0.0, 0, 1.0)


def test_compiles_without_graph_break():
    require("cpu")
    logits, u = torch.randn(4, 100), torch.rand(4)
    compiled = torch.compile(genfast.ops.sample_tokens, fullgraph=True, backend="aot_eager")
    with genfast.use_backend("cpu"):
        assert torch.equal(compiled(logits, 0.8, 20, 0.9, uniform=u), genfast.ops.sample_tokens(logits, 0.8, 20, 0.9, uniform=u))
