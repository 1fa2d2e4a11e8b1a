// GroupNorm (+ optional SiLU) CUDA kernels: plain CUDA, raw pointers and a
// stream, no torch headers. csrc/bindings.cpp checks the tensors and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "dtype.h"

namespace genfast::cuda {

// x is (N, C, S) with S the flattened spatial size, stored channels-first
// (N, C, S) or channels-last (N, S, C) and dense. weight and bias are float32
// (C). Writes y (x's dtype and layout) and float32 mean and rstd (N, groups).
// C must be a multiple of groups; any size being 0 launches nothing.
//
// Both functions allocate nothing: before writing the result they use the
// front of their tensor output (y, dx) as scratch for partial sums, so that
// output must not overlap any input. Results are deterministic.
struct GroupNormShape {
  int64_t N, C, S, groups;
  bool channels_last;
};

cudaError_t group_norm_forward(const void* x, const float* weight,
                               const float* bias, void* y, float* mean,
                               float* rstd, GroupNormShape shape, float eps,
                               bool silu, DType dtype, cudaStream_t stream);

// Reads dy, x (same dtype and layout), weight, bias, mean, rstd. Writes dx and
// the float32 per-(n, c) sums sum_dz = sum_s dz and sum_dz_xhat =
// sum_s dz * xhat, where dz is dy through the activation's derivative and
// xhat = (x - mean) * rstd; the caller sums them over n into the bias and
// weight gradients.
cudaError_t group_norm_backward(const void* dy, const void* x,
                                const float* weight, const float* bias,
                                const float* mean, const float* rstd, void* dx,
                                float* sum_dz, float* sum_dz_xhat,
                                GroupNormShape shape, bool silu, DType dtype,
                                cudaStream_t stream);

}  // namespace genfast::cuda
