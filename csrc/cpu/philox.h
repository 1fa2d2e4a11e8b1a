// Counter-based random numbers on CPU, the streams genfast/reference/random.py specifies (and
// Triton's tl.philox draws): Philox4x32-10, the normals of fused_noise and the bits of
// attention's dropout.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "vec_math.h"

namespace genfast::cpu {

// The most elements one philox_normal or philox_row_bits call makes.
constexpr int64_t kPhiloxMaxCount = 1024;

// Philox's words, a vector of them at a time on x86. Left to vectorise a loop over counters,
// GCC widens each word to 64 bits for the round's 32x32-bit products, which with AVX-512 take
// vpmullq (three micro-ops) and a repacking of lanes: Philox was half of fused noise's time.
// Here the products of even and of odd lanes are one vpmuludq each.
#if defined(__AVX512F__)
using PhiloxWords = uint32_t __attribute__((vector_size(64)));
// All lanes kept by a mask: GCC 12's _mm512_mul_epu32 warns of its own undefined vector.
inline PhiloxWords multiply_even_lanes(PhiloxWords a, PhiloxWords b) {
  return reinterpret_cast<PhiloxWords>(_mm512_maskz_mul_epu32(0xFF, reinterpret_cast<__m512i>(a), reinterpret_cast<__m512i>(b)));
}
#elif defined(__AVX2__)
using PhiloxWords = uint32_t __attribute__((vector_size(32)));
inline PhiloxWords multiply_even_lanes(PhiloxWords a, PhiloxWords b) {
  return reinterpret_cast<PhiloxWords>(_mm256_mul_epu32(reinterpret_cast<__m256i>(a), reinterpret_cast<__m256i>(b)));
}
#else
using PhiloxWords = uint32_t;  // loops over counters vectorise as they can
#endif
constexpr int64_t kPhiloxLanes = sizeof(PhiloxWords) / sizeof(uint32_t);

// High and low words of the products m * a.
inline void multiply_high_low(uint32_t m, uint32_t a, uint32_t& high, uint32_t& low) {
  const uint64_t product = uint64_t{m} * a;
  high = static_cast<uint32_t>(product >> 32);
  low = static_cast<uint32_t>(product);
}

#if defined(__AVX2__)
inline void multiply_high_low(uint32_t m, PhiloxWords a, PhiloxWords& high, PhiloxWords& low) {
  using Pairs = uint64_t __attribute__((vector_size(sizeof(PhiloxWords))));
  constexpr uint64_t kLow = 0xFFFFFFFFu;
  const PhiloxWords ms = PhiloxWords{} + m;
  // Pair q of even (odd) is the product of lane 2q (2q + 1) of a with m.
  const Pairs even = reinterpret_cast<Pairs>(multiply_even_lanes(a, ms));
  const Pairs odd = reinterpret_cast<Pairs>(multiply_even_lanes(reinterpret_cast<PhiloxWords>(reinterpret_cast<Pairs>(a) >> 32), ms));
  high = reinterpret_cast<PhiloxWords>((even >> 32) | (odd & ~kLow));
  low = reinterpret_cast<PhiloxWords>((even & kLow) | (odd << 32));
}
#endif

// Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (key0, key1), in place.
template <typename Words>
GENFAST_VECTOR_INLINE void philox4x32(Words& c0, Words& c1, Words& c2, Words& c3, uint32_t key0, uint32_t key1) {
  for (int round = 0; round < 10; ++round) {
    Words high_a, low_a, high_b, low_b;
    multiply_high_low(0xCD9E8D57u, c2, high_b, low_b);
    multiply_high_low(0xD2511F53u, c0, high_a, low_a);
    c0 = high_b ^ c1 ^ key0;
    c2 = high_a ^ c3 ^ key1;
    c1 = low_b;
    c3 = low_a;
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

// Blocks of four words: words[k][b] is word k of block b. Rounded up to whole vectors.
constexpr int64_t kPhiloxMaxBlocks = (kPhiloxMaxCount / 4 + 1 + kPhiloxLanes - 1) / kPhiloxLanes * kPhiloxLanes;
using PhiloxBlocks = uint32_t[4][kPhiloxMaxBlocks];

// The blocks at counters (first_block + b, c1, c2, 0) of seed's stream for b in [0, blocks),
// and up to a whole vector past them.
inline void philox_blocks(uint64_t seed, int64_t first_block, uint32_t c1, uint32_t c2, int64_t blocks,
                          PhiloxBlocks& words) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  PhiloxWords lane{};
  for (int64_t i = 0; i < kPhiloxLanes; ++i) reinterpret_cast<uint32_t*>(&lane)[i] = static_cast<uint32_t>(i);
#pragma omp simd
  for (int64_t b = 0; b < blocks; b += kPhiloxLanes) {
    PhiloxWords w0 = lane + static_cast<uint32_t>(first_block + b), w1 = PhiloxWords{} + c1, w2 = PhiloxWords{} + c2,
                w3 = PhiloxWords{};
    philox4x32(w0, w1, w2, w3, key0, key1);
    std::memcpy(&words[0][b], &w0, sizeof w0);
    std::memcpy(&words[1][b], &w1, sizeof w1);
    std::memcpy(&words[2][b], &w2, sizeof w2);
    std::memcpy(&words[3][b], &w3, sizeof w3);
  }
}

// Words [first, first + count) of the row (c1, c2) of seed's stream into out: word e is lane
// e % 4 of the block at counter (e / 4, c1, c2, 0).
inline void philox_row_bits(uint64_t seed, uint32_t c1, uint32_t c2, int64_t first, int64_t count, uint32_t* out) {
  const int64_t first_block = first / 4, skip = first - 4 * first_block, blocks = (skip + count + 3) / 4;
  alignas(64) PhiloxBlocks words;
  philox_blocks(seed, first_block, c1, c2, blocks, words);
  alignas(64) uint32_t bits[4 * kPhiloxMaxBlocks];
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    bits[4 * b] = words[0][b];
    bits[4 * b + 1] = words[1][b];
    bits[4 * b + 2] = words[2][b];
    bits[4 * b + 3] = words[3][b];
  }
  std::copy(bits + skip, bits + skip + count, out);
}

// Two standard normals from two words (Box-Muller).
GENFAST_VECTOR_INLINE void box_muller(uint32_t word0, uint32_t word1, float& normal0, float& normal1) {
  // u in (0, 1): 24 random bits and half a step, so that the log is finite.
  const float u0 = (static_cast<float>(word0 >> 8) + 0.5f) * 0x1p-24f;
  const float u1 = (static_cast<float>(word1 >> 8) + 0.5f) * 0x1p-24f;
  const float radius = std::sqrt(-2.f * log_fast(u0));
  float sine, cosine;
  sincos_turns(u1, sine, cosine);
  normal0 = radius * cosine;
  normal1 = radius * sine;
}

// Standard normals of elements [first, first + count) of seed's stream into out: element e is
// lane e % 4 of the block at counter e / 4, words 0 and 1 of a block giving its lanes 0 and 1,
// words 2 and 3 its lanes 2 and 3.
inline void philox_normal(uint64_t seed, int64_t first, int64_t count, float* out) {
  const int64_t first_block = first / 4, skip = first - 4 * first_block, blocks = (skip + count + 3) / 4;
  alignas(64) PhiloxBlocks words;
  philox_blocks(seed, first_block, 0, 0, blocks, words);
  // Whole blocks go straight to out; a partial one at either end goes through normals.
  alignas(64) float normals[4 * kPhiloxMaxBlocks];
  float* to = skip == 0 && count == 4 * blocks ? out : normals;
#pragma omp simd
  for (int64_t b = 0; b < blocks; ++b) {
    box_muller(words[0][b], words[1][b], to[4 * b], to[4 * b + 1]);
    box_muller(words[2][b], words[3][b], to[4 * b + 2], to[4 * b + 3]);
  }
  if (to == normals) std::copy(normals + skip, normals + skip + count, out);
}

}  // namespace genfast::cpu
