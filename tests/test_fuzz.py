"""Property tests of every public op: hypothesis draws shapes (1, primes, others), layouts
(contiguous, transposed, sliced), dtypes, argument values and bad values (NaN, infinities, huge
magnitudes), and each backend's kernels must agree with the reference: the C++ ones (cpu), the
Triton ones (in its interpreter here, compiled on a GPU) and the CUDA ones, on the device each runs.

Agreement is the op tests' rule: against the reference in float64 (or float32, for ops computed
in float32), genfast's error is at most twice the reference's own in the same dtype, plus the
dtype's absolute term; gradients likewise. Where the reference in the input's dtype gives NaN or
an infinity, genfast's output must give the same there, and agree elsewhere. A gradient must be
finite wherever the reference's is, and agree there; where the reference's is not, genfast's may
be anything: autograd's chain rule multiplies a zero cotangent by an infinite partial derivative
(0 * inf = NaN) at positions that do not depend on the bad value at all (an RNN's padded steps),
and makes NaN of what a fused derivative gives as inf.
Integer outputs (sampled tokens) must be equal.

The examples are derandomised, so each CI run tries the same examples per op and backend.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import interpreted, relative_error, require, safe_uniform
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import genfast
from genfast.backends import BackendUnavailableError
from genfast.ops import StepCoefficients

FUZZ_EXAMPLES = int(os.environ.get("GENFAST_FUZZ_EXAMPLES", 500))  # CI runs the default
# Triton's interpreter runs a few hundred times slower than the C++ kernels: on CPU tensors it gets
# a sample, and its full share runs where Triton compiles (benchmarks/run_on_gpu.sh).
INTERPRETED_EXAMPLES = int(os.environ.get("GENFAST_FUZZ_INTERPRETED_EXAMPLES", 25))
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16, 17, 31])
SMALL = st.sampled_from([1, 2, 3, 5])
HALF = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, *HALF)
MATH_IN_FLOAT32 = (torch.float32, *HALF)  # the ops that compute in float32 and take no float64
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
BAD_VALUES = (math.nan, math.inf, -math.inf, 1e30, -1e30)
BACKEND_DTYPES = {"cuda": (torch.float32, *HALF)}  # the CUDA kernels refuse float64 (their bindings say so)


@dataclass
class Case:
    """One call of an op: call(*inputs), where the floating-point tensors among inputs (float64
    master values) are cast to the case's dtype and laid out as drawn; gradients flow to the
    inputs at positions ``grad``."""

    call: Callable
    inputs: tuple
    dtypes: tuple = ALL_DTYPES
    grad: tuple[int, ...] = ()
    atol_scale: float = 1.0  # wider for sums over many terms in float32 (DESIGN.md's table)
    # PyTorch's own op, where its rounding in the input's dtype is worse than the reference's:
    # the bound then allows twice the worse of the two.
    torch_call: Callable | None = None
    contiguous: tuple[int, ...] = ()  # the inputs that must be contiguous (KV caches, written in place)
    # False where the kernel's arithmetic legitimately turns the reference's inf into NaN or the
    # reverse: its outputs then follow the gradients' rule.
    exact_nonfinite: bool = True
    finite_inputs: tuple[int, ...] = ()  # the inputs given huge magnitudes but no NaN or infinity, with the reason
    exact_dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.exact_dtype = torch.float64 if torch.float64 in self.dtypes else torch.float32


def _values(draw, *shape, scale=1.0, positive=False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return values.abs() + 0.1 if positive else values


def _laid_out(values: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """values in dtype, in memory contiguous, transposed (its last two dimensions swapped in
    memory) or sliced (every other element of a twice-as-long last dimension)."""
    values = values.to(dtype)
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and values.dim() >= 1:
        wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=dtype, device=values.device)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values.clone()


def _flatten(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in _flatten(item)]
    return []


def _run(case: Case, dtype: torch.dtype, layouts: list[str], with_grad: bool, device: str,
         call: Callable | None = None) -> list[torch.Tensor]:
    inputs = [_laid_out(x.to(device), dtype, layout) if isinstance(x, torch.Tensor) and x.is_floating_point()
              else x.to(device) if isinstance(x, torch.Tensor) else x for x, layout in zip(case.inputs, layouts)]
    leaves = [inputs[i].requires_grad_() for i in case.grad] if with_grad else []
    outputs = [t for t in _flatten((call or case.call)(*inputs)) if t is not None]
    if not leaves:
        return [t.detach().cpu() for t in outputs]
    differentiable = [t for t in outputs if t.requires_grad]
    generator = torch.Generator().manual_seed(0)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype).to(device)
                  for t in differentiable]
    grads = torch.autograd.grad(differentiable, leaves, cotangents, allow_unused=True)
    return [t.detach().cpu() for t in outputs] + [torch.zeros_like(x).cpu() if g is None else g.cpu()
                                                  for x, g in zip(leaves, grads)]


def _check(case: Case, dtype: torch.dtype, layouts: list[str], with_grad: bool, backend: str, device: str) -> None:
    with genfast.use_backend("reference"):
        try:
            same_dtype = _run(case, dtype, layouts, with_grad, device)
        except ValueError as refusal:  # a bad value the op refuses (sample_tokens' NaN logits)
            with genfast.use_backend(backend), pytest.raises(ValueError, match=re.escape(str(refusal))):
                _run(case, dtype, layouts, with_grad, device)
            return
        exact = _run(case, case.exact_dtype, layouts, with_grad, device)
    with genfast.use_backend(backend):
        try:
            got = _run(case, dtype, layouts, with_grad, device)
        except BackendUnavailableError as error:
            if "has no" in str(error):
                pytest.skip(str(error))
            raise
    baselines = [same_dtype] + ([_run(case, dtype, layouts, with_grad, device, case.torch_call)]
                                if case.torch_call else [])
    assert len(got) == len(same_dtype)
    outputs = len(got) - (len(case.grad) if with_grad else 0)
    for i, (g, e, s, *others) in enumerate(zip(got, exact, *baselines)):
        what = f"output {i}" if i < outputs else f"gradient {i - outputs}"
        assert g.shape == s.shape and g.dtype == s.dtype, f"{what}: {g.shape} {g.dtype}, want {s.shape} {s.dtype}"
        if not g.is_floating_point():
            assert torch.equal(g, s), what
            continue
        if i < outputs and case.exact_nonfinite:
            assert torch.equal(g.isnan(), s.isnan()), f"{what}: NaN where the reference has none, or the reverse"
            assert torch.equal(g.isinf(), s.isinf()) and torch.equal(g[s.isinf()], s[s.isinf()]), f"{what}: infinities"
        else:
            assert not (~g.isfinite() & s.isfinite()).any(), f"{what}: not finite where the reference is finite"
        finite = s.isfinite() & e.isfinite()
        error = relative_error(g[finite], e[finite])
        bound = 2 * max(relative_error(b[finite], e[finite]) for b in (s, *others)) + case.atol_scale * ATOL[dtype]
        assert error <= bound, f"{what}: error {error:.3g} > bound {bound:.3g}"


@st.composite
def _examples(draw, cases, backend):
    """A case, its dtype, a layout per input, whether to differentiate, and perhaps a bad value."""
    case = draw(cases)
    dtype = draw(st.sampled_from([d for d in case.dtypes if d in BACKEND_DTYPES.get(backend, ALL_DTYPES)]))
    layouts = ["contiguous" if i in case.contiguous else draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
               for i in range(len(case.inputs))]
    with_grad = bool(case.grad) and draw(st.booleans())
    floating = [i for i, x in enumerate(case.inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()
                and x.numel()]
    if floating and draw(st.integers(0, 4)) == 0:
        index = draw(st.sampled_from(floating))
        target = case.inputs[index]
        values = [v for v in BAD_VALUES if math.isfinite(v)] if index in case.finite_inputs else BAD_VALUES
        target.view(-1)[draw(st.integers(0, target.numel() - 1))] = draw(st.sampled_from(values))
    return case, dtype, layouts, with_grad


# One strategy per public op, each drawing a Case.

@st.composite
def _activation(draw, name):
    shape = draw(st.lists(SIZES, min_size=1, max_size=3))
    approximate = draw(st.sampled_from(["none", "tanh"]))
    x, y = _values(draw, *shape, scale=3), _values(draw, *shape, scale=3)
    if name == "silu":
        return Case(genfast.ops.silu, (x,), grad=(0,))
    if name == "gelu":
        return Case(lambda x: genfast.ops.gelu(x, approximate=approximate), (x,), grad=(0,))
    if name == "swiglu":
        return Case(genfast.ops.swiglu, (x, y), grad=(0, 1))
    # gelu(gate) underflows to 0 at a slightly different gate than torch's: there 0 * inf up is
    # NaN on one side and inf on the other.
    return Case(lambda g, u: genfast.ops.geglu(g, u, approximate=approximate), (x, y), grad=(0, 1),
                exact_nonfinite=False)


@st.composite
def _bias_act(draw):
    shape = draw(st.lists(SIZES, min_size=1, max_size=4))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    activation = draw(st.sampled_from(["linear", "relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid"]))
    alpha = draw(st.sampled_from([None, 0.0, 0.1, 1.5])) if activation == "leaky_relu" else None
    gain = draw(st.sampled_from([None, 1.0, 0.5, 2.0]))
    clamp = draw(st.sampled_from([None, 0.0, 0.7, 256.0]))
    with_bias = draw(st.booleans())
    x, bias = _values(draw, *shape, scale=2), _values(draw, shape[dim])
    return Case(lambda x, b: genfast.ops.bias_act(x, b if with_bias else None, dim, activation, alpha, gain, clamp),
                (x, bias), grad=(0, 1))


@st.composite
def _group_norm(draw):
    groups = draw(SMALL)
    channels = groups * draw(SMALL)
    shape = (draw(SMALL), channels, *draw(st.lists(SIZES, min_size=0, max_size=2)))
    activation = draw(st.sampled_from([None, "silu"]))
    eps = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    affine = draw(st.booleans())
    x, w, b = _values(draw, *shape, scale=2), _values(draw, channels), _values(draw, channels)
    def torch_call(x, w, b):
        y = F.group_norm(x, groups, w if affine else None, b if affine else None, eps)
        return F.silu(y) if activation else y

    return Case(lambda x, w, b: genfast.ops.group_norm(x, groups, w if affine else None, b if affine else None, eps,
                                                       activation), (x, w, b), grad=(0, 1, 2),
                # dx of a near-constant group is rstd (up to 1/sqrt(eps)) times a difference of sums.
                atol_scale=10,
                # torch refuses groups of one element
                torch_call=torch_call if x.numel() > groups else None)


@st.composite
def _layer_norm(draw, kind):
    shape = draw(st.lists(SIZES, min_size=1, max_size=3))
    normalized = shape[-draw(st.integers(1, len(shape))):]
    affine, with_bias, with_residual = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    x, r = _values(draw, *shape, scale=2), _values(draw, *shape)
    w, b = _values(draw, *normalized), _values(draw, *normalized)

    def call(x, r, w, b):
        residual = r if with_residual else None
        if kind == "rms_norm":
            return genfast.ops.rms_norm(x, normalized, w if affine else None, residual=residual)
        return genfast.ops.layer_norm(x, normalized, w if affine else None, b if affine and with_bias else None,
                                      residual=residual)

    def torch_call(x, r, w, b):
        h = x + r if with_residual else x
        if kind == "rms_norm":
            y = F.rms_norm(h, normalized, w if affine else None)
        else:
            y = F.layer_norm(h, normalized, w if affine else None, b if affine and with_bias else None)
        return (y, h) if with_residual else y

    return Case(call, (x, r, w, b), grad=(0, 1, 2, 3), torch_call=torch_call)


@st.composite
def _attention(draw):
    batch, heads, queries, keys = draw(SMALL), draw(st.sampled_from([1, 2, 4])), draw(SIZES), draw(SIZES)
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    dim, value_dim = draw(st.sampled_from([1, 3, 8, 16])), draw(st.sampled_from([1, 4, 16]))
    is_causal = draw(st.booleans())
    mask_kind = "none" if is_causal else draw(st.sampled_from(["none", "bool", "float"]))
    window = draw(st.sampled_from([None, (2, 0), (-1, 3), (4, 4)]))
    alibi = draw(st.booleans())
    softcap = draw(st.sampled_from([None, 5.0]))
    scale = draw(st.sampled_from([None, 0.3]))
    q, k, v = (_values(draw, batch, h, n, d) for h, n, d in ((heads, queries, dim), (kv_heads, keys, dim),
                                                             (kv_heads, keys, value_dim)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(queries, keys, generator=generator) < 0.8
    mask[:, 0] = True  # no fully masked row: its output is the reference's NaN or 0 by convention
    slopes = torch.rand(heads, generator=generator, dtype=torch.float64)

    def call(q, k, v, slopes, mask):
        attn_mask = {"none": None, "bool": mask, "float": torch.where(mask, 0.0, -1e4).to(q.dtype)}[mask_kind]
        return genfast.ops.scaled_dot_product_attention(
            q, k, v, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=kv_heads != heads, window_size=window,
            alibi_slopes=slopes.float() if alibi else None, softcap=softcap)

    # Where the reference gives NaN for 0 * NaN (a bad value in a masked key's value), the kernel,
    # skipping masked tiles, may not.
    return Case(call, (q, k, v, slopes, mask), grad=(0, 1, 2), exact_nonfinite=False)


@st.composite
def _attention_with_kv_cache(draw):
    batch, heads, queries = draw(SMALL), draw(st.sampled_from([1, 2, 4])), draw(SMALL)
    dim = draw(st.sampled_from([1, 8]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    capacity = draw(SIZES) + queries
    append = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Each element attends its first cache_seqlens (+ queries, when appending) rows, the queries last.
    low, high = (0, capacity - queries) if append else (queries, capacity)
    lengths = torch.randint(low, high + 1, (batch,), generator=generator, dtype=torch.int32)
    is_causal = draw(st.booleans())
    q = _values(draw, batch, heads, queries, dim)
    k_cache, v_cache = _values(draw, batch, kv_heads, capacity, dim), _values(draw, batch, kv_heads, capacity, dim)
    k, v = _values(draw, batch, kv_heads, queries, dim), _values(draw, batch, kv_heads, queries, dim)

    def call(q, k_cache, v_cache, k, v, lengths):
        new = (k, v) if append else (None, None)
        return genfast.ops.attention_with_kv_cache(q, k_cache, v_cache, *new, cache_seqlens=lengths,
                                                   is_causal=is_causal)

    return Case(call, (q, k_cache, v_cache, k, v, lengths), contiguous=(1, 2))


@st.composite
def _rotary(draw):
    batch, heads, length = draw(SMALL), draw(SMALL), draw(SIZES)
    dim = 2 * draw(st.integers(1, 9))
    rotary = 2 * draw(st.integers(1, dim // 2))
    kv_heads = draw(SMALL)
    per_batch = draw(st.booleans())
    angles = _values(draw, *((batch,) if per_batch else ()), length, rotary // 2, scale=3)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k = _values(draw, batch, heads, length, dim), _values(draw, batch, kv_heads, length, dim)
    return Case(genfast.ops.apply_rotary_pos_emb, (q, k, cos, sin), grad=(0, 1))


@st.composite
def _linear_cross_entropy(draw):
    rows, hidden, vocab = draw(SIZES), draw(SIZES), draw(st.sampled_from([1, 2, 7, 50, 129]))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    smoothing = draw(st.sampled_from([0.0, 0.1]))
    with_bias = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    target = torch.randint(0, vocab, (rows,), generator=generator)
    target[torch.rand(rows, generator=generator) < 0.2] = -100
    x, w, b = _values(draw, rows, hidden), _values(draw, vocab, hidden, scale=0.5), _values(draw, vocab)
    return Case(lambda x, w, b, t: genfast.ops.linear_cross_entropy(x, w, t, b if with_bias else None,
                                                                    reduction=reduction, label_smoothing=smoothing),
                (x, w, b, target), grad=(0, 1, 2))


@st.composite
def _recurrent(draw, kind):
    gates = 4 if kind.startswith("lstm") else 3
    steps, batch, features, hidden = draw(SMALL), draw(SMALL), draw(SIZES), draw(SIZES)
    scale = 1 / math.sqrt(hidden)
    x = _values(draw, steps, batch, features)
    h, c = _values(draw, batch, hidden), _values(draw, batch, hidden)
    w_ih = _values(draw, gates * hidden, features, scale=scale)
    w_hh = _values(draw, gates * hidden, hidden, scale=scale)
    b_ih, b_hh = _values(draw, gates * hidden, scale=scale), _values(draw, gates * hidden, scale=scale)
    with_bias, reverse = draw(st.booleans()), draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator) if draw(st.booleans()) else None
    ops = genfast.ops

    def call(x, h, c, w_ih, w_hh, b_ih, b_hh, lengths):
        biases = (b_ih, b_hh) if with_bias else (None, None)
        if kind == "lstm_cell":
            return ops.lstm_cell(x[0], h, c, w_ih, w_hh, *biases)
        if kind == "gru_cell":
            return ops.gru_cell(x[0], h, w_ih, w_hh, *biases)
        if kind == "lstm_layer":
            return ops.lstm_layer(x, h, c, w_ih, w_hh, *biases, lengths=lengths, reverse=reverse)
        return ops.gru_layer(x, h, w_ih, w_hh, *biases, lengths=lengths, reverse=reverse)

    return Case(call, (x, h, c, w_ih, w_hh, b_ih, b_hh, lengths), grad=(0, 1, 2, 3, 4, 5, 6), atol_scale=10)


@st.composite
def _conv2d(draw):
    batch, channels, filters = draw(SMALL), draw(st.sampled_from([1, 3, 8, 13])), draw(st.sampled_from([1, 5, 8]))
    height, width = draw(SIZES), draw(SIZES)
    kernel = draw(st.sampled_from([3, 3, 3, 1]))
    padding = draw(st.integers(0, 2))
    upsample = draw(st.sampled_from([1, 1, 2]))
    if (height * upsample + 2 * padding < kernel) or (width * upsample + 2 * padding < kernel):
        padding = kernel
    with_bias, with_residual = draw(st.booleans()), draw(st.booleans())
    x = _values(draw, batch, channels, height, width)
    w = _values(draw, filters, channels, kernel, kernel, scale=1 / math.sqrt(9 * channels))
    b = _values(draw, filters)
    out = (height * upsample + 2 * padding - kernel + 1, width * upsample + 2 * padding - kernel + 1)
    r = _values(draw, batch, filters, *out)
    return Case(lambda x, w, b, r: genfast.ops.conv2d(x, w, b if with_bias else None, padding=padding,
                                                      upsample=upsample, residual=r if with_residual else None),
                # Winograd's transforms add and subtract a tile's values: an infinite input gives
                # inf - inf = NaN where direct convolution gives inf. And direct convolution never
                # multiplies the padding by the weights, where the tiles' transforms do: an infinite
                # or NaN weight makes NaN of the borders that torch leaves finite.
                (x, w, b, r), grad=(0, 1, 2, 3), atol_scale=10, exact_nonfinite=False, finite_inputs=(1,))


@st.composite
def _losses(draw, kind):
    shape = draw(st.lists(SIZES, min_size=1, max_size=3))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    x, y = _values(draw, *shape, scale=3), _values(draw, *shape)
    ops = genfast.ops
    if kind == "mse_loss":
        return Case(lambda x, y: ops.mse_loss(x, y, reduction=reduction), (x, y), grad=(0, 1))
    if kind == "binary_cross_entropy_with_logits":
        weighted = draw(st.booleans())
        weight, pos_weight = _values(draw, *shape, positive=True), _values(draw, shape[-1], positive=True)
        return Case(lambda x, t, w, p: ops.binary_cross_entropy_with_logits(
            x, t, w if weighted else None, reduction=reduction, pos_weight=p if weighted else None),
            (x, torch.sigmoid(y), weight, pos_weight), grad=(0, 1))
    if kind == "gaussian_kl_divergence":
        return Case(lambda mu, logvar: ops.gaussian_kl_divergence(mu, logvar, reduction=reduction), (x, y),
                    grad=(0, 1))
    if kind == "reparameterize":
        return Case(ops.reparameterize, (x, y, _values(draw, *shape)), grad=(0, 1))
    loss_kind = draw(st.sampled_from(["non_saturating", "hinge"]))
    if kind == "discriminator_loss":
        return Case(lambda real, fake: ops.discriminator_loss(real, fake, loss_kind), (x, y), grad=(0, 1))
    return Case(lambda fake: ops.generator_loss(fake, loss_kind), (x,), grad=(0,))


@st.composite
def _minibatch_stddev(draw):
    group = draw(st.sampled_from([1, 2, 4]))
    batch = group * draw(SMALL)
    num_channels = draw(st.sampled_from([1, 2]))
    channels = num_channels * draw(SMALL)
    x = _values(draw, batch, channels, draw(SIZES), draw(SIZES))
    return Case(lambda x: genfast.ops.minibatch_stddev(x, group, num_channels), (x,), grad=(0,), atol_scale=10)


@st.composite
def _timestep_embedding(draw):
    count, dim = draw(SIZES), draw(st.sampled_from([1, 2, 7, 32, 33]))
    flip, shift = draw(st.booleans()), draw(st.sampled_from([0.0, 1.0] if dim // 2 != 1 else [0.0]))
    scale, period = draw(st.sampled_from([1.0, 2.5])), draw(st.sampled_from([10000, 100]))
    timesteps = _values(draw, count, positive=True) * 500
    return Case(lambda t: genfast.ops.timestep_embedding(t.float(), dim, flip, shift, scale, period), (timesteps,),
                dtypes=(torch.float32,))


@st.composite
def _diffusion_training(draw, kind):
    shape = (draw(SMALL), *draw(st.lists(SIZES, min_size=1, max_size=3)))
    x, y = _values(draw, *shape), _values(draw, *shape)
    if kind == "denoising_loss":
        weights = _values(draw, shape[0], positive=True)
        weighted = draw(st.booleans())
        return Case(lambda m, t, w: genfast.ops.denoising_loss(m, t, w.float() if weighted else None), (x, y, weights),
                    dtypes=MATH_IN_FLOAT32, grad=(0, 1), atol_scale=10)
    steps = draw(st.sampled_from([1, 10, 1000]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    table = torch.linspace(0.9999, 0.01, steps, dtype=torch.float64)
    timesteps = torch.randint(0, steps, (shape[0],), generator=generator)
    velocity = draw(st.booleans())
    return Case(lambda x, n, a, t: genfast.ops.add_noise(x, n, t, a.float(), velocity=velocity),
                (x, y, table, timesteps), dtypes=MATH_IN_FLOAT32)


@st.composite
def _denoise_step(draw):
    batch, channels = draw(SMALL), draw(SMALL)
    spatial = draw(st.lists(SIZES, min_size=1, max_size=2))
    guided, learned = draw(st.booleans()), draw(st.booleans())
    number = st.floats(-2, 2, allow_nan=False, width=32)
    coefficients = StepCoefficients(
        sample_noise=draw(number), x0_sample=draw(number), x0_model=draw(number), prev_x0=draw(number),
        prev_sample=draw(number), prev_model=draw(number), prev_history=draw(number),
        prev_noise=draw(st.floats(0, 1, width=32)), out_x0=draw(number), out_sample=draw(number),
        clip=draw(st.sampled_from([None, 1.0])), learned_variance=(-3.0, -1.0) if learned else None)
    sample = _values(draw, batch, channels, *spatial)
    model = _values(draw, (2 if guided else 1) * batch, (2 if learned else 1) * channels, *spatial)
    noise, history = _values(draw, batch, channels, *spatial), _values(draw, batch, channels, *spatial)
    threshold = _values(draw, batch, positive=True) if draw(st.booleans()) else None
    guidance = draw(st.sampled_from([1.0, 7.5])) if guided else None
    return Case(lambda s, m, n, h, t: genfast.ops.denoise_step(
        s, m, coefficients, noise=n, history=h, guidance_scale=guidance, threshold=None if t is None else t.float()),
        (sample, model, noise, history, threshold), dtypes=MATH_IN_FLOAT32)


@st.composite
def _sample_tokens(draw):
    rows, vocab = draw(SIZES), draw(st.sampled_from([1, 2, 7, 50, 257]))
    temperature, top_k, top_p = (draw(st.sampled_from(values)) for values in ([0.5, 1.0, 2.0], [0, 1, 5, 300],
                                                                               [1.0, 0.9, 0.3]))
    logits = _values(draw, rows, vocab, scale=3)
    seed = draw(st.integers(0, 2**31 - 1))

    def call(logits):
        if not logits.amax(-1).isfinite().all():
            # A ValueError on the CPU; on a GPU (no check there) such a row's token is unspecified.
            return genfast.ops.sample_tokens(logits, temperature, top_k, top_p) if logits.is_cpu else None
        u = safe_uniform(logits, temperature, top_k, top_p, seed)
        return genfast.ops.sample_tokens(logits, temperature, top_k, top_p, uniform=u)

    return Case(call, (logits,))


OPS = {
    **{name: _activation(name) for name in ("silu", "gelu", "swiglu", "geglu")},
    "bias_act": _bias_act(),
    "group_norm": _group_norm(),
    **{name: _layer_norm(name) for name in ("layer_norm", "rms_norm")},
    "scaled_dot_product_attention": _attention(),
    "attention_with_kv_cache": _attention_with_kv_cache(),
    "apply_rotary_pos_emb": _rotary(),
    "linear_cross_entropy": _linear_cross_entropy(),
    **{name: _recurrent(name) for name in ("lstm_cell", "gru_cell", "lstm_layer", "gru_layer")},
    "conv2d": _conv2d(),
    **{name: _losses(name) for name in ("mse_loss", "binary_cross_entropy_with_logits", "gaussian_kl_divergence",
                                        "reparameterize", "discriminator_loss", "generator_loss")},
    "minibatch_stddev": _minibatch_stddev(),
    "timestep_embedding": _timestep_embedding(),
    **{name: _diffusion_training(name) for name in ("add_noise", "denoising_loss")},
    "denoise_step": _denoise_step(),
    "sample_tokens": _sample_tokens(),
}


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("name", OPS)
def test_op_matches_reference_on_drawn_inputs(name, backend):
    device = require(backend)
    if name == "conv2d" and backend != "cpu":
        pytest.skip("conv2d runs ATen's convolution on backends other than cpu: no kernel of its own")

    @settings(max_examples=INTERPRETED_EXAMPLES if interpreted(backend) else FUZZ_EXAMPLES, deadline=None,
              derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_examples(OPS[name], backend))
    def check(example):
        _check(*example, backend, device)

    check()


def test_every_public_op_is_fuzzed():
    public = {name for name in genfast.ops.__all__ if callable(getattr(genfast.ops, name))
              and not isinstance(getattr(genfast.ops, name), type)}
    assert public == set(OPS)
