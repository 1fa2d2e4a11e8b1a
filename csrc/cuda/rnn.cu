// The persistent LSTM/GRU forward: one cooperative launch runs every time step.
//
// Block j owns hidden units [j U, (j + 1) U) of every gate: it loads those G U rows of
// weight_hh into shared memory once and keeps them there for the whole sequence, with its
// units' cell states. A step is
//   1. read h_{t-1} (B x H, from L2: .cg loads, L1 may hold the previous step's lines) into
//      shared memory;
//   2. the block's G U columns of h_{t-1} W_hh^T for every row: a thread takes one weight row
//      and kRows batch rows, float4 loads along H, so that each weight vector meets kRows rows
//      (two shared loads per multiply-add took 4.7 us of a 9.6 us step at batch 16, hidden 512,
//      on an H100); the reduction over H is split in `slices` so that small batches still fill
//      the block's threads;
//   3. the gate math for its units, writing h_t, the output and (training) the saved tensors;
//   4. a grid-wide barrier, after which every block's h_t is visible to all.
// Only h moves between blocks, B x H floats a step; the weights are read from HBM once. That is
// what makes small batches fast: cuDNN runs a matrix product per step that rereads weight_hh.
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>

#include "rnn.h"

namespace genfast::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;

__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accurate expf and tanhf, not the fast intrinsics (tanh.approx.f32 errs by up to 2^-11): a
// step's error feeds every later step, and the outputs must match cuDNN's to fp32 rounding.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// One unit's four saved values, H apart (csrc/cpu/rnn.h's gates layout).
__device__ __forceinline__ void save_gates(float* saved, int H, float a, float b, float c, float d) {
  saved[0] = a;
  saved[H] = b;
  saved[2 * H] = c;
  saved[3 * H] = d;
}

// Batch rows a thread's products take at once: from four rows on, four.
int rows_per_thread(int64_t B) { return B >= 4 ? 4 : 1; }

// Floats between rows of the shared weights and of h: H rounded up to whole float4s, zeros past
// H, plus 4 so that the 8 threads of a quarter warp reading 8 consecutive rows' float4s at one k
// hit 32 different banks.
__host__ __device__ int64_t row_stride(int64_t H) { return ceil_div(H, 32) * 32 + 4; }

// How the units split over blocks and the shared memory a block needs.
struct Plan {
  int units, blocks, slices, rows_per_thread;
  size_t shared_bytes;
};

Plan make_plan(bool lstm, int64_t B, int64_t H, int sms) {
  const int64_t gates = lstm ? 4 : 3, rb = rows_per_thread(B), ldk = row_stride(H);
  const int64_t units = ceil_div(H, sms), rows = gates * units, outputs = B * rows;
  const int64_t tiles = ceil_div(B, rb) * rows;
  const int64_t slices = std::clamp<int64_t>(kThreads / tiles, 1, ceil_div(H, 4));
  const int64_t floats = rows * ldk + ceil_div(B, rb) * rb * ldk + slices * outputs + (lstm ? B * units : 0);
  return {int(units), int(ceil_div(H, units)), int(slices), int(rb), size_t(floats) * sizeof(float)};
}

template <bool kLSTM, int kRows>
__global__ void __launch_bounds__(kThreads)
    persistent_recurrence_kernel(const PersistentRecurrence r, const int units, const int slices) {
  constexpr int kGates = kLSTM ? 4 : 3;
  extern __shared__ float4 shared_vectors[];  // float4: the products' 16-byte loads need the alignment
  float* shared = reinterpret_cast<float*>(shared_vectors);
  const int H = int(r.H), B = int(r.B), rows = kGates * units, outputs = B * rows;
  const int ldk = int(row_stride(H)), groups = (B + kRows - 1) / kRows;
  const int first_unit = blockIdx.x * units, my_units = min(units, H - first_unit);
  float* w = shared;                      // [rows][ldk]: w[(g units + j) ldk + k] = W_hh[g H + first_unit + j, k]
  float* h = w + rows * ldk;              // [groups kRows][ldk], zero past H and past B
  float* partial = h + groups * kRows * ldk;  // [slices][B][rows]
  float* c = partial + slices * outputs;  // [B][units], an LSTM's
  const int tid = threadIdx.x;

  for (int i = tid; i < rows * ldk; i += kThreads) {
    const int row = i / ldk, k = i % ldk, g = row / units, j = row % units;
    w[i] = j < my_units && k < H ? r.weight_hh[(int64_t(g) * H + first_unit + j) * H + k] : 0.f;
  }
  for (int i = tid; i < groups * kRows * ldk; i += kThreads) h[i] = 0.f;  // the padding stays zero
  if (kLSTM)
    for (int i = tid; i < B * units; i += kThreads) {
      const int b = i / units, j = i % units;
      c[i] = j < my_units ? r.c_state[int64_t(b) * H + first_unit + j] : 0.f;
    }

  __syncthreads();  // h's zeros before any step writes its rows
  const cg::grid_group grid = cg::this_grid();
  const int padded_h = (H + 3) / 4 * 4, chunk = ((padded_h / 4 + slices - 1) / slices) * 4;
  for (int64_t s = 0; s < r.T; ++s) {
    const int64_t t = r.reverse ? r.T - 1 - s : s;
    const float* h_read = r.h_state + (s % 2) * B * H;
    float* h_write = r.h_state + ((s + 1) % 2) * B * H;
    for (int i = tid; i < B * H; i += kThreads) h[(i / H) * ldk + i % H] = __ldcg(h_read + i);
    __syncthreads();

    // Tile i: weight row i % rows (a warp's threads take consecutive rows, whose float4s at one k
    // lie in different banks), batch rows of group (i / rows) % groups (mostly the same across a
    // warp: one broadcast load), the part of H of slice i / (rows groups).
    for (int i = tid; i < slices * groups * rows; i += kThreads) {
      const int row = i % rows, group = (i / rows) % groups, slice = i / (rows * groups);
      const int k_end = min(padded_h, (slice + 1) * chunk);
      const float* w_row = w + row * ldk;
      const float* h_rows = h + group * kRows * ldk;
      float acc[kRows] = {};
      for (int k = slice * chunk; k < k_end; k += 4) {
        const float4 wv = *reinterpret_cast<const float4*>(w_row + k);
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          const float4 hv = *reinterpret_cast<const float4*>(h_rows + q * ldk + k);
          acc[q] = fmaf(hv.w, wv.w, fmaf(hv.z, wv.z, fmaf(hv.y, wv.y, fmaf(hv.x, wv.x, acc[q]))));
        }
      }
#pragma unroll
      for (int q = 0; q < kRows; ++q)
        if (const int b = group * kRows + q; b < B) partial[(slice * B + b) * rows + row] = acc[q];
    }
    __syncthreads();

    for (int i = tid; i < B * my_units; i += kThreads) {
      const int b = i / my_units, j = i % my_units, u = first_unit + j;
      float hidden[kGates];
#pragma unroll
      for (int g = 0; g < kGates; ++g) {
        float sum = 0.f;
        for (int slice = 0; slice < slices; ++slice) sum += partial[slice * outputs + b * rows + g * units + j];
        hidden[g] = sum;
      }
      const int64_t at = t * B + b;
      const float* x = r.x_proj + at * kGates * H + u;
      const float h_old = h[b * ldk + u];
      const bool live = r.lengths == nullptr || t < r.lengths[b];
      float h_new;
      if constexpr (kLSTM) {
        const float in = sigmoid(x[0] + hidden[0]), forget = sigmoid(x[H] + hidden[1]);
        const float cand = tanhf(x[2 * H] + hidden[2]), out = sigmoid(x[3 * H] + hidden[3]);
        const float c_old = c[b * units + j], c_new = forget * c_old + in * cand, tanh_c = tanhf(c_new);
        h_new = out * tanh_c;
        if (live) c[b * units + j] = c_new;
        if (r.gates) {
          save_gates(r.gates + at * 4 * H + u, H, in, forget, cand, out);
          r.c_prev[at * H + u] = c_old;
          r.tanh_c[at * H + u] = tanh_c;
        }
      } else {
        const float* bias = r.bias_hh + u;
        const float reset = sigmoid(x[0] + hidden[0] + bias[0]), update = sigmoid(x[H] + hidden[1] + bias[H]);
        const float hidden_n = hidden[2] + bias[2 * H], cand = tanhf(x[2 * H] + reset * hidden_n);
        h_new = (1.f - update) * cand + update * h_old;
        if (r.gates) save_gates(r.gates + at * 4 * H + u, H, reset, update, cand, hidden_n);
      }
      if (r.gates) r.h_prev[at * H + u] = h_old;
      h_write[int64_t(b) * H + u] = live ? h_new : h_old;
      r.output[at * H + u] = live ? h_new : 0.f;
    }
    grid.sync();
  }

  if (kLSTM)
    for (int i = tid; i < B * my_units; i += kThreads) {
      const int b = i / my_units, j = i % my_units;
      r.c_state[int64_t(b) * H + first_unit + j] = c[b * units + j];
    }
}

// The kernel for the cell, allowed the plan's shared memory, and whether every block of the plan
// can be resident at once (cooperative launches require it).
cudaError_t prepare(bool lstm, int64_t B, int64_t H, Plan* plan, const void** kernel, bool* fits) {
  int device = 0, sms = 0, max_shared = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess)
    return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      err != cudaSuccess)
    return err;
  *fits = false;
  if (B <= 0 || H <= 0) return cudaSuccess;
  *plan = make_plan(lstm, B, H, sms);
  if (plan->shared_bytes > size_t(max_shared)) return cudaSuccess;
  const bool four = plan->rows_per_thread == 4;
  *kernel = lstm ? (four ? reinterpret_cast<const void*>(persistent_recurrence_kernel<true, 4>)
                         : reinterpret_cast<const void*>(persistent_recurrence_kernel<true, 1>))
                 : (four ? reinterpret_cast<const void*>(persistent_recurrence_kernel<false, 4>)
                         : reinterpret_cast<const void*>(persistent_recurrence_kernel<false, 1>));
  if (cudaError_t err = cudaFuncSetAttribute(*kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(plan->shared_bytes));
      err != cudaSuccess)
    return err;
  int per_sm = 0;
  if (cudaError_t err =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, *kernel, kThreads, plan->shared_bytes);
      err != cudaSuccess)
    return err;
  *fits = int64_t(per_sm) * sms >= plan->blocks;
  return cudaSuccess;
}

}  // namespace

cudaError_t persistent_recurrence_fits(bool lstm, int64_t B, int64_t H, bool* fits) {
  Plan plan{};
  const void* kernel = nullptr;
  return prepare(lstm, B, H, &plan, &kernel, fits);
}

cudaError_t persistent_recurrence_forward(const PersistentRecurrence& r, cudaStream_t stream) {
  if (r.T == 0) return cudaSuccess;
  Plan plan{};
  const void* kernel = nullptr;
  bool fits = false;
  if (cudaError_t err = prepare(r.lstm, r.B, r.H, &plan, &kernel, &fits); err != cudaSuccess) return err;
  if (!fits) return cudaErrorInvalidValue;
  PersistentRecurrence problem = r;
  int units = plan.units, slices = plan.slices;
  void* args[] = {&problem, &units, &slices};
  return cudaLaunchCooperativeKernel(kernel, dim3(unsigned(plan.blocks)), dim3(kThreads), args, plan.shared_bytes,
                                     stream);
}

}  // namespace genfast::cuda
