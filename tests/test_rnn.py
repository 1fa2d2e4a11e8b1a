"""genfast.nn.LSTM, GRU, LSTMCell and GRUCell against torch.nn's with the same weights, over
random configurations: outputs, final states and every gradient, within twice the error of
torch's fp32 modules against float64 ones plus DESIGN.md's fp32 term."""

import copy
import random

import pytest
import torch
from helpers import relative_error, require
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import genfast
from genfast.backends import extension
from genfast.reference import rnn as reference_rnn

BACKENDS = ("cpu", "cuda", "triton", "reference")


def random_configs(kind: str, count: int, seed: int):
    """(constructor kwargs, T, B, packed, with initial states) drawn at random, odd sizes,
    T = 1 and batch 1 among them, and fixed ones that reach every branch of the C++ loops."""
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        kwargs = dict(input_size=rng.choice([1, 3, 7]), hidden_size=rng.choice([1, 5, 8, 13]),
                      num_layers=rng.choice([1, 2, 3]), bias=rng.random() < 0.8, batch_first=rng.random() < 0.5,
                      bidirectional=rng.random() < 0.5)
        if kind == "lstm" and rng.random() < 0.4:
            kwargs["proj_size"] = rng.randint(1, kwargs["hidden_size"] - 1) if kwargs["hidden_size"] > 1 else 0
        T, B = rng.choice([1, 2, 6]), rng.choice([1, 3, 4])
        configs.append((kwargs, T if i else 1, B if i != 1 else 1, rng.random() < 0.4, rng.random() < 0.5))
    # Both C++ loops: the persistent one (batch up to 64, its units split over threads in
    # blocks of 64 from hidden size 65; W_hh^T packed, by MKL in float32 from batch 32, or read
    # in place at batch 1 and for short sequences, by tiles from batch 12) and the one of a
    # product per step (larger batches, projections); the backward's in one team from 4 steps
    # (plain cells up to batch 4, or to 31 with W_hh within 2 MB), its products packed for MKL
    # from batch 32.
    configs += [
        (dict(input_size=5, hidden_size=80, num_layers=2, bias=True, batch_first=False, bidirectional=True),
         7, 5, True, True),
        (dict(input_size=5, hidden_size=80, num_layers=1, bias=True, batch_first=False, bidirectional=True),
         7, 1, False, True),
        (dict(input_size=5, hidden_size=80, num_layers=1, bias=True, batch_first=True, bidirectional=True),
         3, 13, True, True),
        (dict(input_size=6, hidden_size=10, num_layers=1, bias=True, batch_first=True, bidirectional=True),
         4, 70, True, True),
        (dict(input_size=6, hidden_size=20, num_layers=1, bias=True, batch_first=False, bidirectional=True),
         5, 40, False, True),
    ]
    if kind == "lstm":  # projections, which the draws above may miss
        configs += [
            (dict(input_size=5, hidden_size=8, num_layers=2, bias=True, batch_first=True, bidirectional=True,
                  proj_size=3), 6, 4, True, True),
            (dict(input_size=4, hidden_size=6, num_layers=1, bias=False, batch_first=False, bidirectional=False,
                  proj_size=2), 5, 3, False, True),
        ]
    return configs


MODULES = {"lstm": (nn.LSTM, genfast.nn.LSTM), "gru": (nn.GRU, genfast.nn.GRU)}


def twins(kind, kwargs):
    torch.manual_seed(0)
    reference = MODULES[kind][0](**kwargs)
    fused = MODULES[kind][1](**kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def run(module, kind, kwargs, T, B, packed, with_state, generator_seed, device="cpu"):
    """Output, final states and the gradients of every parameter, the input and the states, on
    the CPU; the inputs drawn on the CPU, then moved to module's device."""
    generator = torch.Generator().manual_seed(generator_seed)
    dtype = next(module.parameters()).dtype
    directions = 2 if kwargs["bidirectional"] else 1
    layers = kwargs["num_layers"] * directions
    x = torch.randn(B, T, kwargs["input_size"], generator=generator, dtype=torch.float64)
    x = (x if kwargs.get("batch_first") else x.transpose(0, 1)).to(device, dtype).requires_grad_()
    states = []
    if with_state:
        state_size = kwargs.get("proj_size") or kwargs["hidden_size"]
        states = [torch.randn(layers, B, state_size, generator=generator, dtype=torch.float64)]
        if kind == "lstm":
            states.append(torch.randn(layers, B, kwargs["hidden_size"], generator=generator, dtype=torch.float64))
        states = [s.to(device, dtype).requires_grad_() for s in states]
    hx = None if not states else tuple(states) if kind == "lstm" else states[0]
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    if packed:
        out, final = module(pack_padded_sequence(x, lengths, batch_first=kwargs.get("batch_first", False), enforce_sorted=False), hx)
        assert isinstance(out, PackedSequence)
        out = out.data
    else:
        out, final = module(x, hx)
    finals = list(final) if kind == "lstm" else [final]
    weights = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(device, dtype)
    loss = (out * weights).sum() + sum((f * (i + 2)).sum() for i, f in enumerate(finals))
    grads = torch.autograd.grad(loss, [*module.parameters(), x, *states])
    return [t.cpu() for t in (out, *finals, *grads)]


CONFIGS = {kind: random_configs(kind, 10, seed=seed) for kind, seed in (("lstm", 1), ("gru", 2))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, config", [(kind, i) for kind, configs in CONFIGS.items() for i in range(len(configs))])
def test_matches_torch_module(kind, config, backend):
    check_module(kind, config, backend, require(backend))


@pytest.mark.parametrize("kind, config", [(kind, i) for kind, configs in CONFIGS.items() for i in range(len(configs))])
def test_auto_on_torch_kernel_matches_torch_module(kind, config, monkeypatch):
    """Where auto takes PyTorch's own recurrence (cuDNN on a GPU), reversed and packed rows
    included; on a machine without a GPU, taken on the CPU for the test."""
    monkeypatch.setattr(genfast.ops.rnn, "_TORCH_KERNEL", frozenset({"cpu", "cuda"}))
    check_module(kind, config, "auto", "cuda" if torch.cuda.is_available() else "cpu")


def check_module(kind, config, backend, device):
    kwargs, T, B, packed, with_state = CONFIGS[kind][config]
    reference, fused = twins(kind, kwargs)
    exact = copy.deepcopy(reference).double()
    arguments = (kind, kwargs, T, B, packed, with_state, config)
    with genfast.use_backend(backend):
        got = run(fused.to(device), *arguments, device=device)
    want, ref = run(reference, *arguments), run(exact, *arguments)
    names = ["output", "h_n", *(["c_n"] if kind == "lstm" else []), *(n for n, _ in fused.named_parameters()),
             "input", "h0", "c0"]
    for name, g, w, r in zip(names, got, want, ref):
        assert g.shape == w.shape, name
        assert relative_error(g, r) <= 2 * relative_error(w, r) + 1e-5, f"{name} of {kwargs}, T={T}, B={B}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gpu_kernels_at_model_sizes(kind, backend):
    """On a GPU: several units per block of the persistent kernel, several tiles per program of
    Triton's, packed and bidirectional (no GPU: only Triton runs, in its interpreter, on CPU)."""
    device = require(backend)
    if device == "cpu" and backend == "triton":
        pytest.skip("these sizes take minutes in Triton's interpreter; the random configurations test it")
    kwargs = dict(input_size=64, hidden_size=300, num_layers=1, bias=True, batch_first=False, bidirectional=True)
    reference, fused = twins(kind, kwargs)
    exact = copy.deepcopy(reference).double()
    arguments = (kind, kwargs, 20, 16, True, True, 0)
    with genfast.use_backend(backend):
        got = run(fused.to(device), *arguments, device=device)
    want, ref = run(reference, *arguments), run(exact, *arguments)
    for g, w, r in zip(got, want, ref):
        assert relative_error(g, r) <= 2 * relative_error(w, r) + 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("hidden", [7, 80])  # 80: units split over threads
def test_cells_match_torch(kind, batched, hidden, backend):
    device = require(backend)
    torch_class, genfast_class = {"lstm": (nn.LSTMCell, genfast.nn.LSTMCell), "gru": (nn.GRUCell, genfast.nn.GRUCell)}[kind]
    torch.manual_seed(0)
    reference = torch_class(5, hidden)
    fused = genfast_class(5, hidden)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5) if batched else torch.randn(5)
    state_shape = (3, hidden) if batched else (hidden,)
    hx = (torch.randn(state_shape), torch.randn(state_shape)) if kind == "lstm" else torch.randn(state_shape)
    fused.to(device)
    for state in (None, hx):
        on_device = None if state is None else tuple(s.to(device) for s in state) if kind == "lstm" else state.to(device)
        with genfast.use_backend(backend):
            got = fused(x.to(device), on_device)
        want = reference(x, state)
        for g, w in zip(got if kind == "lstm" else [got], want if kind == "lstm" else [want]):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)


CELL_SIZES = [  # (batch, input, hidden): the loop's two product kernels (tiles from batch 12),
    (1, 1, 7), (5, 13, 80), (11, 3, 65), (12, 300, 20), (17, 9, 80),  # units split over threads
    (70, 6, 33),  # past the persistent loop's batches: an ATen product first
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("batch, input_size, hidden", CELL_SIZES, ids=[str(s) for s in CELL_SIZES])
def test_cell_inference(kind, bias, batch, input_size, hidden):
    """Where nothing needs a gradient, a cell's step is one call that projects the input in the
    loop's own products (an LSTM's gates summed in place, a GRU's n gate kept apart): float64
    against torch's cells within 1e-10, float32 within 1e-5 of it, from a state and from none,
    the input and the states transposed views."""
    require("cpu")
    torch_class, genfast_class = {"lstm": (nn.LSTMCell, genfast.nn.LSTMCell), "gru": (nn.GRUCell, genfast.nn.GRUCell)}[kind]
    torch.manual_seed(0)
    reference = torch_class(input_size, hidden, bias=bias).double()
    fused = genfast_class(input_size, hidden, bias=bias).double()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(input_size, batch, dtype=torch.float64).t()
    state = torch.randn(hidden, batch, dtype=torch.float64).t()
    hx = (state, torch.randn(hidden, batch, dtype=torch.float64).t()) if kind == "lstm" else state
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        fused.to(dtype)
        for given in (None, hx):
            on_dtype = None if given is None else tuple(s.to(dtype) for s in given) if kind == "lstm" else given.to(dtype)
            with genfast.use_backend("cpu"), torch.no_grad():
                got = fused(x.to(dtype), on_dtype)
                want = reference(x, given)
            for g, w in zip(got if kind == "lstm" else [got], want if kind == "lstm" else [want]):
                assert g.dtype == dtype
                assert relative_error(g, w) <= tolerance, (dtype, given is None)


def test_cell_inference_checks_its_arguments():
    require("cpu")
    cell = genfast.nn.LSTMCell(3, 4)
    with genfast.use_backend("cpu"), torch.no_grad():
        with pytest.raises(ValueError, match=r"weight_ih must be \(4 \* hidden_size, 5\)"):
            cell(torch.randn(2, 5))
        with pytest.raises(ValueError, match=r"h must be a CPU tensor of shape \[2, 4\]"):
            cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4)))
        with pytest.raises(TypeError, match="c must have input's dtype"):
            cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64)))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unbatched_input(kind):
    require("cpu")
    reference, fused = twins(kind, dict(input_size=3, hidden_size=4, num_layers=2))
    x = torch.randn(5, 3)
    h0 = torch.randn(2, 4)
    hx = (h0, torch.randn(2, 4)) if kind == "lstm" else h0
    with genfast.use_backend("cpu"):
        out, final = fused(x, hx)
    want, want_final = reference(x, hx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(final if kind == "lstm" else [final], want_final if kind == "lstm" else [want_final]):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [3, 70], ids=["persistent loop", "a product per step"])
def test_inference_matches_training_forward(kind, batch):
    """Under no_grad the loops keep one step of what the backward reads: the same outputs."""
    require("cpu")
    _, fused = twins(kind, dict(input_size=4, hidden_size=70, bidirectional=True))
    x = torch.randn(9, batch, 4)
    lengths = torch.randint(1, 10, (batch,), generator=torch.Generator().manual_seed(3))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    with genfast.use_backend("cpu"):
        training = fused(packed)
        with torch.no_grad():
            inference = fused(packed)
    torch.testing.assert_close(inference[0].data, training[0].data, rtol=0, atol=0)
    for a, b in zip(inference[1] if kind == "lstm" else [inference[1]], training[1] if kind == "lstm" else [training[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("steps, batch, hidden, bias",
                         [(19, 33, 35, True), (17, 64, 64, False), (16, 32, 7, True), (9, 3, 35, True),
                          (21, 70, 35, True)])
def test_inference_projects_in_the_loop(kind, steps, batch, hidden, bias):
    """Under no_grad the persistent loop projects the input itself, 4 steps at a time, with MKL's
    products (float32, batch 32 to 64): whole blocks, then a last one of 3 steps (19) or 1 (17);
    units split over threads (hidden 35, 64) or not (7); without biases. Batch 3, batch 70 and
    float64 project all steps first. Both directions, two layers, against torch's modules in
    float64."""
    require("cpu")
    kwargs = dict(input_size=6, hidden_size=hidden, num_layers=2, bias=bias, bidirectional=True)
    reference, fused = twins(kind, kwargs)
    reference.double()
    x = torch.randn(steps, batch, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        want = reference(x)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            with genfast.use_backend("cpu"):
                got = fused.to(dtype)(x.to(dtype))
            assert relative_error(got[0], want[0]) <= tolerance, dtype
            for g, w in zip(got[1] if kind == "lstm" else [got[1]], want[1] if kind == "lstm" else [want[1]]):
                assert relative_error(g, w) <= tolerance, dtype


@pytest.mark.parametrize("route", ["cpu", "torch kernel"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch", [4, 70], ids=["persistent loop", "a product per step"])
def test_layers_with_unsorted_lengths(batch, reverse, route, monkeypatch):
    """The ops take lengths in any order, 0 among them (a packed batch's are sorted, and only
    then do the loops shrink each step's product to the rows still running); so does PyTorch's
    recurrence where auto takes it."""
    backend = "cpu" if route == "cpu" else "auto"
    if route == "cpu":
        require("cpu")
    else:
        monkeypatch.setattr(genfast.ops.rnn, "_TORCH_KERNEL", frozenset({"cpu"}))
    generator = torch.Generator().manual_seed(4)
    T, I, H = 6, 3, 9
    x, h0, c0 = torch.randn(T, batch, I, generator=generator), torch.randn(batch, H), torch.randn(batch, H)
    lengths = torch.randint(0, T + 1, (batch,), generator=generator)
    lengths[0] = 0
    w_ih, w_hh, b_ih, b_hh = (torch.randn(4 * H, I), torch.randn(4 * H, H) / 3, torch.randn(4 * H), torch.randn(4 * H))
    with genfast.use_backend(backend):
        got = genfast.ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)
    with genfast.use_backend("reference"):
        want = genfast.ops.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=lengths, reverse=reverse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_packed_output_keeps_the_order():
    """A PackedSequence comes back with the input's batch sizes and indices."""
    require("cpu")
    reference, fused = twins("gru", dict(input_size=3, hidden_size=4, bidirectional=True))
    packed = pack_padded_sequence(torch.randn(5, 4, 3), torch.tensor([2, 5, 1, 5]), enforce_sorted=False)
    with genfast.use_backend("cpu"):
        out, h = fused(packed)
    want, want_h = reference(packed)
    assert torch.equal(out.batch_sizes, want.batch_sizes) and torch.equal(out.sorted_indices, want.sorted_indices)
    torch.testing.assert_close(out.data, want.data, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [3, 70], ids=["persistent loop", "a product per step"])
def test_float64_matches_torch(kind, batch):
    require("cpu")
    kwargs = dict(input_size=4, hidden_size=70, num_layers=2, bidirectional=True)
    reference, fused = (m.double() for m in twins(kind, kwargs))
    arguments = (kind, kwargs, 6, batch, True, True, 0)
    with genfast.use_backend("cpu"):
        got = run(fused, *arguments)
    for g, r in zip(got, run(reference, *arguments)):
        assert relative_error(g, r) <= 1e-10


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_persistent_loop_products(kind):
    """The persistent loop's products: with W_hh^T packed (5 steps), batches 6 to 11 take the
    rows six at a time, then the remaining 0 to 5 together, each count its own kernel; with
    W_hh read in place (2 steps), batches 11 to 17 cross over from unit_dots to tiles."""
    require("cpu")
    reference, fused = (m.double() for m in twins(kind, dict(input_size=4, hidden_size=70)))
    generator = torch.Generator().manual_seed(5)
    for steps, batch in [(5, b) for b in range(6, 12)] + [(2, b) for b in (11, 12, 16, 17)]:
        x = torch.randn(steps, batch, 4, generator=generator, dtype=torch.float64)
        with genfast.use_backend("cpu"), torch.no_grad():
            got = fused(x)
        with torch.no_grad():
            want = reference(x)
        assert relative_error(got[0], want[0]) <= 1e-10, (steps, batch)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype, hidden", [(torch.float64, 70), (torch.float32, 300)], ids=["float64", "float32"])
def test_persistent_backward_products(kind, dtype, hidden):
    """The persistent backward's products, d_h_gates times zero-padded panels of W_hh's columns
    (blocks of 8 vectors: 64 or 128 float32 units with AVX-512, 32 or 64 with AVX2; both sizes
    split over two threads where there are two): batches 1 to 5 take rows four (with AVX-512),
    two and one at a time, from 6 the tiles, up to 31, where MKL's packed products take over;
    packed batches shrink the rows step by step."""
    require("cpu")
    kwargs = dict(input_size=3, hidden_size=hidden, num_layers=1, bias=True, batch_first=False, bidirectional=True)
    reference, fused = (m.to(dtype) for m in twins(kind, kwargs))
    exact = copy.deepcopy(reference).double()
    slack = 1e-5 if dtype == torch.float32 else 1e-12  # float32: check_module's rule
    for batch, packed in [(1, False), (2, True), (5, False), (6, True), (7, False), (13, True), (31, False)]:
        arguments = (kind, kwargs, 4, batch, packed, True, batch)
        with genfast.use_backend("cpu"):
            got = run(fused, *arguments)
        for g, w, r in zip(got, run(reference, *arguments), run(exact, *arguments)):
            assert relative_error(g, r) <= 2 * relative_error(w, r) + slack, (batch, packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_runs_in_float32(dtype):
    """Low-precision modules run the recurrence in float32: error against float64 at most
    twice torch's own in that dtype, plus 1e-2."""
    require("cpu")
    kwargs = dict(input_size=6, hidden_size=9, num_layers=2, bidirectional=True)
    reference, fused = twins("lstm", kwargs)
    exact = copy.deepcopy(reference).double()
    reference, fused = reference.to(dtype), fused.to(dtype)
    arguments = ("lstm", kwargs, 5, 3, False, True, 0)
    with genfast.use_backend("cpu"):
        got = run(fused, *arguments)
    want, ref = run(reference, *arguments), run(exact, *arguments)
    for g, w, r in zip(got, want, ref):
        assert g.dtype == dtype
        assert relative_error(g, r) <= 2 * relative_error(w, r) + 1e-2


BAD_INPUTS = [
    ("wrong input size", lambda m: m(torch.randn(4, 2, 5)), RuntimeError, "input.size\\(-1\\) must be equal to input_size"),
    ("wrong state shape", lambda m: m(torch.randn(4, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))),
     RuntimeError, "Expected hidden\\[0\\] size"),
    ("integer input", lambda m: m(torch.ones(4, 2, 3, dtype=torch.int64)), ValueError, "RNN input dtype"),
    ("4-D input", lambda m: m(torch.randn(4, 2, 3, 1)), ValueError, "Expected input to be 2D or 3D"),
]


@pytest.mark.parametrize("what, call, error, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(what, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(genfast.nn.LSTM(3, 4))


def test_ops_check_their_arguments():
    with pytest.raises(TypeError, match="input must have dtype"):
        genfast.ops.gru_layer(torch.ones(4, 2, 3, dtype=torch.int64), torch.zeros(2, 5), torch.randn(15, 3),
                              torch.randn(15, 5))
    with pytest.raises(ValueError, match=r"weight_hh must have shape \(15, 5\)"):
        genfast.ops.gru_layer(torch.randn(4, 2, 3), torch.zeros(2, 5), torch.randn(15, 3), torch.randn(15, 4))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        genfast.ops.gru_layer(torch.randn(4, 2, 3), torch.zeros(2, 5), torch.randn(15, 3), torch.randn(15, 5),
                              lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"zoneout_h must have shape \(4, 2, 5\)"):
        genfast.ops.gru_layer(torch.randn(4, 2, 3), torch.zeros(2, 5), torch.randn(15, 3), torch.randn(15, 5),
                              zoneout_h=torch.zeros(4, 5))


def test_extension_checks_its_arguments():
    require("cpu")
    x_proj, w_hh, h0 = torch.randn(4, 2, 20), torch.randn(20, 5), torch.zeros(2, 5)
    c0, none = torch.zeros(2, 5), (None, None, None, None, 1e-5)  # none: no zoneout masks, no norms
    with pytest.raises(RuntimeError, match="an LSTM takes c0"):
        extension().recurrence_forward("lstm", x_proj, w_hh, h0, None, None, None, None, *none, False, True)
    with pytest.raises(RuntimeError, match="weight_hh must be"):
        extension().recurrence_forward("lstm", x_proj, w_hh.t(), h0, c0, None, None, None, *none, False, True)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 9"):
        extension().recurrence_forward("lstm", x_proj, w_hh, h0, c0, None, None, torch.tensor([1, 9]), *none, False,
                                       True)
    with pytest.raises(RuntimeError, match="zoneout_c must be"):
        extension().recurrence_forward("lstm", x_proj, w_hh, h0, c0, None, None, None, None, torch.zeros(4, 2), None,
                                       None, 1e-5, False, True)
    with pytest.raises(RuntimeError, match="norm_hh and norm_c come together"):
        extension().recurrence_forward("lstm", x_proj, w_hh, h0, c0, None, None, None, None, None, torch.zeros(2, 20),
                                       None, 1e-5, False, True)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = genfast.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_compiles_without_graph_break():
    """torch.compile(fullgraph=True) of a module holding genfast.nn.LSTM (torch's nn.LSTM
    breaks the graph there): eager's output and input gradient."""
    require("cpu")
    torch.manual_seed(0)
    model, x = _Tagger(), torch.randn(2, 5, 4, requires_grad=True)
    with genfast.use_backend("cpu"):
        eager = model(x)
        (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (compiled_grad,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, projection", [("lstm", None), ("lstm", 3), ("gru", None)])
@pytest.mark.parametrize("reverse", [False, True])
def test_zoneout_matches_reference(kind, projection, reverse, backend):
    """Zoneout masks of 0/1 draws and of shares, with lengths: outputs, states and every
    gradient in float64 against genfast/reference/rnn.py's step-by-step layer."""
    device = require(backend)
    generator = torch.Generator().manual_seed(3)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(device)

    T, B, I, H = 5, 19, 4, 21
    P, gates = projection or H, 4 if kind == "lstm" else 3
    x, h0, c0 = draw(T, B, I), draw(B, P), draw(B, H)
    weights = [draw(gates * H, I), draw(gates * H, P, scale=0.3), draw(gates * H), draw(gates * H)]
    weight_hr = None if projection is None else draw(P, H, scale=0.3)
    states = (h0, c0) if kind == "lstm" else (h0,)
    leaves = [t.requires_grad_() for t in (x, *states, *weights, *([] if weight_hr is None else [weight_hr]))]
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    zoneout_h = torch.bernoulli(torch.full((T, B, P), 0.3, dtype=torch.float64), generator=generator).to(device)
    zoneout_c = torch.rand(T, B, H, generator=generator, dtype=torch.float64).to(device)
    if kind == "lstm":
        def layer(module):
            return module.lstm_layer(x, h0, c0, *weights, weight_hr, lengths.to(device), reverse, zoneout_h=zoneout_h,
                                     zoneout_c=zoneout_c)

        def spec():
            return reference_rnn.lstm_layer(x, h0, c0, *weights, weight_hr, lengths.to(device), reverse, zoneout_h,
                                            zoneout_c)
    else:
        def layer(module):
            return module.gru_layer(x, h0, *weights, lengths.to(device), reverse, zoneout_h=zoneout_h)

        def spec():
            return reference_rnn.gru_layer(x, h0, *weights, lengths.to(device), reverse, zoneout_h)

    with genfast.use_backend(backend):
        got = layer(genfast.ops)
    want = spec()
    upstream = [draw(*t.shape) for t in want]
    grads = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, upstream)), leaves)
    want_grads = torch.autograd.grad(sum((w * u).sum() for w, u in zip(want, upstream)), leaves)
    for g, w in zip([*got, *grads], [*want, *want_grads]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_zoneout_modules(kind):
    """In evaluation each state keeps its share from the step before; training draws masks from
    torch's generator (same seed, same output); keeping everything holds the initial state;
    no zoneout is torch's module."""
    require("cpu")
    zoneout = {"zoneout_hidden": 0.3} | ({"zoneout_cell": 0.6} if kind == "lstm" else {})
    reference, _ = twins(kind, dict(input_size=4, hidden_size=6))
    module = MODULES[kind][1](4, 6, **zoneout)
    module.load_state_dict(reference.state_dict())
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    module.double()
    weights = list(module.parameters())
    with genfast.use_backend("cpu"):
        module.eval()
        out = module(x)[0]
        masks = {"zoneout_h": torch.full((7, 3, 6), 0.3, dtype=torch.float64)}
        if kind == "lstm":
            masks["zoneout_c"] = torch.full((7, 3, 6), 0.6, dtype=torch.float64)
            state = (torch.zeros(3, 6, dtype=torch.float64),) * 2
            expected = reference_rnn.lstm_layer(x, *state, *weights, **masks)[0]
        else:
            expected = reference_rnn.gru_layer(x, torch.zeros(3, 6, dtype=torch.float64), *weights, **masks)[0]
        torch.testing.assert_close(out, expected)
        module.train()
        torch.manual_seed(5)
        first = module(x)[0]
        torch.manual_seed(5)
        assert torch.equal(first, module(x)[0])
        assert not torch.equal(first, module(x)[0])
        frozen = MODULES[kind][1](4, 6, zoneout_hidden=1.0, **({"zoneout_cell": 1.0} if kind == "lstm" else {}))
        h0 = torch.randn(1, 3, 6)
        state = (h0, torch.randn(1, 3, 6)) if kind == "lstm" else h0
        output, final = frozen(x.float(), state)
        torch.testing.assert_close(output, h0.expand(7, 3, 6))
        plain = MODULES[kind][1](4, 6)
        plain.load_state_dict(reference.state_dict())
        torch.testing.assert_close(plain(x.float())[0], reference(x.float())[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="zoneout_hidden"):
        MODULES[kind][1](4, 6, zoneout_hidden=1.5)
    assert "zoneout_hidden=0.3" in repr(module)


def _layer_norm_lstm_spec(module, x, lengths):
    """module's layers and directions run through genfast/reference/rnn.py's lstm_layer."""
    for layer in range(module.num_layers):
        outputs = []
        for suffix, reverse in ((f"_l{layer}", False), (f"_l{layer}_reverse", True))[: 1 + module.bidirectional]:
            weights = [getattr(module, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            norms = reference_rnn.CellNorms(*((getattr(module, f"layer_norm_{part}_weight{suffix}"),
                                               getattr(module, f"layer_norm_{part}_bias{suffix}"))
                                              for part in ("ih", "hh", "c")))
            state = x.new_zeros(x.shape[1], module.hidden_size)
            outputs.append(reference_rnn.lstm_layer(x, state, state, *weights, None, lengths, reverse, norms=norms)[0])
        x = torch.cat(outputs, -1)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [5, 70])  # both C++ loops' batch sizes, several Triton programs
def test_layer_norm_lstm_module(batch, backend):
    """genfast.nn.LSTM(layer_norm=True), 2 bidirectional layers over a packed batch: output and
    every parameter's gradient against the reference cell run layer by layer, in float64."""
    device = require(backend)
    torch.manual_seed(0)
    module = genfast.nn.LSTM(3, 7, num_layers=2, bidirectional=True, layer_norm=True).double().to(device)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.startswith("layer_norm_"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    assert {f"layer_norm_{part}_{kind}_l1_reverse" for part in ("ih", "hh", "c") for kind in ("weight", "bias")} <= set(
        module.state_dict()
    )
    x = torch.randn(6, batch, 3, dtype=torch.float64, device=device)
    lengths = torch.randint(1, 7, (batch,))
    with genfast.use_backend(backend):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0], total_length=6)[0]
    expected = _layer_norm_lstm_spec(module, x, lengths.to(device))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(module.parameters()))
    want = torch.autograd.grad((expected * weights).sum(), list(module.parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    module.reset_parameters()
    assert torch.equal(module.layer_norm_c_weight_l0, torch.ones(7, dtype=torch.float64, device=device))
    assert "layer_norm=True" in repr(module)

