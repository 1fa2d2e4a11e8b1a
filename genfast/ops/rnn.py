"""LSTM and GRU layers and cells as the custom op genfast::recurrence: the input projection
of every time step is one matrix product (torch's), then the time loop runs in native code,
each step one product h W_hh^T and one fused pass of gate math: csrc/cpu/rnn.cpp on a CPU; on
a GPU, csrc/cuda/rnn.cu's persistent kernel (the "cuda" backend, forward only, where it fits)
or one Triton kernel per direction (kernels/rnn.py). Variable lengths are masked inside the
loop, and zoneout and a layer-normalized LSTM's norms are fused into it. "auto" takes PyTorch's
own recurrence (cuDNN) on a GPU for now (_TORCH_KERNEL). The specification:
genfast/reference/rnn.py.

float16 and bfloat16 run in float32, as the weights' and states' gradients accumulate over
time steps.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import reference
from ..backends import BackendUnavailableError, extension, kernels, resolve, unavailable_reason
from ..reference.rnn import CellNorms
from ._autograd import eager_function
from ._checks import check_tensor

_IMPLEMENTED = frozenset({"cpu", "cuda", "triton"})
# "auto" leaves the GPU kernels out (benchmarks/results/nvidia-h100-rnn/, 2026-11-27). Triton's
# passed their tests on an H100 but run 16 to 85 times slower than cuDNN: a program holds a
# tile of rows for all the units and steps, so a batch of 64 keeps 4 of 132 SMs busy. The CUDA
# forward ran 1.8 to 5.1 times faster than cuDNN at batch 1 to 16, but its tanh was the fast
# approximation (--use_fast_math, 2^-11), out of the tests' tolerance; fixed, and its products
# register-tiled since, neither yet run there.
_UNPROVEN = frozenset({"cuda", "triton"})
# Where "auto" runs PyTorch's own fused recurrence, torch.nn.LSTM's and GRU's kernel, for what it
# covers (no zoneout, no norms): on a GPU, cuDNN, which ran 16 to 85 times faster than the
# Triton recurrences on an H100 (above), where the reference is a Python loop of a few kernels a
# step. On a CPU genfast's C++ loops run.
_TORCH_KERNEL = frozenset({"cuda"})
_GATES = {"lstm": 4, "gru": 3}


@torch.compiler.assume_constant_result
def _gpu_backend(cell: str, batch: int, hidden: int, device_index: int, float32: bool, extras: bool) -> str:
    """For the cuda backend: "cuda" where the persistent kernel runs the forward (float32, none of
    a projection, zoneout or norms, every block resident on the GPU), else "triton"; Triton runs
    every backward."""
    if reason := unavailable_reason("triton", "cuda"):
        raise BackendUnavailableError(f"genfast: the cuda backend's recurrences need Triton beside it: {reason}")
    fits = float32 and not extras and extension().persistent_recurrence_fits(cell, batch, hidden, device_index)
    return "cuda" if fits else "triton"


def _or_none(t: Tensor | None) -> Tensor | None:
    """A custom op's empty placeholder (or None) as None."""
    return None if t is None or t.shape == (0,) else t


def _forward(
    cell: str, x_proj: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor | None, bias_hh: Tensor | None,
    weight_hr: Tensor | None, lengths: Tensor | None, zoneout_h: Tensor | None, zoneout_c: Tensor | None,
    norm_hh: Tensor | None, norm_c: Tensor | None, eps: float, reverse: bool, save: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, h_n, c_n, gates, h_prev, c_prev, tanh_c, hh_norm, c_norm, rstd); what a GRU or a
    cell without norms lacks is an empty tensor. From gates on, what the backward reads, covering
    one step only without save."""
    outputs = kernels(backend, "rnn").recurrence_forward(
        cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps,
        reverse, save,
    )
    return tuple(x_proj.new_empty(0) if t is None else t for t in outputs)


def _backward(
    cell: str, x_proj: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor | None, bias_hh: Tensor | None,
    weight_hr: Tensor | None, lengths: Tensor | None, zoneout_h: Tensor | None, zoneout_c: Tensor | None,
    norm_hh: Tensor | None, norm_c: Tensor | None, eps: float, reverse: bool, d_output: Tensor, d_h_n: Tensor | None,
    d_c_n: Tensor | None, saved: list[Tensor], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_x_proj, d_weight_hh, d_bias_hh, dh0, dc0, d_weight_hr, d_norm_hh, d_norm_c); empty where
    the input is absent."""
    grads = kernels("triton" if backend == "cuda" else backend, "rnn").recurrence_backward(
        cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps,
        reverse, d_output, d_h_n, d_c_n, saved,
    )
    return tuple(x_proj.new_empty(0) if g is None else g for g in grads)


recurrence_op = torch.library.custom_op("genfast::recurrence", _forward, mutates_args=())
recurrence_backward_op = torch.library.custom_op("genfast::recurrence_backward", _backward, mutates_args=())


@recurrence_op.register_fake
def _(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps,
      reverse, save, backend):
    T, B, H = x_proj.shape[0], x_proj.shape[1], x_proj.shape[2] // _GATES[cell]
    steps = T if save else 1
    empty = lambda: x_proj.new_empty(0)  # noqa: E731
    lstm, normed = cell == "lstm", norm_hh is not None
    return (
        x_proj.new_empty(T, B, h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape) if lstm else empty(),
        x_proj.new_empty(steps, B, 4 * H), x_proj.new_empty(steps, B, h0.shape[1]),
        x_proj.new_empty(steps, B, H) if lstm else empty(), x_proj.new_empty(steps, B, H) if lstm else empty(),
        x_proj.new_empty(steps, B, 4 * H) if normed else empty(), x_proj.new_empty(steps, B, H) if normed else empty(),
        x_proj.new_empty(steps, B, 2) if normed else empty(),
    )


@recurrence_backward_op.register_fake
def _(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps,
      reverse, d_output, d_h_n, d_c_n, saved, backend):
    like = lambda t: x_proj.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    return (like(x_proj), like(weight_hh), like(bias_hh), like(h0), like(c0), like(weight_hr), like(norm_hh),
            like(norm_c))


def _setup_context(ctx, inputs, output):
    (cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps, reverse,
     _, backend) = inputs
    ctx.cell, ctx.eps, ctx.reverse, ctx.backend = cell, eps, reverse, backend
    saved = output[3:5] if cell == "gru" else output[3:10] if norm_hh is not None else output[3:7]
    ctx.save_for_backward(x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c,
                          *saved)


def _differentiate(ctx, d_output, d_h_n, d_c_n, *unused, backward):
    (x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c,
     *saved) = ctx.saved_tensors
    if d_output is None:
        d_output = x_proj.new_zeros(x_proj.shape[0], x_proj.shape[1], h0.shape[1])
    grads = backward(
        ctx.cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c,
        ctx.eps, ctx.reverse, d_output.contiguous(), None if d_h_n is None else d_h_n.contiguous(),
        None if d_c_n is None or ctx.cell == "gru" else d_c_n.contiguous(), list(saved), ctx.backend,
    )
    d_x_proj, d_weight_hh, d_bias_hh, dh0, dc0, d_weight_hr, d_norm_hh, d_norm_c = (_or_none(g) for g in grads)
    return (None, d_x_proj, d_weight_hh, dh0, dc0, d_bias_hh, d_weight_hr, None, None, None, d_norm_hh, d_norm_c,
            *(None,) * 4)


recurrence_op.register_autograd(
    functools.partial(_differentiate, backward=recurrence_backward_op), setup_context=_setup_context
)
_RecurrenceFunction = eager_function(
    "genfast.Recurrence", _forward, _setup_context, functools.partial(_differentiate, backward=_backward),
    non_differentiable=(3, 4, 5, 6, 7, 8, 9),
)


def _check_layer(cell: str, input: Tensor, h0: Tensor, c0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor,
                 bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None,
                 lengths: Tensor | None, zoneout_h: Tensor | None, zoneout_c: Tensor | None,
                 norms: CellNorms | None) -> None:
    check_tensor("input", input, min_dim=3)
    if input.dim() != 3:
        raise ValueError(f"input must be (T, B, input_size), got shape {tuple(input.shape)}")
    T, B, I = input.shape
    check_tensor("weight_ih", weight_ih, like=input)
    gates_rows = weight_ih.shape[0]
    if weight_ih.dim() != 2 or weight_ih.shape[1] != I or gates_rows % _GATES[cell]:
        raise ValueError(f"weight_ih must be ({_GATES[cell]} * hidden_size, {I}), got {tuple(weight_ih.shape)}")
    H = gates_rows // _GATES[cell]
    P = H if weight_hr is None else weight_hr.shape[0]
    expected = {"weight_hh": (weight_hh, (gates_rows, P)), "h0": (h0, (B, P)), "c0": (c0, (B, H)),
                "bias_ih": (bias_ih, (gates_rows,)), "bias_hh": (bias_hh, (gates_rows,)),
                "weight_hr": (weight_hr, (P, H)), "zoneout_h": (zoneout_h, (T, B, P)),
                "zoneout_c": (zoneout_c, (T, B, H))}
    for name, (t, shape) in expected.items():
        if t is not None:
            check_tensor(name, t, shape=shape, like=input)
            if t.dtype != input.dtype:
                raise TypeError(f"{name} must have input's dtype {input.dtype}, got {t.dtype}")
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError("bias_ih and bias_hh must be given together")
    if norms is not None:
        if cell != "lstm":
            raise ValueError("norms are a layer-normalized LSTM's; a GRU takes none")
        for name, pair, size in (("ih", norms.ih, 4 * H), ("hh", norms.hh, 4 * H), ("c", norms.c, H)):
            for part, t in zip(("weight", "bias"), pair):
                check_tensor(f"norms.{name} {part}", t, shape=(size,), like=input)
        if not norms.eps > 0:
            raise ValueError(f"norms.eps must be positive, got {norms.eps}")
    if lengths is not None:
        check_tensor("lengths", lengths, dtypes=(torch.int64, torch.int32), shape=(B,))
        if lengths.numel() and (lengths.min() < 0 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [0, {T}], got {lengths.tolist()}")


def _project(input: Tensor, weight: Tensor, bias: Tensor | None, lengths: Tensor | None) -> Tensor:
    """input (T, B, I) W^T + bias, one product for all steps; with lengths, over the steps each
    row has only (the loop never reads the others): a packed batch's shorter rows cost less."""
    if lengths is None:
        return F.linear(input, weight, bias)
    T, B, _ = input.shape
    steps = (torch.arange(T, device=input.device)[:, None] < lengths.to(input.device)[None, :]).flatten()
    rows = steps.nonzero().squeeze(1)
    projected = F.linear(input.reshape(T * B, -1).index_select(0, rows), weight, bias)
    return projected.new_zeros(T * B, weight.shape[0]).index_copy(0, rows, projected).view(T, B, -1)


def _reversed_steps(T: int, lengths: Tensor | None, device: torch.device) -> Tensor:
    """(T, B) or (T, 1) time indices that reverse each row's first lengths[b] steps and keep the
    rest in place: an involution, so one gather reverses the input and the same one the output."""
    t = torch.arange(T, device=device)[:, None]
    if lengths is None:
        return T - 1 - t
    lengths = lengths.to(device)[None, :]
    return torch.where(t < lengths, lengths - 1 - t, t)


def _torch_layer(cell: str, input: Tensor, h0: Tensor, c0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor,
                 bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None, lengths: Tensor | None,
                 reverse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction on PyTorch's own fused recurrence (cuDNN on a GPU): what _layer
    computes, for auto where that kernel is the faster (_TORCH_KERNEL). A reverse direction runs
    forward over each row's steps reversed; lengths run as a PackedSequence, a row of none keeping
    its state."""
    lstm = cell == "lstm"
    run = torch._VF.lstm if lstm else torch._VF.gru
    weights = [w for w in (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) if w is not None]
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (input, h0, *weights, *([c0] if lstm else [])))
    states = (h0[None], c0[None]) if lstm else (h0[None],)
    if reverse:
        steps = _reversed_steps(input.shape[0], lengths, input.device)
        input = input.gather(0, steps[..., None].expand_as(input))
    if lengths is None:
        output, *final = run(input, states if lstm else states[0], weights, bias_ih is not None, 1, 0.0, train, False,
                             False)
    else:
        lengths = lengths.cpu()
        packed = pack_padded_sequence(input, lengths.clamp(min=1), enforce_sorted=False)
        states = tuple(s.index_select(1, packed.sorted_indices) for s in states)
        data, *final = run(packed.data, packed.batch_sizes, states if lstm else states[0], weights,
                           bias_ih is not None, 1, 0.0, train, False)
        output, _ = pad_packed_sequence(packed._replace(data=data), total_length=input.shape[0])
        final = [f.index_select(1, packed.unsorted_indices) for f in final]
        if (lengths == 0).any():
            stepped = (lengths > 0).to(input.device)[:, None]
            output = torch.where(stepped, output, 0)
            final = [torch.where(stepped, f[0], s[0].index_select(0, packed.unsorted_indices))[None]
                     for f, s in zip(final, states)]
    if reverse:
        output = output.gather(0, steps[..., None].expand_as(output))
    return output, final[0][0], final[1][0] if lstm else None


def _inference(*tensors: Tensor | None) -> bool:
    """Whether nothing needs a gradient, eagerly: then the extension's inference entry points run."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    )


def _layer(cell: str, input: Tensor, h0: Tensor, c0: Tensor | None, weight_ih: Tensor, weight_hh: Tensor,
           bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None, lengths: Tensor | None,
           reverse: bool, zoneout_h: Tensor | None = None, zoneout_c: Tensor | None = None,
           norms: CellNorms | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    _check_layer(cell, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c,
                 norms)
    plain = zoneout_h is None and zoneout_c is None and norms is None and not torch.compiler.is_compiling()
    backend = resolve(f"{cell}_layer", input.device, _IMPLEMENTED, _UNPROVEN, _TORCH_KERNEL if plain else frozenset())
    lstm = cell == "lstm"
    if backend == "reference" or input.numel() == 0 or h0.numel() == 0:
        if lstm:
            return reference.rnn.lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                                            reverse, zoneout_h, zoneout_c, norms)
        return *reference.rnn.gru_layer(input, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse,
                                        zoneout_h), None
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, zoneout_h, zoneout_c = (
            None if t is None else t.float()
            for t in (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, zoneout_h, zoneout_c)
        )
        if norms is not None:
            norms = CellNorms(*(tuple(t.float() for t in pair) for pair in (norms.ih, norms.hh, norms.c)), norms.eps)
    if backend == "torch":
        output, h_n, c_n = _torch_layer(cell, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                                        reverse)
        return output.to(dtype), h_n.to(dtype), c_n.to(dtype) if lstm else None
    # Inference without the options projects the input inside the loop, a block of steps at a time:
    # a projection of all steps first fills a fresh (T, B, G*H) tensor, whose page faults alone
    # took 12 ms of the fastrnns forward's 120.
    if backend == "cpu" and _inference(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh) and not any(
        t is not None for t in (weight_hr, lengths, zoneout_h, zoneout_c, norms)
    ):
        output, h_n, c_n = extension().layer_inference(cell, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                                       reverse)
        return output.to(dtype), h_n.to(dtype), c_n.to(dtype) if lstm else None
    norm_hh = norm_c = None
    if lstm:
        # Both biases add to the gates before any nonlinearity: one sum, in the projection.
        bias = None if bias_ih is None else bias_ih + bias_hh
        if norms is None:
            x_proj = _project(input, weight_ih, bias, lengths)
        else:
            x_proj = F.layer_norm(_project(input, weight_ih, None, lengths), weight_ih.shape[:1], *norms.ih, norms.eps)
            x_proj = x_proj if bias is None else x_proj + bias
            norm_hh, norm_c = torch.stack(norms.hh), torch.stack(norms.c)
        bias_hh = None
    else:
        x_proj = _project(input, weight_ih, bias_ih, lengths)
        if bias_hh is None:  # the kernel reads a GRU's b_hn inside r * (h W_hn^T + b_hn)
            bias_hh = x_proj.new_zeros(x_proj.shape[-1])
    if backend == "cuda":
        backend = _gpu_backend(cell, x_proj.shape[1], x_proj.shape[2] // _GATES[cell], input.device.index,
                               x_proj.dtype == torch.float32,
                               any(t is not None for t in (weight_hr, zoneout_h, zoneout_c, norm_hh)))
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_proj, weight_hh, h0, c0, bias_hh, weight_hr, norm_hh, norm_c)
    )
    args = (
        cell, x_proj.contiguous(), weight_hh.contiguous(), h0.contiguous(), None if c0 is None else c0.contiguous(),
        None if bias_hh is None else bias_hh.contiguous(), None if weight_hr is None else weight_hr.contiguous(),
        None if lengths is None else lengths.to(x_proj.device, torch.int64).contiguous(),
        *(None if t is None else t.contiguous() for t in (zoneout_h, zoneout_c, norm_hh, norm_c)),
        1e-5 if norms is None else float(norms.eps), reverse, save, backend,
    )
    function = recurrence_op if torch.compiler.is_compiling() else _RecurrenceFunction.call
    output, h_n, c_n = function(*args)[:3]
    return output.to(dtype), h_n.to(dtype), c_n.to(dtype) if lstm else None


def lstm_layer(input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
               bias_ih: Tensor | None = None, bias_hh: Tensor | None = None, weight_hr: Tensor | None = None,
               lengths: Tensor | None = None, reverse: bool = False, *, zoneout_h: Tensor | None = None,
               zoneout_c: Tensor | None = None, norms: CellNorms | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one LSTM layer over input (T, B, I) from states h0 (B, P) and c0 (B, H),
    with torch.nn.LSTM's weights of that layer and direction: (output (T, B, P), h_n, c_n).
    lengths (B,) gives each row's number of steps (past them its output is 0 and its state
    stays); reverse runs each row from its last step back. zoneout_h (T, B, P) and zoneout_c
    (T, B, H): the share of each state unit step t keeps from the step before, 0 or 1 drawn
    from Bernoulli(p) in training, p in evaluation (genfast/reference/rnn.py; not differentiated).
    norms (genfast.ops.CellNorms) make it a layer-normalized LSTM, PyTorch's fastrnns
    LayerNormLSTMCell."""
    check_tensor("c0", c0)
    return _layer("lstm", input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths, reverse,
                  zoneout_h, zoneout_c, norms)


def gru_layer(input: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None = None,
              bias_hh: Tensor | None = None, lengths: Tensor | None = None,
              reverse: bool = False, *, zoneout_h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One direction of one GRU layer over input (T, B, I) from h0 (B, H), with torch.nn.GRU's
    weights of that layer and direction: (output (T, B, H), h_n); lengths, reverse and
    zoneout_h as lstm_layer's."""
    return _layer("gru", input, h0, None, weight_ih, weight_hh, bias_ih, bias_hh, None, lengths, reverse,
                  zoneout_h)[:2]


def _native_cell(cell: str, *tensors: Tensor | None) -> bool:
    """Whether a cell step runs as one call of the extension's cell_forward: on a CPU, in float32
    or float64, where nothing needs a gradient. Its team of threads projects the input too, where
    the ATen product alone took longer than the whole step (at batch 16, hidden 256: 119 us against
    100 for a GRU step). Anything else runs as a layer of one step."""
    input, h = tensors[:2]
    return (
        all(t is None or isinstance(t, Tensor) for t in tensors)  # else the layer's checks say what is wrong
        and input.is_cpu and input.dtype in (torch.float32, torch.float64)
        and input.numel() > 0 and h.numel() > 0 and _inference(*tensors)
        and resolve(f"{cell}_cell", input.device, _IMPLEMENTED, _UNPROVEN) == "cpu"
    )


def lstm_cell(input: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One LSTM step, torch.nn.LSTMCell's: input (B, I), h and c (B, H) -> (h', c')."""
    if _native_cell("lstm", input, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
        return tuple(extension().cell_forward("lstm", input, h, c, weight_ih, weight_hh, bias_ih, bias_hh))
    _, h, c = lstm_layer(input[None], h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    return h, c


def gru_cell(input: Tensor, h: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None = None,
             bias_hh: Tensor | None = None) -> Tensor:
    """One GRU step, torch.nn.GRUCell's: input (B, I), h (B, H) -> h'."""
    if _native_cell("gru", input, h, weight_ih, weight_hh, bias_ih, bias_hh):
        return extension().cell_forward("gru", input, h, None, weight_ih, weight_hh, bias_ih, bias_hh)[0]
    return gru_layer(input[None], h, weight_ih, weight_hh, bias_ih, bias_hh)[1]
