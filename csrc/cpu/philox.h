// The counter-based noise of fused_noise on CPU: Philox4x32-10 and Box-Muller, the stream
// genfast/reference/diffusion.py's philox_normal specifies (and Triton's tl.randint4x draws).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace genfast::cpu {

// The most elements one philox_normal call makes.
constexpr int64_t kPhiloxMaxCount = 1024;

// Standard normals of elements [first, first + count) of seed's stream into out: element e is
// lane e % 4 of the block at counter e / 4. Each loop runs over independent counters and
// vectorises: the 32-bit multiplies as 64-bit products, the transform with vec_math.h.
inline void philox_normal(uint64_t seed, int64_t first, int64_t count, float* out) {
  constexpr int64_t kMaxBlocks = kPhiloxMaxCount / 4 + 1;
  const int64_t first_block = first / 4, blocks = (first + count + 3) / 4 - first_block;
  alignas(64) uint32_t words[4][kMaxBlocks];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    uint32_t c0 = static_cast<uint32_t>(first_block + b), c1 = 0, c2 = 0, c3 = 0, k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t product_b = uint64_t{0xCD9E8D57u} * c2, product_a = uint64_t{0xD2511F53u} * c0;
      c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(product_b);
      c3 = static_cast<uint32_t>(product_a);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    words[0][b] = c0;
    words[1][b] = c1;
    words[2][b] = c2;
    words[3][b] = c3;
  }
  alignas(64) float normals[4 * kMaxBlocks];
  for (int pair = 0; pair < 2; ++pair) {
#pragma omp simd
    for (int64_t b = 0; b < blocks; ++b) {
      // u in (0, 1): 24 random bits and half a step, so that the log is finite.
      const float u0 = (static_cast<float>(words[2 * pair][b] >> 8) + 0.5f) * 0x1p-24f;
      const float u1 = (static_cast<float>(words[2 * pair + 1][b] >> 8) + 0.5f) * 0x1p-24f;
      const float radius = std::sqrt(-2.f * log_fast(u0));
      float sine, cosine;
      sincos_turns(u1, sine, cosine);
      normals[4 * b + 2 * pair] = radius * cosine;
      normals[4 * b + 2 * pair + 1] = radius * sine;
    }
  }
  const float* from = normals + (first - 4 * first_block);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = from[i];
}

}  // namespace genfast::cpu
