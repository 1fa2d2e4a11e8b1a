// Elementwise math written so that GCC and Clang vectorise it inside
// `#pragma omp simd` loops: no calls into libm on the float path.
#pragma once

#include <cmath>
#include <cstdint>

namespace genfast::cpu {

// e^x for float: x = n*ln2 + r with |r| <= ln2/2, e^r from Cephes' degree-6
// polynomial (max error about 1 ulp), 2^n assembled in the exponent bits. The
// clamp keeps 2^n a normal float (so e^x saturates near 0 and 2e38); it is
// written with comparisons, which vectorise where fminf/fmaxf stay libm calls,
// and which let NaN through to the result.
inline float exp_fast(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float er = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return er * __builtin_bit_cast(float, bits);
}

// Double inputs take libm: they are for checking, not speed.
inline double exp_fast(double x) { return std::exp(x); }

}  // namespace genfast::cpu
