"""LSTM and GRU recurrences as Triton kernels and their launchers: one direction of one
layer after the input projection, computing what csrc/cpu/rnn.h's recurrence_forward and
recurrence_backward compute (the formulas: genfast/reference/rnn.py).

The whole time loop is one launch. A program owns a block of batch rows and every hidden
unit, so a step needs no other program's results: it runs the step's products and gate
math tile by tile, writes the new state into the other half of a double buffer, and
waits at a barrier for its threads before the next step reads it. Those state reads
bypass L1 (.cg), where a line read before the step could still sit. The products read
the recurrent weights from L2 at every step; the grid is the batch's blocks of rows, so
this suits small batches, where cuDNN is weakest. The backward runs the steps in reverse
the same way, and leaves the weights' gradients to one product over all steps.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _product(acc, a_ptr, a_stride, rows, in_rows, K, w_ptr, w_k_stride, w_n_stride, cols, in_cols,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + A[rows, :K] W[:K, cols]: A row-major with row stride a_stride (a buffer this
    kernel writes, read past L1), W's element (k, n) at w_ptr + k w_k_stride + n w_n_stride."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * a_stride + ks[None, :], mask=in_rows[:, None] & (ks[None, :] < K),
                    other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + ks[:, None] * w_k_stride + cols[None, :] * w_n_stride,
                    mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    return acc


@triton.jit
def _batch_rows(B, T, lengths_ptr, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows, which of them exist, and their lengths (T without lengths)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_rows = rows < B
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=in_rows, other=0)
    return rows, in_rows, length


@triton.jit
def _step(s, T, B, P, H, rows, in_rows, length, h_ptr, c_ptr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr):
    """Loop iteration s's time step t; its live rows (those whose sequences reach t, of lengths
    `length`); the rows' indices among every step's, t B + row; and the halves of the double
    buffers h (2, B, P) and c (2, B, H) the step reads and writes."""
    t = s
    if REVERSE:
        t = T - 1 - s
    live = in_rows
    if HAS_LENGTHS:
        live = t < length
    read, write = s % 2, (s + 1) % 2
    return (t, live, t.to(tl.int64) * B + rows, h_ptr + read * B * P, h_ptr + write * B * P, c_ptr + read * B * H,
            c_ptr + write * B * H)


@triton.jit
def _recurrence_forward_kernel(
    x_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, lengths_ptr, zoneout_h_ptr, zoneout_c_ptr, h_state_ptr, c_state_ptr, m_ptr,
    out_ptr, gates_ptr, h_prev_ptr, c_prev_ptr, tanh_c_ptr,
    T, B, H, P,
    LSTM: tl.constexpr, PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT_H: tl.constexpr,
    ZONEOUT_C: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Every step of BLOCK_B batch rows. Fuses the recurrent products with the gate math, the
    cell update, the projection (PROJ) and the lengths' masking. Reads x_proj (T, B, G H),
    the weights and the states of the double buffers h_state (2, B, P) and c_state (2, B, H),
    half 0 holding h0 and c0; writes the other half each step, the output (T, B, P) and with
    SAVE what the backward reads: gates (T, B, 4H: LSTM i, f, g, o; GRU r, z, n and
    h W_hn^T + b_hn), h_prev (T, B, P), c_prev and tanh_c (T, B, H). m (B, H) holds o tanh(c)
    for the projection. With ZONEOUT_H / ZONEOUT_C, reads the zoneout masks (T, B, P) and
    (T, B, H) and mixes each new state with the one before."""
    G: tl.constexpr = 4 if LSTM else 3
    rows, in_rows, length = _batch_rows(B, T, lengths_ptr, HAS_LENGTHS, BLOCK_B)
    for s in range(T):
        t, live, step_rows, h_read, h_write, c_read, c_write = _step(
            s, T, B, P, H, rows, in_rows, length, h_state_ptr, c_state_ptr, HAS_LENGTHS, REVERSE
        )
        for u0 in range(0, H, BLOCK_U):
            units = u0 + tl.arange(0, BLOCK_U)
            in_units = units < H
            tile = in_rows[:, None] & in_units[None, :]
            x = x_ptr + step_rows[:, None] * (G * H) + units[None, :]
            saved = gates_ptr + step_rows[:, None] * (4 * H) + units[None, :]
            state = rows[:, None] * H + units[None, :]
            pre_0 = _product(tl.load(x, mask=tile, other=0.0), h_read, P, rows, in_rows, P, w_hh_ptr, 1, P, units,
                             in_units, PRECISION, BLOCK_K)
            pre_1 = _product(tl.load(x + H, mask=tile, other=0.0), h_read, P, rows, in_rows, P, w_hh_ptr + H * P, 1,
                             P, units, in_units, PRECISION, BLOCK_K)
            pre_2 = _product(tl.zeros_like(pre_0), h_read, P, rows, in_rows, P, w_hh_ptr + 2 * H * P, 1, P, units,
                             in_units, PRECISION, BLOCK_K)
            if not PROJ:
                h_old = tl.load(h_read + state, mask=tile, other=0.0, cache_modifier=".cg")
            if LSTM:
                pre_3 = _product(tl.load(x + 3 * H, mask=tile, other=0.0), h_read, P, rows, in_rows, P,
                                 w_hh_ptr + 3 * H * P, 1, P, units, in_units, PRECISION, BLOCK_K)
                i = tl.sigmoid(pre_0)
                f = tl.sigmoid(pre_1)
                g = _tanh(pre_2 + tl.load(x + 2 * H, mask=tile, other=0.0))
                o = tl.sigmoid(pre_3)
                c_old = tl.load(c_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                c = f * c_old + i * g
                tanh_c = _tanh(c)
                m = o * tanh_c
                c_kept = c
                if ZONEOUT_C:
                    share = tl.load(zoneout_c_ptr + step_rows[:, None] * H + units[None, :], mask=tile, other=0.0)
                    c_kept = c + share * (c_old - c)
                tl.store(c_write + state, tl.where(live[:, None], c_kept, c_old), mask=tile)
                if SAVE:
                    tl.store(saved, i, mask=tile)
                    tl.store(saved + H, f, mask=tile)
                    tl.store(saved + 2 * H, g, mask=tile)
                    tl.store(saved + 3 * H, o, mask=tile)
                    tl.store(c_prev_ptr + step_rows[:, None] * H + units[None, :], c_old, mask=tile)
                    tl.store(tanh_c_ptr + step_rows[:, None] * H + units[None, :], tanh_c, mask=tile)
            else:
                bias = b_hh_ptr + units[None, :]
                r = tl.sigmoid(pre_0 + tl.load(bias, mask=in_units[None, :], other=0.0))
                z = tl.sigmoid(pre_1 + tl.load(bias + H, mask=in_units[None, :], other=0.0))
                hidden_n = pre_2 + tl.load(bias + 2 * H, mask=in_units[None, :], other=0.0)
                n = _tanh(tl.load(x + 2 * H, mask=tile, other=0.0) + r * hidden_n)
                m = (1.0 - z) * n + z * h_old
                if SAVE:
                    tl.store(saved, r, mask=tile)
                    tl.store(saved + H, z, mask=tile)
                    tl.store(saved + 2 * H, n, mask=tile)
                    tl.store(saved + 3 * H, hidden_n, mask=tile)
            if PROJ:
                tl.store(m_ptr + state, m, mask=tile)
            else:
                if ZONEOUT_H:
                    share = tl.load(zoneout_h_ptr + step_rows[:, None] * P + units[None, :], mask=tile, other=0.0)
                    m = m + share * (h_old - m)
                tl.store(h_write + state, tl.where(live[:, None], m, h_old), mask=tile)
                tl.store(out_ptr + step_rows[:, None] * P + units[None, :], tl.where(live[:, None], m, 0.0),
                         mask=tile)
                if SAVE:
                    tl.store(h_prev_ptr + step_rows[:, None] * P + units[None, :], h_old, mask=tile)
        if PROJ:
            tl.debug_barrier()
            for p0 in range(0, P, BLOCK_U):
                cols = p0 + tl.arange(0, BLOCK_U)
                in_cols = cols < P
                tile = in_rows[:, None] & in_cols[None, :]
                h = _product(tl.zeros((BLOCK_B, BLOCK_U), h_state_ptr.dtype.element_ty), m_ptr, H, rows, in_rows, H,
                             w_hr_ptr, 1, H, cols, in_cols, PRECISION, BLOCK_K)
                h_old = tl.load(h_read + rows[:, None] * P + cols[None, :], mask=tile, other=0.0,
                                cache_modifier=".cg")
                if ZONEOUT_H:
                    share = tl.load(zoneout_h_ptr + step_rows[:, None] * P + cols[None, :], mask=tile, other=0.0)
                    h = h + share * (h_old - h)
                tl.store(h_write + rows[:, None] * P + cols[None, :], tl.where(live[:, None], h, h_old), mask=tile)
                tl.store(out_ptr + step_rows[:, None] * P + cols[None, :], tl.where(live[:, None], h, 0.0), mask=tile)
                if SAVE:
                    tl.store(h_prev_ptr + step_rows[:, None] * P + cols[None, :], h_old, mask=tile)
        tl.debug_barrier()


@triton.jit
def _recurrence_backward_kernel(
    w_hh_ptr, w_hr_ptr, lengths_ptr, zoneout_h_ptr, zoneout_c_ptr, gates_ptr, h_prev_ptr, c_prev_ptr, tanh_c_ptr,
    d_out_ptr, dh_state_ptr, dc_state_ptr, carry_ptr, dh_ptr, d_x_ptr, d_hidden_ptr, d_h_steps_ptr,
    T, B, H, P,
    LSTM: tl.constexpr, PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT_H: tl.constexpr,
    ZONEOUT_C: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Every step of BLOCK_B batch rows, last first: the gradients of the pre-activation gates
    and of the states entering each step. Reads the forward's saved tensors, d_output and the
    state gradients in the double buffers dh_state (2, B, P) and dc_state (2, B, H), half 0
    holding those of h_n and c_n; writes the other half each step, d_x (T, B, G H), the
    gradient of x_proj, and for a GRU d_hidden (T, B, 3H), that of h W_hh^T + b_hh (an LSTM's
    is d_x). With PROJ, dh (B, P) holds the step's gradient of h and d_h_steps (T, B, P) keeps
    it for W_hr's gradient. carry (B, P) holds the part of dh_prev that skips W_hh (zoneout's
    share included)."""
    G: tl.constexpr = 4 if LSTM else 3
    rows, in_rows, length = _batch_rows(B, T, lengths_ptr, HAS_LENGTHS, BLOCK_B)
    for s in range(T):
        t, live, step_rows, dh_read, dh_write, dc_read, dc_write = _step(
            s, T, B, P, H, rows, in_rows, length, dh_state_ptr, dc_state_ptr, HAS_LENGTHS, not REVERSE
        )
        if PROJ:
            # A finished row's output is a constant 0 and its state passes through unchanged.
            for p0 in range(0, P, BLOCK_U):
                cols = p0 + tl.arange(0, BLOCK_U)
                tile = in_rows[:, None] & (cols[None, :] < P)
                at = rows[:, None] * P + cols[None, :]
                dh_in = tl.load(dh_read + at, mask=tile, other=0.0, cache_modifier=".cg")
                dh = tl.where(live[:, None], dh_in + tl.load(d_out_ptr + step_rows[:, None] * P + cols[None, :],
                                                             mask=tile, other=0.0), 0.0)
                kept = tl.zeros_like(dh)
                if ZONEOUT_H:
                    kept = dh * tl.load(zoneout_h_ptr + step_rows[:, None] * P + cols[None, :], mask=tile, other=0.0)
                    dh -= kept
                tl.store(dh_ptr + at, dh, mask=tile)
                tl.store(d_h_steps_ptr + step_rows[:, None] * P + cols[None, :], dh, mask=tile)
                tl.store(carry_ptr + at, tl.where(live[:, None], kept, dh_in), mask=tile)
            tl.debug_barrier()
        for u0 in range(0, H, BLOCK_U):
            units = u0 + tl.arange(0, BLOCK_U)
            in_units = units < H
            tile = in_rows[:, None] & in_units[None, :]
            state = rows[:, None] * H + units[None, :]
            if PROJ:
                dm = _product(tl.zeros((BLOCK_B, BLOCK_U), dh_state_ptr.dtype.element_ty), dh_ptr, P, rows, in_rows,
                              P, w_hr_ptr, H, 1, units, in_units, PRECISION, BLOCK_K)
            else:
                dh_in = tl.load(dh_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                dm = dh_in + tl.where(live[:, None], tl.load(d_out_ptr + step_rows[:, None] * P + units[None, :],
                                                             mask=tile, other=0.0), 0.0)
                kept = tl.zeros_like(dm)
                if ZONEOUT_H:
                    kept = dm * tl.load(zoneout_h_ptr + step_rows[:, None] * P + units[None, :], mask=tile, other=0.0)
                    dm -= kept
            saved = gates_ptr + step_rows[:, None] * (4 * H) + units[None, :]
            grads = d_x_ptr + step_rows[:, None] * (G * H) + units[None, :]
            if LSTM:
                i = tl.load(saved, mask=tile, other=0.0)
                f = tl.load(saved + H, mask=tile, other=0.0)
                g = tl.load(saved + 2 * H, mask=tile, other=0.0)
                o = tl.load(saved + 3 * H, mask=tile, other=0.0)
                tanh_c = tl.load(tanh_c_ptr + step_rows[:, None] * H + units[None, :], mask=tile, other=0.0)
                c_old = tl.load(c_prev_ptr + step_rows[:, None] * H + units[None, :], mask=tile, other=0.0)
                dc_in = tl.load(dc_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                kept_c = tl.zeros_like(dc_in)
                if ZONEOUT_C:
                    kept_c = dc_in * tl.load(zoneout_c_ptr + step_rows[:, None] * H + units[None, :], mask=tile,
                                             other=0.0)
                dc = dc_in - kept_c + dm * o * (1.0 - tanh_c * tanh_c)
                alive = live[:, None]
                tl.store(grads, tl.where(alive, dc * g * i * (1.0 - i), 0.0), mask=tile)
                tl.store(grads + H, tl.where(alive, dc * c_old * f * (1.0 - f), 0.0), mask=tile)
                tl.store(grads + 2 * H, tl.where(alive, dc * i * (1.0 - g * g), 0.0), mask=tile)
                tl.store(grads + 3 * H, tl.where(alive, dm * tanh_c * o * (1.0 - o), 0.0), mask=tile)
                tl.store(dc_write + state, tl.where(alive, dc * f + kept_c, dc_in), mask=tile)
                if not PROJ:
                    tl.store(carry_ptr + state, tl.where(alive, kept, dh_in), mask=tile)
            else:
                r = tl.load(saved, mask=tile, other=0.0)
                z = tl.load(saved + H, mask=tile, other=0.0)
                n = tl.load(saved + 2 * H, mask=tile, other=0.0)
                hidden_n = tl.load(saved + 3 * H, mask=tile, other=0.0)
                h_old = tl.load(h_prev_ptr + step_rows[:, None] * P + units[None, :], mask=tile, other=0.0)
                alive = live[:, None]
                d_n = tl.where(alive, dm * (1.0 - z) * (1.0 - n * n), 0.0)
                d_z = tl.where(alive, dm * (h_old - n) * z * (1.0 - z), 0.0)
                d_r = d_n * hidden_n * r * (1.0 - r)
                hidden_grads = d_hidden_ptr + step_rows[:, None] * (3 * H) + units[None, :]
                tl.store(grads, d_r, mask=tile)
                tl.store(grads + H, d_z, mask=tile)
                tl.store(grads + 2 * H, d_n, mask=tile)
                tl.store(hidden_grads, d_r, mask=tile)
                tl.store(hidden_grads + H, d_z, mask=tile)
                tl.store(hidden_grads + 2 * H, d_n * r, mask=tile)
                tl.store(carry_ptr + state, tl.where(alive, dm * z + kept, dh_in), mask=tile)
        tl.debug_barrier()
        for p0 in range(0, P, BLOCK_U):
            cols = p0 + tl.arange(0, BLOCK_U)
            in_cols = cols < P
            tile = in_rows[:, None] & in_cols[None, :]
            at = rows[:, None] * P + cols[None, :]
            carried = tl.load(carry_ptr + at, mask=tile, other=0.0, cache_modifier=".cg")
            dh_prev = _product(carried, d_hidden_ptr + t.to(tl.int64) * B * G * H, G * H, rows, in_rows, G * H,
                               w_hh_ptr, P, 1, cols, in_cols, PRECISION, BLOCK_K)
            tl.store(dh_write + at, dh_prev, mask=tile)
        tl.debug_barrier()


def _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, reverse):
    """The kernels' shared compile-time flags and tile sizes. tl.dot takes no side under 16."""
    return dict(
        LSTM=cell == "lstm", PROJ=weight_hr is not None, HAS_LENGTHS=lengths is not None,
        ZONEOUT_H=zoneout_h is not None, ZONEOUT_C=zoneout_c is not None, REVERSE=reverse,
        PRECISION="ieee", BLOCK_B=16, BLOCK_U=16, BLOCK_K=32,
        num_warps=4,
    )


def _masks(x_proj, zoneout_h, zoneout_c):
    """The zoneout masks as kernel arguments, x_proj standing in for an absent one (never read)."""
    return (x_proj if zoneout_h is None else zoneout_h), (x_proj if zoneout_c is None else zoneout_c)


def recurrence_forward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh,
                       norm_c, eps, reverse, save):
    """Returns output (T, B, P), h_n, c_n (None for a GRU) and gates, h_prev, c_prev, tanh_c (the
    last two None for a GRU), those four covering one step, unwritten, without save, and three
    Nones (a layer-normalized LSTM's saved tensors: these kernels have no norms); the
    arguments as csrc/cpu/rnn.h's Recurrence (contiguous, one float dtype)."""
    if norm_hh is not None or norm_c is not None:
        raise NotImplementedError("the Triton recurrence has no layer-normalized LSTM; the cpu backend has")
    T, B, gate_columns = x_proj.shape
    lstm = cell == "lstm"
    H = gate_columns // (4 if lstm else 3)
    P = h0.shape[1]
    steps = T if save else 1
    h_state = x_proj.new_empty(2, B, P)
    h_state[0] = h0
    c_state = x_proj.new_empty(2, B, H)
    if lstm:
        c_state[0] = c0
    output = x_proj.new_empty(T, B, P)
    gates, h_prev = x_proj.new_empty(steps, B, 4 * H), x_proj.new_empty(steps, B, P)
    c_prev, tanh_c = (x_proj.new_empty(steps, B, H) for _ in range(2))
    m = x_proj.new_empty(B, H) if weight_hr is not None else x_proj
    settings = _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, reverse)
    _recurrence_forward_kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](
        x_proj, weight_hh, x_proj if bias_hh is None else bias_hh, weight_hh if weight_hr is None else weight_hr,
        h0 if lengths is None else lengths, *_masks(x_proj, zoneout_h, zoneout_c), h_state, c_state, m, output, gates,
        h_prev, c_prev, tanh_c,
        T, B, H, P, SAVE=save, **settings,
    )
    h_n, c_n = h_state[T % 2].clone(), c_state[T % 2].clone() if lstm else None
    return output, h_n, c_n, gates, h_prev, c_prev if lstm else None, tanh_c if lstm else None, None, None, None


def recurrence_backward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh,
                        norm_c, eps, reverse, d_output, d_h_n, d_c_n, saved):
    """Returns the gradients of x_proj, weight_hh, bias_hh, h0, c0, weight_hr and the two norms
    (None where the input is absent) from those of output, h_n and c_n (None: zero) and
    recurrence_forward's saved tensors (gates, h_prev and for an LSTM c_prev, tanh_c)."""
    T, B, gate_columns = x_proj.shape
    lstm = cell == "lstm"
    H = gate_columns // (4 if lstm else 3)
    P = h0.shape[1]
    gates, h_prev = saved[:2]
    c_prev, tanh_c = saved[2:] if lstm else (gates, gates)
    dh_state = x_proj.new_zeros(2, B, P)
    if d_h_n is not None:
        dh_state[0] = d_h_n
    dc_state = x_proj.new_zeros(2, B, H)
    if d_c_n is not None:
        dc_state[0] = d_c_n
    carry = x_proj.new_empty(B, P)
    d_x = torch.empty_like(x_proj)
    d_hidden = d_x if lstm else x_proj.new_empty(T, B, 3 * H)
    proj = weight_hr is not None
    dh, d_h_steps = (x_proj.new_empty(B, P), x_proj.new_empty(T, B, P)) if proj else (carry, carry)
    settings = _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, reverse)
    _recurrence_backward_kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](
        weight_hh, weight_hh if weight_hr is None else weight_hr, h0 if lengths is None else lengths,
        *_masks(x_proj, zoneout_h, zoneout_c), gates, h_prev,
        c_prev, tanh_c, d_output, dh_state, dc_state, carry, dh, d_x, d_hidden, d_h_steps, T, B, H, P, **settings,
    )
    d_weight_hh = d_hidden.reshape(T * B, -1).t() @ h_prev.reshape(T * B, P)
    d_bias_hh = None if bias_hh is None else d_hidden.sum((0, 1))
    d_weight_hr = None
    if proj:
        cell_output = gates[..., 3 * H:] * tanh_c
        d_weight_hr = d_h_steps.reshape(T * B, P).t() @ cell_output.reshape(T * B, H)
    dc0 = dc_state[T % 2].clone() if lstm else None
    return d_x, d_weight_hh, d_bias_hh, dh_state[T % 2].clone(), dc0, d_weight_hr, None, None
