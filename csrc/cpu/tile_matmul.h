// Register-tiled matrix products for the small tiles of blocked kernels (attention):
// C (M x N) = or += A (M x K) B (K x N), with the tile in cache.
//
// Each step of the inner loop broadcasts one element of A per row and multiplies it into
// two vectors of B's row, so A is read through any pair of strides (a transposed operand
// costs nothing), while B and C need unit column stride and N a multiple of a vector.
// Six rows by two vectors keep 12 accumulators in registers: on a 2-core AVX2 EPYC this
// runs attention's 64 x 64 x 64 products at 83-85 GFLOP/s per core (MKL's 2048^3: 86-90),
// where a plain triple loop that GCC auto-vectorises ran at 2 (its accumulators spilled).
// A last strip one vector wide takes eight rows by one vector: padding it to two would
// waste half of a 16-column product's work with AVX-512 (an LSTM cell's batch of 16).
#pragma once

#include <cstdint>
#include <cstring>

namespace genfast::cpu {

#ifdef __AVX512F__
inline constexpr int kVectorBytes = 64;
#else
inline constexpr int kVectorBytes = 32;
#endif

template <typename T>
inline constexpr int64_t kVectorLanes = kVectorBytes / sizeof(T);

// The columns of a full strip: two vectors.
template <typename T>
inline constexpr int64_t kTileColumns = 2 * kVectorLanes<T>;

// n rounded up to a multiple of a vector: the row length of a B or C buffer.
template <typename T>
constexpr int64_t padded_columns(int64_t n) {
  return (n + kVectorLanes<T> - 1) / kVectorLanes<T> * kVectorLanes<T>;
}

// A typedef in a class template: GCC drops vector_size from a dependent alias template.
template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using Vector = typename VectorOf<T>::type;

template <typename T, int kBytes>
struct VectorOfBytes {
  typedef T type __attribute__((vector_size(kBytes)));
};

// The sum of a vector's lanes as a pairwise tree, the vector halved at each step: summed lane
// after lane, GCC kept the order, a chain of dependent scalar adds (with AVX-512, half of a
// streaming LSTM's dot products).
template <typename T, int kBytes = kVectorBytes>
inline T sum_lanes(typename VectorOfBytes<T, kBytes>::type v) {
  if constexpr (kBytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    typename VectorOfBytes<T, kBytes / 2>::type low, high;
    std::memcpy(&low, &v, kBytes / 2);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + kBytes / 2, kBytes / 2);
    return sum_lanes<T, kBytes / 2>(low + high);
  }
}

namespace detail {

template <int kRows, int kVectors, bool kAccumulate, typename T>
inline __attribute__((always_inline)) void tile_rows(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b,
                                                     int64_t ldb, T* c, int64_t ldc) {
  constexpr int kLanes = kVectorLanes<T>;
  Vector<T> acc[kRows][kVectors];
  // Unrolled by hand: GCC left the loops over the tile rolled, which put the accumulators on
  // the stack and moved each through it in 16-byte halves on the way in and out.
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) {
      if constexpr (kAccumulate) {
        std::memcpy(&acc[i][v], c + i * ldc + v * kLanes, sizeof(Vector<T>));
      } else {
        acc[i][v] = Vector<T>{};
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    Vector<T> row[kVectors];
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) std::memcpy(&row[v], b + k * ldb + v * kLanes, sizeof(Vector<T>));
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const T ai = a[i * a_row + k * a_col];
#pragma GCC unroll 2
      for (int v = 0; v < kVectors; ++v) acc[i][v] += ai * row[v];
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < kVectors; ++v) std::memcpy(c + i * ldc + v * kLanes, &acc[i][v], sizeof(Vector<T>));
}

// C's columns [j, j + kVectors vectors) for all M rows: kRows at a time, then the rest.
template <int kRows, int kVectors, bool kAccumulate, typename T>
inline __attribute__((always_inline)) void tile_strip(int64_t M, int64_t K, const T* a, int64_t a_row, int64_t a_col,
                                                      const T* b, int64_t ldb, T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows)
    tile_rows<kRows, kVectors, kAccumulate>(K, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc);
  const T* a_rest = a + i * a_row;
  T* c_rest = c + i * ldc;
  // The rest in one tile, or two past six rows: six, then what remains.
  if constexpr (kRows > 6) {
    if (M - i >= 6) {
      tile_rows<6, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc);
      i += 6, a_rest += 6 * a_row, c_rest += 6 * ldc;
    }
  }
  switch (M - i) {
    case 5: tile_rows<5, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc); break;
    case 4: tile_rows<4, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc); break;
    case 3: tile_rows<3, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc); break;
    case 2: tile_rows<2, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc); break;
    case 1: tile_rows<1, kVectors, kAccumulate>(K, a_rest, a_row, a_col, b, ldb, c_rest, ldc); break;
    default: break;
  }
}

}  // namespace detail

// C = A B, or C += A B with kAccumulate. A (M x K) at a[i * a_row + k * a_col]; B (K x N) at
// b[k * ldb + j]; C (M x N) at c[i * ldc + j]; N a multiple of kVectorLanes<T>, and the
// columns of B and C up to N allocated (zero padding is the caller's).
//
// Never inlined: inside attention's backward GCC gave the inlined tile too few registers, and
// it moved half its accumulators through the stack on every step of K.
template <bool kAccumulate, typename T>
__attribute__((noinline)) void tile_matmul(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_row, int64_t a_col,
                                           const T* b, int64_t ldb, T* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kTileColumns<T> <= N; j += kTileColumns<T>)
    detail::tile_strip<6, 2, kAccumulate>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc);
  if (j < N) detail::tile_strip<8, 1, kAccumulate>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc);
}

}  // namespace genfast::cpu
