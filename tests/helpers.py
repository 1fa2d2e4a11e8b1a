"""What the op tests share: where each backend runs, and the error rule."""

import pytest
import torch

import genfast
from genfast.backends import unavailable_reason
from genfast.reference import sampling

# The backends every op has a kernel for; a family with CUDA kernels too (GroupNorm, the
# recurrences) adds "cuda" in its tests. An explicit backend without a kernel for the op is an
# error by design, not a case to test each op for.
BACKENDS = ("reference", "cpu", "triton")


def device_for(backend: str) -> str:
    """The device a backend is tested on: CUDA when there is one, except for cpu."""
    return "cuda" if backend != "cpu" and torch.cuda.is_available() else "cpu"


def require(backend: str) -> str:
    """Skip the test when ``backend`` cannot run here; return its test device."""
    device = device_for(backend)
    if reason := unavailable_reason(backend, device):
        pytest.skip(reason)
    return device


def check_bad_input(backend: str, call, error: type[Exception], words: str) -> None:
    """call() on backend raises error with words in its message (the public ops check their
    arguments before any kernel runs, whichever backend is selected)."""
    require(backend)
    with genfast.use_backend(backend), pytest.raises(error, match=words):
        call()


def interpreted(backend: str) -> bool:
    """Whether backend runs in Triton's interpreter here, a few hundred times slower than
    compiled code: gradcheck then takes its fast mode (random projections of the Jacobian,
    one backward instead of one per output element) to stay within CI's time."""
    return backend == "triton" and device_for(backend) == "cpu"


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(1, max |ref|), the error measure of DESIGN.md."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return (out.double() - ref).abs().max().item() / scale if ref.numel() else 0.0


def assert_close_to_reference(out, ref64, torch_out, atol: float, what: str) -> None:
    """FlashAttention's rule: genfast's error against the float64 reference is at
    most twice that of PyTorch's own op in the same dtype, plus ``atol``."""
    error = relative_error(out, ref64)
    bound = 2 * relative_error(torch_out, ref64) + atol
    assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g}"



def assert_like_torch_build(names, got, want, ref, atol: float = 1e-5) -> None:
    """The architectures' rule: each tensor of the genfast build (got) is within twice the error
    of the torch.nn build in fp32 (want) against the float64 build (ref), plus ``atol``."""
    for name, g, w, r in zip(names, got, want, ref, strict=True):
        assert relative_error(g, r) <= 2 * relative_error(w, r) + atol, name


def twin_models(build):
    """(torch.nn build, genfast build) of one architecture with the same weights: build(fused)
    makes a model, the torch.nn one first from seed 0."""
    torch.manual_seed(0)
    reference = build(False)
    fused = build(True)
    fused.load_state_dict(reference.state_dict())
    assert reference.state_dict().keys() == fused.state_dict().keys()
    return reference, fused


def assert_compiles_like_eager(module: torch.nn.Module, x: torch.Tensor, compiler: str) -> None:
    """torch.compile(fullgraph=True) of a module holding genfast layers (no graph break) gives
    eager's output and input gradient, on the cpu backend."""
    require("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    x = x.detach().requires_grad_()
    with genfast.use_backend("cpu"):
        out = compiled(x)
        out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    with genfast.use_backend("cpu"):
        expected = module(x)
        expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-4)


def safe_uniform(logits, temperature, top_k, top_p, seed):
    """Uniform numbers at least 1e-5 from every cumulative probability of their row, where
    rounding could tip the draw to a neighbouring token between backends."""
    x = logits.double()
    keep = sampling.kept_tokens(logits, temperature, top_k, top_p)
    weights = torch.where(keep, torch.exp((x - x.amax(-1, keepdim=True)) / temperature), 0.0)
    cumulative = weights.cumsum(-1) / weights.sum(-1, keepdim=True)
    u = torch.rand(logits.shape[:-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(100):
        near = ((cumulative - u.to(logits.device).unsqueeze(-1)).abs() < 1e-5).any(-1).cpu()
        if not near.any():
            return u.float().to(logits.device)
        u = torch.where(near, (u + 3e-5) % 1, u)
    raise AssertionError("no safe uniform numbers found")
