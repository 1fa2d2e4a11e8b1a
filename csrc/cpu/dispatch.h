// Element-type dispatch and in-register reductions shared by the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace genfast::cpu {

// Calls run(T{}) for the element type T of a float32, float16 or bfloat16 tensor, and of a
// float64 one where kWithDouble.
template <bool kWithDouble = false, typename Run>
void dispatch_float_types(at::ScalarType dtype, const char* op, Run&& run) {
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(c10::Half{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kDouble:
      if constexpr (kWithDouble) {
        run(double{});
        break;
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, op, " takes float32, float16, bfloat16", kWithDouble ? " or float64" : "",
                  " tensors, got ", dtype);
  }
}

// The type a kernel computes in for elements of type T: double for double, else float.
template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// sum over i < n of term(i), in 64 independent lanes folded pairwise at the end: a loop GCC
// vectorises, where an omp simd reduction stayed scalar in some instantiations (".GOMP_SIMD_LANE
// clobbers memory", 5x slower). 64 lanes are four AVX-512 vectors (eight AVX2 ones), enough sums
// in flight to hide an add's latency: with one vector of lanes, LayerNorm's statistics were a
// chain of dependent adds.
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, Term&& term) {
  constexpr int64_t kLanes = 64, kShortLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += term(i + k);
  for (; i + kShortLanes <= n; i += kShortLanes)
    for (int64_t k = 0; k < kShortLanes; ++k) lanes[k] += term(i + k);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  acc_t sum = lanes[0];
  for (; i < n; ++i) sum += term(i);
  return sum;
}

// max over i < n (n > 0) of x[i], in 16 independent lanes: a scalar running maximum is a chain
// of dependent compares that GCC does not vectorise without -ffast-math. NaN is not propagated.
template <typename acc_t>
inline acc_t lane_max(int64_t n, const acc_t* x) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) lanes[k] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] = x[i + k] > lanes[k] ? x[i + k] : lanes[k];
  acc_t result = x[0];
  for (; i < n; ++i) result = x[i] > result ? x[i] : result;
  for (int64_t k = 0; k < kLanes; ++k) result = lanes[k] > result ? lanes[k] : result;
  return result;
}

}  // namespace genfast::cpu
