// The persistent LSTM/GRU forward on raw pointers: plain CUDA, no torch headers.
// csrc/bindings.cpp checks the tensors and calls these; the formulas are
// genfast/reference/rnn.py's, the saved tensors csrc/cpu/rnn.h's.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace genfast::cuda {

// One direction of one layer without a projection, float32, every array dense. x_proj is
// (T, B, G*H), x W_ih^T + b_ih (+ b_hh for an LSTM), G = 4 (LSTM: i, f, g, o) or 3 (GRU: r, z,
// n); weight_hh (G*H, H); bias_hh (G*H) for a GRU, else null; lengths (B) int64 on the device,
// each in [0, T], or null for T steps each.
//
// h_state (2, B, H) holds h0 in its first half on entry; each step writes the other half, so
// h_n ends in half T % 2. c_state (B, H), an LSTM's, holds c0 on entry and c_n on exit. The
// kernel writes output (T, B, H) and, when gates is not null (training), what the backward
// reads: gates (T, B, 4H: i, f, g, o, or r, z, n and h W_hn^T + b_hn), h_prev (T, B, H), and
// for an LSTM c_prev and tanh_c (T, B, H).
struct PersistentRecurrence {
  bool lstm;
  int64_t T, B, H;
  const float* x_proj;
  const float* weight_hh;
  const float* bias_hh;
  const int64_t* lengths;
  bool reverse;
  float* h_state;
  float* c_state;
  float* output;
  float* gates;
  float* h_prev;
  float* c_prev;
  float* tanh_c;
};

// Whether the current device runs the persistent kernel for this cell and size: every block
// resident at once, each holding its hidden units' share of weight_hh and all of h in shared
// memory. Writes the answer to *fits.
cudaError_t persistent_recurrence_fits(bool lstm, int64_t B, int64_t H, bool* fits);

// Runs every step in one cooperative launch on stream: cudaErrorInvalidValue if it does not fit.
cudaError_t persistent_recurrence_forward(const PersistentRecurrence& r, cudaStream_t stream);

}  // namespace genfast::cuda
