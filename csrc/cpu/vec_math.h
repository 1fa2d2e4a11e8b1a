// Elementwise math written so that GCC and Clang vectorise it inside
// `#pragma omp simd` loops: no calls into libm on the float path.
#pragma once

#include <cmath>
#include <cstdint>

// Inlined always: a call in a loop body keeps the loop scalar, and GCC's heuristics stop
// inlining these once a loop calls a few of them.
#define GENFAST_VECTOR_INLINE inline __attribute__((always_inline))

namespace genfast::cpu {

// e^x for float: x = n*ln2 + r with |r| <= ln2/2, e^r from Cephes' degree-6
// polynomial (max error about 1 ulp), 2^n assembled in the exponent bits. The
// result is 0 from about -87.7, where n = -127 gives the exponent bits of 0
// (libm's subnormals are flushed), and +inf from 88.38, where n = 128 gives
// those of +inf (libm's, within 2x of FLT_MAX, from 88.72); NaN passes through.
// Past -88 and 88.8, where n leaves that range, two selects on the result give 0
// and +inf. They replace clamps of x: GCC copied the whole polynomial behind a
// clamp to fold it for the clamped constant, which cost seven blends per vector
// and made the softmax of attention 20% slower.
GENFAST_VECTOR_INLINE float exp_fast(float x) {
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
  // Far past the selects' bounds n leaves int32's range (x86 converts it to INT_MIN): the
  // selects discard that product.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float result = er * __builtin_bit_cast(float, bits);
  // Two plain selects: nested ones made GCC build both masks of each (NaN-careful), 4 more ops.
  const float low = x < -88.0f ? 0.0f : result;
  return x > 88.8f ? INFINITY : low;
}

// Double inputs take libm: they are for checking, not speed.
GENFAST_VECTOR_INLINE double exp_fast(double x) { return std::exp(x); }

// 2^x for float, cheaper than exp_fast by its range reduction: x = n + f with n the nearest
// integer and |f| <= 1/2 takes one subtraction (exp_fast's by ln 2 takes two fused
// multiply-adds), and n's exponent bits come free: adding 1.5 * 2^23 + 127 rounds x to an
// integer and leaves n + 127 in the sum's low bits. 2^f = e^(f ln 2) is exp_fast's Cephes
// polynomial with its coefficients times powers of ln 2 (max error about 1 ulp). The result is
// 0 below -126 (subnormals flushed) and +inf from 128 (from 127.5 the exponent bits are
// +inf's); NaN passes through.
GENFAST_VECTOR_INLINE float exp2_fast(float x) {
  const float shifted = x + 12583039.0f;
  const float f = x - (shifted - 12583039.0f);
  float p = 1.5279194486e-5f;
  p = std::fma(p, f, 1.5506794443e-4f);
  p = std::fma(p, f, 1.3333747629e-3f);
  p = std::fma(p, f, 9.6179284155e-3f);
  p = std::fma(p, f, 5.5504105985e-2f);
  p = std::fma(p, f, 2.4022650719e-1f);
  p = std::fma(p, f, 6.9314718246e-1f);
  p = std::fma(p, f, 1.0f);
  const uint32_t bits = __builtin_bit_cast(uint32_t, shifted) << 23;
  const float result = p * __builtin_bit_cast(float, bits);
  const float low = x < -126.0f ? 0.0f : result;
  return x >= 128.0f ? INFINITY : low;
}

GENFAST_VECTOR_INLINE double exp2_fast(double x) { return std::exp2(x); }

// tanh x = 1 - 2 / (e^2x + 1): exact at both ends (e^2x = 0 or inf); near 0 its absolute
// error is about 1e-7 (an attention softcap of c scales it to c * 1e-7 on a score).
template <typename T>
GENFAST_VECTOR_INLINE T tanh_fast(T x) {
  return T(1) - T(2) / (exp_fast(T(2) * x) + T(1));
}

// The standard normal's CDF, Phi(x) = erfc(-x / sqrt 2) / 2, with erfc(z) = t exp(P(t) - z^2),
// t = 1 / (1 + 0.4 z), and P of degree 6 fitted here to erfc's logarithm on [0, 9.5] (relative
// error under 2.3e-6, then float32's rounding). One multiply-add more than Abramowitz and
// Stegun's erf (7.1.26), whose absolute error of 1.5e-7 left the lower tail with relative errors
// of 2e-5 at x = -2.8, which GEGLU's product with a large up carries into its output; 1 + erf
// would cancel the tail's digits anyway.
GENFAST_VECTOR_INLINE float normal_cdf_fast(float x) {
  const float z = std::fabs(x) * 0.70710678f;
  const float t = 1.f / std::fma(0.4f, z, 1.f);
  float p = 0.23257405f;
  p = std::fma(p, t, -0.72626443f);
  p = std::fma(p, t, 0.56860390f);
  p = std::fma(p, t, -0.04920331f);
  p = std::fma(p, t, 0.46754241f);
  p = std::fma(p, t, 0.99525611f);
  p = std::fma(p, t, -1.48850645f);
  const float tail = 0.5f * t * exp_fast(std::fma(-z, z, p));  // Phi(-|x|)
  return x < 0.f ? tail : 1.f - tail;
}

GENFAST_VECTOR_INLINE double normal_cdf_fast(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752); }

// ln x for positive normal floats: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then
// ln m = 2 atanh(t), t = (m - 1) / (m + 1), |t| <= 0.172, by its series to t^9
// (error under 1e-9).
GENFAST_VECTOR_INLINE float log_fast(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = __builtin_bit_cast(float, (bits & 0x7fffff) | 0x3f800000);
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1.f : e;
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  float p = 1.f / 9.f;
  p = std::fma(p, t2, 1.f / 7.f);
  p = std::fma(p, t2, 1.f / 5.f);
  p = std::fma(p, t2, 1.f / 3.f);
  p = std::fma(p, t2, 1.f);
  return std::fma(e, 0.693147181f, 2.f * t * p);
}

// ln(1 + x) for x in [0, 1], as the softplus of losses takes it (x = e^-|z|): from log_fast,
// so for x under float's epsilon it is 0 where the true value is x (absolute error < 6e-8).
GENFAST_VECTOR_INLINE float log1p_fast(float x) { return log_fast(1.f + x); }

GENFAST_VECTOR_INLINE double log1p_fast(double x) { return std::log1p(x); }

// sin and cos of 2 pi x for x in [0, 1): the nearest quarter turn q / 4 taken out leaves
// |phi| <= pi / 4, where Taylor series to phi^9 and phi^8 are within 3e-8; the quarter turns
// then swap and negate them.
GENFAST_VECTOR_INLINE void sincos_turns(float x, float& sine, float& cosine) {
  const int32_t q = static_cast<int32_t>(4.f * x + 0.5f);
  const float phi = 6.28318531f * (x - 0.25f * static_cast<float>(q)), p2 = phi * phi;
  float s = std::fma(p2, 2.75573192e-6f, -1.98412698e-4f);
  s = std::fma(s, p2, 8.33333333e-3f);
  s = std::fma(s, p2, -1.66666667e-1f);
  s = std::fma(s * p2, phi, phi);
  float c = std::fma(p2, 2.48015873e-5f, -1.38888889e-3f);
  c = std::fma(c, p2, 4.16666667e-2f);
  c = std::fma(c, p2, -0.5f);
  c = std::fma(c, p2, 1.f);
  const bool swap = q & 1;
  const float sin_abs = swap ? c : s, cos_abs = swap ? s : c;
  sine = (q & 2) ? -sin_abs : sin_abs;
  cosine = ((q + 1) & 2) ? -cos_abs : cos_abs;
}

}  // namespace genfast::cpu
