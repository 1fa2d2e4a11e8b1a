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
def _row_stats(total, squares, count, eps):
    """Mean and reciprocal standard deviation of rows from their sums and sums of squares."""
    mean = total / count
    return mean, 1.0 / tl.sqrt(tl.maximum(squares / count - mean * mean, 0.0) + eps)


@triton.jit
def _normed_gate(scratch_ptr, norm_ptr, g, H, rows, units, tile, mean, rstd, saved_ptr, step_rows, SAVE: tl.constexpr):
    """LN_hh of gate g's tile of h W_hh^T (kept raw in scratch (B, 6H)), saving the normalized
    values into hh_norm (T, B, 4H) with SAVE."""
    columns = g * H + units[None, :]
    raw = tl.load(scratch_ptr + rows[:, None] * (6 * H) + columns, mask=tile, other=0.0, cache_modifier=".cg")
    normalized = (raw - mean[:, None]) * rstd[:, None]
    if SAVE:
        tl.store(saved_ptr + step_rows[:, None] * (4 * H) + columns, normalized, mask=tile)
    weight = tl.load(norm_ptr + columns, mask=tile, other=0.0)
    return normalized * weight + tl.load(norm_ptr + 4 * H + columns, mask=tile, other=0.0)


@triton.jit
def _norm_sums(total, dot, d_gate, norm_ptr, normalized_ptr, g, H, units, step_rows, tile):
    """The running sums of LN_hh's backward after gate g's tile of gradients: of d weight and of
    d weight times the normalized value."""
    columns = g * H + units[None, :]
    scaled = d_gate * tl.load(norm_ptr + columns, mask=tile, other=0.0)
    normalized = tl.load(normalized_ptr + step_rows[:, None] * (4 * H) + columns, mask=tile, other=0.0)
    return total + tl.sum(scaled, 1), dot + tl.sum(scaled * normalized, 1)


@triton.jit
def _emit_hidden(m, h_old, live, tile, state, step_rows, units, P, h_write, out_ptr, h_prev_ptr, m_ptr,
                 zoneout_h_ptr, PROJ: tl.constexpr, ZONEOUT_H: tl.constexpr, SAVE: tl.constexpr):
    """A tile of the cell's output m: kept for the projection (PROJ), or, zoned out, the new
    state, the step's output and (SAVE) the state it replaces."""
    if PROJ:
        tl.store(m_ptr + state, m, mask=tile)
    else:
        if ZONEOUT_H:
            share = tl.load(zoneout_h_ptr + step_rows[:, None] * P + units[None, :], mask=tile, other=0.0)
            m = m + share * (h_old - m)
        tl.store(h_write + state, tl.where(live[:, None], m, h_old), mask=tile)
        tl.store(out_ptr + step_rows[:, None] * P + units[None, :], tl.where(live[:, None], m, 0.0), mask=tile)
        if SAVE:
            tl.store(h_prev_ptr + step_rows[:, None] * P + units[None, :], h_old, mask=tile)


# EPS, the norms' epsilon, is a constexpr: a float argument reaches a kernel in float32, which
# put a float64 layer-normalized LSTM 2.5e-10 off on an H100.
@triton.jit
def _recurrence_forward_kernel(
    x_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, lengths_ptr, zoneout_h_ptr, zoneout_c_ptr, norm_hh_ptr, norm_c_ptr,
    h_state_ptr, c_state_ptr, m_ptr, scratch_ptr, out_ptr, gates_ptr, h_prev_ptr, c_prev_ptr, tanh_c_ptr, hh_norm_ptr,
    c_norm_ptr, rstd_ptr, T, B, H, P, EPS: tl.constexpr,
    LSTM: tl.constexpr, PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT_H: tl.constexpr,
    ZONEOUT_C: tl.constexpr, NORM: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Every step of BLOCK_B batch rows. Fuses the recurrent products with the gate math, the
    cell update, the projection (PROJ) and the lengths' masking. Reads x_proj (T, B, G H),
    the weights and the states of the double buffers h_state (2, B, P) and c_state (2, B, H),
    half 0 holding h0 and c0; writes the other half each step, the output (T, B, P) and with
    SAVE what the backward reads: gates (T, B, 4H: LSTM i, f, g, o; GRU r, z, n and
    h W_hn^T + b_hn), h_prev (T, B, P), c_prev and tanh_c (T, B, H). m (B, H) holds o tanh(c)
    for the projection. With ZONEOUT_H / ZONEOUT_C, reads the zoneout masks (T, B, P) and
    (T, B, H) and mixes each new state with the one before. With NORM (an LSTM's LN_hh and LN_c,
    norm_hh (2, 4H) and norm_c (2, H): weights and biases), a step takes three passes over the
    units, as each norm needs its whole row first: scratch (B, 6H) holds h W_hh^T, the new cell
    and o between them, and SAVE also writes hh_norm (T, B, 4H), c_norm (T, B, H) and
    rstd (T, B, 2)."""
    G: tl.constexpr = 4 if LSTM else 3
    rows, in_rows, length = _batch_rows(B, T, lengths_ptr, HAS_LENGTHS, BLOCK_B)
    for s in range(T):
        t, live, step_rows, h_read, h_write, c_read, c_write = _step(
            s, T, B, P, H, rows, in_rows, length, h_state_ptr, c_state_ptr, HAS_LENGTHS, REVERSE
        )
        if NORM:
            # Pass 1: h W_hh^T, raw, and its rows' moments.
            total = tl.zeros((BLOCK_B,), h_state_ptr.dtype.element_ty)
            squares = tl.zeros_like(total)
            for u0 in range(0, H, BLOCK_U):
                units = u0 + tl.arange(0, BLOCK_U)
                in_units = units < H
                for g in tl.static_range(4):
                    raw = _product(tl.zeros((BLOCK_B, BLOCK_U), h_state_ptr.dtype.element_ty), h_read, P, rows,
                                   in_rows, P, w_hh_ptr + g * H * P, 1, P, units, in_units, PRECISION, BLOCK_K)
                    tl.store(scratch_ptr + rows[:, None] * (6 * H) + g * H + units[None, :], raw,
                             mask=in_rows[:, None] & in_units[None, :])
                    total += tl.sum(raw, 1)
                    squares += tl.sum(raw * raw, 1)
            mean_hh, rstd_hh = _row_stats(total, squares, 4 * H, EPS)
            cell_total = tl.zeros_like(total)
            cell_squares = tl.zeros_like(total)
            tl.debug_barrier()
        for u0 in range(0, H, BLOCK_U):
            units = u0 + tl.arange(0, BLOCK_U)
            in_units = units < H
            tile = in_rows[:, None] & in_units[None, :]
            x = x_ptr + step_rows[:, None] * (G * H) + units[None, :]
            saved = gates_ptr + step_rows[:, None] * (4 * H) + units[None, :]
            state = rows[:, None] * H + units[None, :]
            if NORM:
                # Pass 2: the gates from the normalized products, the new cell and its moments.
                pre_0 = tl.load(x, mask=tile, other=0.0) + _normed_gate(
                    scratch_ptr, norm_hh_ptr, 0, H, rows, units, tile, mean_hh, rstd_hh, hh_norm_ptr, step_rows, SAVE)
                pre_1 = tl.load(x + H, mask=tile, other=0.0) + _normed_gate(
                    scratch_ptr, norm_hh_ptr, 1, H, rows, units, tile, mean_hh, rstd_hh, hh_norm_ptr, step_rows, SAVE)
                pre_2 = _normed_gate(scratch_ptr, norm_hh_ptr, 2, H, rows, units, tile, mean_hh, rstd_hh, hh_norm_ptr,
                                     step_rows, SAVE)
                pre_3 = tl.load(x + 3 * H, mask=tile, other=0.0) + _normed_gate(
                    scratch_ptr, norm_hh_ptr, 3, H, rows, units, tile, mean_hh, rstd_hh, hh_norm_ptr, step_rows, SAVE)
            else:
                pre_0 = _product(tl.load(x, mask=tile, other=0.0), h_read, P, rows, in_rows, P, w_hh_ptr, 1, P,
                                 units, in_units, PRECISION, BLOCK_K)
                pre_1 = _product(tl.load(x + H, mask=tile, other=0.0), h_read, P, rows, in_rows, P,
                                 w_hh_ptr + H * P, 1, P, units, in_units, PRECISION, BLOCK_K)
                pre_2 = _product(tl.zeros_like(pre_0), h_read, P, rows, in_rows, P, w_hh_ptr + 2 * H * P, 1, P,
                                 units, in_units, PRECISION, BLOCK_K)
                if LSTM:
                    pre_3 = _product(tl.load(x + 3 * H, mask=tile, other=0.0), h_read, P, rows, in_rows, P,
                                     w_hh_ptr + 3 * H * P, 1, P, units, in_units, PRECISION, BLOCK_K)
            h_old = tl.zeros_like(pre_0)  # the state this tile replaces: none here with a projection
            if not PROJ:
                h_old = tl.load(h_read + state, mask=tile, other=0.0, cache_modifier=".cg")
            if LSTM:
                i = tl.sigmoid(pre_0)
                f = tl.sigmoid(pre_1)
                g = _tanh(pre_2 + tl.load(x + 2 * H, mask=tile, other=0.0))
                o = tl.sigmoid(pre_3)
                c_old = tl.load(c_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                c = f * c_old + i * g
                if NORM:
                    cell = scratch_ptr + rows[:, None] * (6 * H) + 4 * H + units[None, :]
                    tl.store(cell, c, mask=tile)
                    tl.store(cell + H, o, mask=tile)
                    cell_total += tl.sum(tl.where(tile, c, 0.0), 1)
                    cell_squares += tl.sum(tl.where(tile, c * c, 0.0), 1)
                else:
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
                    if not NORM:
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
            if not NORM:
                _emit_hidden(m, h_old, live, tile, state, step_rows, units, P, h_write, out_ptr, h_prev_ptr, m_ptr,
                             zoneout_h_ptr, PROJ, ZONEOUT_H, SAVE)
        if NORM:
            # Pass 3: LN_c of the new cell, and the hidden state from it.
            mean_c, rstd_c = _row_stats(cell_total, cell_squares, H, EPS)
            if SAVE:
                tl.store(rstd_ptr + step_rows * 2, rstd_hh, mask=in_rows)
                tl.store(rstd_ptr + step_rows * 2 + 1, rstd_c, mask=in_rows)
            tl.debug_barrier()
            for u0 in range(0, H, BLOCK_U):
                units = u0 + tl.arange(0, BLOCK_U)
                tile = in_rows[:, None] & (units[None, :] < H)
                state = rows[:, None] * H + units[None, :]
                cell = scratch_ptr + rows[:, None] * (6 * H) + 4 * H + units[None, :]
                normalized = (tl.load(cell, mask=tile, other=0.0, cache_modifier=".cg") - mean_c[:, None]) * rstd_c[:, None]
                weight = tl.load(norm_c_ptr + units[None, :], mask=tile, other=0.0)
                tanh_c = _tanh(normalized * weight + tl.load(norm_c_ptr + H + units[None, :], mask=tile, other=0.0))
                m = tl.load(cell + H, mask=tile, other=0.0, cache_modifier=".cg") * tanh_c
                if SAVE:
                    tl.store(tanh_c_ptr + step_rows[:, None] * H + units[None, :], tanh_c, mask=tile)
                    tl.store(c_norm_ptr + step_rows[:, None] * H + units[None, :], normalized, mask=tile)
                h_old = tl.zeros_like(m)
                if not PROJ:
                    h_old = tl.load(h_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                _emit_hidden(m, h_old, live, tile, state, step_rows, units, P, h_write, out_ptr, h_prev_ptr, m_ptr,
                             zoneout_h_ptr, PROJ, ZONEOUT_H, SAVE)
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
    w_hh_ptr, w_hr_ptr, lengths_ptr, zoneout_h_ptr, zoneout_c_ptr, norm_hh_ptr, norm_c_ptr, gates_ptr, h_prev_ptr,
    c_prev_ptr, tanh_c_ptr, hh_norm_ptr, c_norm_ptr, rstd_ptr, d_out_ptr, dh_state_ptr, dc_state_ptr, carry_ptr, dh_ptr,
    scratch_ptr, d_x_ptr, d_hidden_ptr, d_h_steps_ptr, d_tanh_arg_ptr,
    T, B, H, P,
    LSTM: tl.constexpr, PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT_H: tl.constexpr,
    ZONEOUT_C: tl.constexpr, NORM: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Every step of BLOCK_B batch rows, last first: the gradients of the pre-activation gates
    and of the states entering each step. Reads the forward's saved tensors, d_output and the
    state gradients in the double buffers dh_state (2, B, P) and dc_state (2, B, H), half 0
    holding those of h_n and c_n; writes the other half each step, d_x (T, B, G H), the
    gradient of x_proj, and for a GRU d_hidden (T, B, 3H), that of h W_hh^T + b_hh (an LSTM's
    is d_x). With PROJ, dh (B, P) holds the step's gradient of h and d_h_steps (T, B, P) keeps
    it for W_hr's gradient. carry (B, P) holds the part of dh_prev that skips W_hh (zoneout's
    share included). With NORM, d_hidden (T, B, 4H) is LN_hh's backward of d_x, three passes
    over the units (each norm's backward needs its row's sums): the first finds the gradient
    of tanh's argument, kept in d_tanh_arg (T, B, H) (for LN_c's weight and bias) and scratch
    (B, H), and the o gate's; the second the cell's and the other gates'; the third d_hidden."""
    G: tl.constexpr = 4 if LSTM else 3
    rows, in_rows, length = _batch_rows(B, T, lengths_ptr, HAS_LENGTHS, BLOCK_B)
    for s in range(T):
        t, live, step_rows, dh_read, dh_write, dc_read, dc_write = _step(
            s, T, B, P, H, rows, in_rows, length, dh_state_ptr, dc_state_ptr, HAS_LENGTHS, not REVERSE
        )
        if NORM:
            # Per row: sums of g and of g times the normalized values, g the gradient of LN_c's
            # output (times its weight) and of LN_hh's.
            cell_sum = tl.zeros((BLOCK_B,), dh_state_ptr.dtype.element_ty)
            cell_dot = tl.zeros_like(cell_sum)
            gate_sum = tl.zeros_like(cell_sum)
            gate_dot = tl.zeros_like(cell_sum)
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
                alive = live[:, None]
                d_o = tl.where(alive, dm * tanh_c * o * (1.0 - o), 0.0)
                tl.store(grads + 3 * H, d_o, mask=tile)
                if NORM:
                    d_arg = tl.where(alive, dm * o * (1.0 - tanh_c * tanh_c), 0.0)
                    tl.store(scratch_ptr + state, d_arg, mask=tile)
                    tl.store(d_tanh_arg_ptr + step_rows[:, None] * H + units[None, :], d_arg, mask=tile)
                    scaled = d_arg * tl.load(norm_c_ptr + units[None, :], mask=tile, other=0.0)
                    cell_sum += tl.sum(scaled, 1)
                    cell_dot += tl.sum(scaled * tl.load(c_norm_ptr + step_rows[:, None] * H + units[None, :],
                                                        mask=tile, other=0.0), 1)
                    gate_sum, gate_dot = _norm_sums(gate_sum, gate_dot, d_o, norm_hh_ptr, hh_norm_ptr, 3, H, units,
                                                    step_rows, tile)
                else:
                    c_old = tl.load(c_prev_ptr + step_rows[:, None] * H + units[None, :], mask=tile, other=0.0)
                    dc_in = tl.load(dc_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                    kept_c = tl.zeros_like(dc_in)
                    if ZONEOUT_C:
                        kept_c = dc_in * tl.load(zoneout_c_ptr + step_rows[:, None] * H + units[None, :], mask=tile,
                                                 other=0.0)
                    dc = dc_in - kept_c + dm * o * (1.0 - tanh_c * tanh_c)
                    tl.store(grads, tl.where(alive, dc * g * i * (1.0 - i), 0.0), mask=tile)
                    tl.store(grads + H, tl.where(alive, dc * c_old * f * (1.0 - f), 0.0), mask=tile)
                    tl.store(grads + 2 * H, tl.where(alive, dc * i * (1.0 - g * g), 0.0), mask=tile)
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
        if NORM:
            tl.debug_barrier()
            rstd_hh = tl.load(rstd_ptr + step_rows * 2, mask=in_rows, other=0.0)
            rstd_c = tl.load(rstd_ptr + step_rows * 2 + 1, mask=in_rows, other=0.0)
            for u0 in range(0, H, BLOCK_U):
                units = u0 + tl.arange(0, BLOCK_U)
                tile = in_rows[:, None] & (units[None, :] < H)
                state = rows[:, None] * H + units[None, :]
                step_units = step_rows[:, None] * H + units[None, :]
                saved = gates_ptr + step_rows[:, None] * (4 * H) + units[None, :]
                grads = d_x_ptr + step_rows[:, None] * (4 * H) + units[None, :]
                d_arg = tl.load(scratch_ptr + state, mask=tile, other=0.0, cache_modifier=".cg")
                weight = tl.load(norm_c_ptr + units[None, :], mask=tile, other=0.0)
                normalized = tl.load(c_norm_ptr + step_units, mask=tile, other=0.0)
                d_cell = rstd_c[:, None] * (d_arg * weight - cell_sum[:, None] / H - normalized * cell_dot[:, None] / H)
                dc_in = tl.load(dc_read + state, mask=tile, other=0.0, cache_modifier=".cg")
                kept_c = tl.zeros_like(dc_in)
                if ZONEOUT_C:
                    kept_c = dc_in * tl.load(zoneout_c_ptr + step_units, mask=tile, other=0.0)
                dc = dc_in - kept_c + d_cell
                i = tl.load(saved, mask=tile, other=0.0)
                f = tl.load(saved + H, mask=tile, other=0.0)
                g = tl.load(saved + 2 * H, mask=tile, other=0.0)
                alive = live[:, None]
                d_i = tl.where(alive, dc * g * i * (1.0 - i), 0.0)
                d_f = tl.where(alive, dc * tl.load(c_prev_ptr + step_units, mask=tile, other=0.0) * f * (1.0 - f), 0.0)
                d_g = tl.where(alive, dc * i * (1.0 - g * g), 0.0)
                tl.store(grads, d_i, mask=tile)
                tl.store(grads + H, d_f, mask=tile)
                tl.store(grads + 2 * H, d_g, mask=tile)
                tl.store(dc_write + state, tl.where(alive, dc * f + kept_c, dc_in), mask=tile)
                gate_sum, gate_dot = _norm_sums(gate_sum, gate_dot, d_i, norm_hh_ptr, hh_norm_ptr, 0, H, units,
                                                step_rows, tile)
                gate_sum, gate_dot = _norm_sums(gate_sum, gate_dot, d_f, norm_hh_ptr, hh_norm_ptr, 1, H, units,
                                                step_rows, tile)
                gate_sum, gate_dot = _norm_sums(gate_sum, gate_dot, d_g, norm_hh_ptr, hh_norm_ptr, 2, H, units,
                                                step_rows, tile)
            tl.debug_barrier()
            for u0 in range(0, 4 * H, BLOCK_U):
                columns = u0 + tl.arange(0, BLOCK_U)
                tile = in_rows[:, None] & (columns[None, :] < 4 * H)
                at = step_rows[:, None] * (4 * H) + columns[None, :]
                d_gate = tl.load(d_x_ptr + at, mask=tile, other=0.0, cache_modifier=".cg")
                weight = tl.load(norm_hh_ptr + columns[None, :], mask=tile, other=0.0)
                normalized = tl.load(hh_norm_ptr + at, mask=tile, other=0.0)
                d_raw = rstd_hh[:, None] * (d_gate * weight - gate_sum[:, None] / (4 * H)
                                            - normalized * gate_dot[:, None] / (4 * H))
                tl.store(d_hidden_ptr + at, d_raw, mask=tile)
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


def _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, reverse):
    """The kernels' shared compile-time flags and tile sizes. tl.dot takes no side under 16."""
    return dict(
        LSTM=cell == "lstm", PROJ=weight_hr is not None, HAS_LENGTHS=lengths is not None,
        ZONEOUT_H=zoneout_h is not None, ZONEOUT_C=zoneout_c is not None, NORM=norm_hh is not None, REVERSE=reverse,
        PRECISION="ieee", BLOCK_B=16, BLOCK_U=16, BLOCK_K=32,
        num_warps=4,
    )


def _masks(x_proj, zoneout_h, zoneout_c):
    """The zoneout masks as kernel arguments, x_proj standing in for an absent one (never read)."""
    return (x_proj if zoneout_h is None else zoneout_h), (x_proj if zoneout_c is None else zoneout_c)


def recurrence_forward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh,
                       norm_c, eps, reverse, save):
    """Returns output (T, B, P), h_n, c_n (None for a GRU) and gates, h_prev, c_prev, tanh_c (the
    last two None for a GRU) and, with the norms, hh_norm, c_norm and rstd (else None): those
    covering one step, unwritten, without save. The arguments as csrc/cpu/rnn.h's Recurrence
    (contiguous, one float dtype)."""
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
    normed = norm_hh is not None
    scratch = x_proj.new_empty(B, 6 * H) if normed else x_proj
    hh_norm, c_norm, rstd = (
        (x_proj.new_empty(steps, B, 4 * H), x_proj.new_empty(steps, B, H), x_proj.new_empty(steps, B, 2))
        if normed else (x_proj,) * 3
    )
    settings = _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, reverse)
    _recurrence_forward_kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](
        x_proj, weight_hh, x_proj if bias_hh is None else bias_hh, weight_hh if weight_hr is None else weight_hr,
        h0 if lengths is None else lengths, *_masks(x_proj, zoneout_h, zoneout_c),
        *((norm_hh, norm_c) if normed else (x_proj, x_proj)), h_state, c_state, m, scratch, output, gates, h_prev,
        c_prev, tanh_c, hh_norm, c_norm, rstd, T, B, H, P, EPS=eps, SAVE=save, **settings,
    )
    h_n, c_n = h_state[T % 2].clone(), c_state[T % 2].clone() if lstm else None
    norms_saved = (hh_norm, c_norm, rstd) if normed else (None,) * 3
    return output, h_n, c_n, gates, h_prev, c_prev if lstm else None, tanh_c if lstm else None, *norms_saved


def recurrence_backward(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh,
                        norm_c, eps, reverse, d_output, d_h_n, d_c_n, saved):
    """Returns the gradients of x_proj, weight_hh, bias_hh, h0, c0, weight_hr and the two norms
    (None where the input is absent) from those of output, h_n and c_n (None: zero) and
    recurrence_forward's saved tensors (gates, h_prev and for an LSTM c_prev, tanh_c, and with the
    norms hh_norm, c_norm, rstd)."""
    T, B, gate_columns = x_proj.shape
    lstm = cell == "lstm"
    H = gate_columns // (4 if lstm else 3)
    P = h0.shape[1]
    gates, h_prev = saved[:2]
    c_prev, tanh_c = saved[2:4] if lstm else (gates, gates)
    normed = norm_hh is not None
    hh_norm, c_norm, rstd = saved[4:7] if normed else (gates,) * 3
    dh_state = x_proj.new_zeros(2, B, P)
    if d_h_n is not None:
        dh_state[0] = d_h_n
    dc_state = x_proj.new_zeros(2, B, H)
    if d_c_n is not None:
        dc_state[0] = d_c_n
    carry = x_proj.new_empty(B, P)
    d_x = torch.empty_like(x_proj)
    d_hidden = d_x if lstm and not normed else torch.empty_like(x_proj)
    proj = weight_hr is not None
    dh, d_h_steps = (x_proj.new_empty(B, P), x_proj.new_empty(T, B, P)) if proj else (carry, carry)
    scratch, d_tanh_arg = (x_proj.new_empty(B, H), x_proj.new_empty(T, B, H)) if normed else (carry, carry)
    settings = _settings(cell, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, reverse)
    _recurrence_backward_kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](
        weight_hh, weight_hh if weight_hr is None else weight_hr, h0 if lengths is None else lengths,
        *_masks(x_proj, zoneout_h, zoneout_c), *((norm_hh, norm_c) if normed else (gates, gates)), gates, h_prev,
        c_prev, tanh_c, hh_norm, c_norm, rstd, d_output, dh_state, dc_state, carry, dh, scratch, d_x, d_hidden,
        d_h_steps, d_tanh_arg, T, B, H, P, **settings,
    )
    d_weight_hh = d_hidden.reshape(T * B, -1).t() @ h_prev.reshape(T * B, P)
    d_bias_hh = None if bias_hh is None else d_hidden.sum((0, 1))
    d_weight_hr = None
    if proj:
        cell_output = gates[..., 3 * H:] * tanh_c
        d_weight_hr = d_h_steps.reshape(T * B, P).t() @ cell_output.reshape(T * B, H)
    d_norm_hh = d_norm_c = None
    if normed:
        # A norm's weight takes sum dy * normalized, its bias sum dy, over every step and row.
        d_norm_hh = torch.stack(((d_x * hh_norm).sum((0, 1)), d_x.sum((0, 1))))
        d_norm_c = torch.stack(((d_tanh_arg * c_norm).sum((0, 1)), d_tanh_arg.sum((0, 1))))
    dc0 = dc_state[T % 2].clone() if lstm else None
    return d_x, d_weight_hh, d_bias_hh, dh_state[T % 2].clone(), dc0, d_weight_hr, d_norm_hh, d_norm_c
