// LSTM and GRU recurrences on the CPU (rnn.cpp): the time loop of one direction of one layer,
// after the input projection; the formulas: genfast/reference/rnn.py. Callers check the
// arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace genfast::cpu {

enum class Cell { kLSTM, kGRU };

// One direction of one layer, all tensors contiguous and of one math type (float or double).
// x_proj (T, B, G*H) is x W_ih^T + b_ih, plus b_hh for an LSTM; weight_hh (G*H, P); bias_hh
// (G*H) for a GRU (whose n gate needs it inside r * (.)); weight_hr (P, H) an LSTM's projection;
// h0 (B, P), c0 (B, H) for an LSTM; lengths (B,) int64, each at most T, or none for all T.
// zoneout_h (T, B, P) and an LSTM's zoneout_c (T, B, H): the share of each state unit a step
// keeps from the step before (genfast/reference/rnn.py). A layer-normalized LSTM's norm_hh
// (2, 4H) and norm_c (2, H): the weight and bias of LN_hh and LN_c, epsilon eps (LN_ih is
// in x_proj already). Without save (inference), what the backward reads covers one step and
// may be left unwritten.
//
// Or the loop projects the input itself (a cell: for a step or two, a product of its own per
// step costs less than waking ATen's; inference over a layer: a block of steps at a time rather
// than a fresh (T, B, G*H) tensor): input (T, B, I) and weight_ih (G*H, I) given, and x_proj the
// constant part of the projection, b_ih (plus b_hh for an LSTM) expanded to (T, B, G*H); the
// loop adds input W_ih^T to it.
struct Recurrence {
  Cell cell;
  at::Tensor x_proj, weight_hh, h0;
  std::optional<at::Tensor> c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c;
  double eps = 1e-5;
  bool reverse = false;
  bool save = true;
  std::optional<at::Tensor> input, weight_ih;
};

// Returns output (T, B, P), h_n (B, P), c_n (B, H) (undefined for a GRU), and what the backward
// reads: gates (T, B, 4H), the activated i, f, g, o of an LSTM or r, z, n and h W_hn^T + b_hn of
// a GRU; h_prev (T, B, P), the state entering each step; and for an LSTM c_prev (T, B, H), the
// cell entering each step, and tanh_c (T, B, H), tanh of the step's new cell (or of LN_c of it)
// before zoneout; with the norms, hh_norm (T, B, 4H) and c_norm (T, B, H), the normalized
// h W_hh^T and cell, and rstd (T, B, 2), their reciprocal standard deviations (else undefined).
std::vector<at::Tensor> recurrence_forward(const Recurrence& r);

// From the gradients of output, h_n and c_n (undefined: zero) and the forward's saved tensors
// (gates, h_prev, c_prev, tanh_c and with the norms hh_norm, c_norm, rstd), returns the
// gradients of x_proj, weight_hh, bias_hh, h0, c0, weight_hr, norm_hh and norm_c (undefined
// where the input is absent).
std::vector<at::Tensor> recurrence_backward(const Recurrence& r, const at::Tensor& d_output,
                                            const std::optional<at::Tensor>& d_h_n,
                                            const std::optional<at::Tensor>& d_c_n,
                                            const std::vector<at::Tensor>& saved);

}  // namespace genfast::cpu
