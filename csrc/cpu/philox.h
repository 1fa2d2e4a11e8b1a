// Counter-based random numbers on CPU, the streams genfast/reference/random.py specifies (and
// Triton's tl.philox draws): Philox4x32-10, the normals of fused_noise and the bits of
// attention's dropout.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace genfast::cpu {

// The most elements one philox_normal or philox_row_bits call makes.
constexpr int64_t kPhiloxMaxCount = 1024;

// Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (key0, key1), in place. Inlined
// into loops over counters, whose 32-bit multiplies vectorise as 64-bit products.
inline void philox4x32(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t key0, uint32_t key1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = uint64_t{0xCD9E8D57u} * c2, product_a = uint64_t{0xD2511F53u} * c0;
    c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ key0;
    c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ key1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

// Words [first, first + count) of the row (c1, c2) of seed's stream into out: word e is lane
// e % 4 of the block at counter (e / 4, c1, c2, 0).
inline void philox_row_bits(uint64_t seed, uint32_t c1, uint32_t c2, int64_t first, int64_t count, uint32_t* out) {
  constexpr int64_t kMaxBlocks = kPhiloxMaxCount / 4 + 1;
  const int64_t first_block = first / 4, blocks = (first + count + 3) / 4 - first_block;
  alignas(64) uint32_t words[4 * kMaxBlocks];
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    uint32_t w0 = static_cast<uint32_t>(first_block + b), w1 = c1, w2 = c2, w3 = 0;
    philox4x32(w0, w1, w2, w3, key0, key1);
    words[4 * b] = w0;
    words[4 * b + 1] = w1;
    words[4 * b + 2] = w2;
    words[4 * b + 3] = w3;
  }
  std::copy(words + (first - 4 * first_block), words + (first - 4 * first_block) + count, out);
}

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
    uint32_t c0 = static_cast<uint32_t>(first_block + b), c1 = 0, c2 = 0, c3 = 0;
    philox4x32(c0, c1, c2, c3, key0, key1);
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
