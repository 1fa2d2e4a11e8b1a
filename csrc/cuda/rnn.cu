// The persistent LSTM/GRU forward: one cooperative launch runs every time step.
//
// Block j owns hidden units [j U, (j + 1) U) of every gate: it loads those G U rows of
// weight_hh into shared memory once, transposed, and keeps them there for the whole sequence,
// with its units' cell states. A step is
//   1. read h_{t-1} (B x H, from L2: .cg loads, L1 may hold the previous step's lines) into
//      shared memory;
//   2. the block's G U columns of h_{t-1} W_hh^T for every row, the reduction over H split in
//      `slices` so that small batches still fill the block's threads;
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// How the units split over blocks and the shared memory a block needs.
struct Plan {
  int units, blocks, slices;
  size_t shared_bytes;
};

Plan make_plan(bool lstm, int64_t B, int64_t H, int sms) {
  const int64_t gates = lstm ? 4 : 3;
  const int64_t units = ceil_div(H, sms), rows = gates * units, outputs = B * rows;
  const int64_t slices = std::clamp<int64_t>(kThreads / outputs, 1, H);
  const int64_t floats = H * rows + B * (H + 1) + slices * outputs + (lstm ? B * units : 0);
  return {int(units), int(ceil_div(H, units)), int(slices), size_t(floats) * sizeof(float)};
}

template <bool kLSTM>
__global__ void __launch_bounds__(kThreads)
    persistent_recurrence_kernel(const PersistentRecurrence r, const int units, const int slices) {
  constexpr int kGates = kLSTM ? 4 : 3;
  extern __shared__ float shared[];
  const int H = int(r.H), B = int(r.B), rows = kGates * units, outputs = B * rows;
  const int first_unit = blockIdx.x * units, my_units = min(units, H - first_unit);
  float* w = shared;                      // [H][rows]: w[k * rows + g * units + j] = W_hh[g H + first_unit + j, k]
  float* h = w + H * rows;                // [B][H + 1]: padded so that rows b start in different banks
  float* partial = h + B * (H + 1);       // [slices][B][rows]
  float* c = partial + slices * outputs;  // [B][units], an LSTM's
  const int tid = threadIdx.x;

  for (int i = tid; i < rows * H; i += kThreads) {
    const int row = i / H, k = i % H, g = row / units, j = row % units;
    w[k * rows + row] = j < my_units ? r.weight_hh[(int64_t(g) * H + first_unit + j) * H + k] : 0.f;
  }
  if (kLSTM)
    for (int i = tid; i < B * units; i += kThreads) {
      const int b = i / units, j = i % units;
      c[i] = j < my_units ? r.c_state[int64_t(b) * H + first_unit + j] : 0.f;
    }

  const cg::grid_group grid = cg::this_grid();
  const int chunk = (H + slices - 1) / slices;
  for (int64_t s = 0; s < r.T; ++s) {
    const int64_t t = r.reverse ? r.T - 1 - s : s;
    const float* h_read = r.h_state + (s % 2) * B * H;
    float* h_write = r.h_state + ((s + 1) % 2) * B * H;
    for (int i = tid; i < B * H; i += kThreads) h[(i / H) * (H + 1) + i % H] = __ldcg(h_read + i);
    __syncthreads();

    for (int i = tid; i < slices * outputs; i += kThreads) {
      const int slice = i / outputs, o = i % outputs, b = o / rows, row = o % rows;
      const int k_end = min(H, (slice + 1) * chunk);
      float acc = 0.f;
      for (int k = slice * chunk; k < k_end; ++k) acc = fmaf(h[b * (H + 1) + k], w[k * rows + row], acc);
      partial[i] = acc;
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
      const float h_old = h[b * (H + 1) + u];
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
  *kernel = lstm ? reinterpret_cast<const void*>(persistent_recurrence_kernel<true>)
                 : reinterpret_cast<const void*>(persistent_recurrence_kernel<false>);
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
