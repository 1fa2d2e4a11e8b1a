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

namespace detail {

// sum over i < n of term(i) in 16 lanes: one AVX-512 vector of sums, two AVX2 ones.
template <typename acc_t, typename Term>
inline acc_t sum_in_16_lanes(int64_t n, Term&& term) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += term(i + k);
  acc_t sum = 0;
  for (; i < n; ++i) sum += term(i);
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

// The same in 64 lanes, then 16 for what is left, folded pairwise. A separate array for the 16
// (one array for both, GCC spilled the 64 and rebuilt vectors lane by lane).
template <typename acc_t, typename Term>
inline acc_t sum_in_64_lanes(int64_t n, Term&& term) {
  constexpr int64_t kWide = 64, kNarrow = 16;
  acc_t wide[kWide] = {}, narrow[kNarrow] = {};
  int64_t i = 0;
  for (; i + kWide <= n; i += kWide)
    for (int64_t k = 0; k < kWide; ++k) wide[k] += term(i + k);
  for (; i + kNarrow <= n; i += kNarrow)
    for (int64_t k = 0; k < kNarrow; ++k) narrow[k] += term(i + k);
  for (int64_t k = 0; k < kNarrow; ++k) narrow[k] += (wide[k] + wide[k + 32]) + (wide[k + 16] + wide[k + 48]);
  for (int64_t width = kNarrow / 2; width >= 1; width /= 2)
    for (int64_t k = 0; k < width; ++k) narrow[k] += narrow[k + width];
  acc_t sum = narrow[0];
  for (; i < n; ++i) sum += term(i);
  return sum;
}

}  // namespace detail

// sum over i < n of term(i), in independent lanes: loops GCC vectorises, where an omp simd
// reduction stayed scalar in some instantiations (".GOMP_SIMD_LANE clobbers memory", 5x slower).
// From 512 terms, 64 lanes (four AVX-512 vectors) keep enough adds in flight to hide their
// latency: with 16, LayerNorm's statistics were a chain of dependent adds. Below, the 64 lanes'
// setup and fold cost more than they save (two passes of LayerNorm statistics over a row in L1,
// ns, 16 lanes against 64: D 64 17 / 57, 256 38 / 55, 768 105 / 71, 4096 600 / 355).
template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, Term&& term) {
  constexpr int64_t kWideFrom = 512;
  return n >= kWideFrom ? detail::sum_in_64_lanes<acc_t>(n, term) : detail::sum_in_16_lanes<acc_t>(n, term);
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
