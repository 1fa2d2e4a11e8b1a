// Register-tiled matrix products for the small tiles of blocked kernels (attention):
// C (M x N) = or += A (M x K) B (K x N), with the tile in cache.
//
// Each step of the inner loop broadcasts one element of A per row and multiplies it into
// two vectors of B's row, so A is read through any pair of strides (a transposed operand
// costs nothing), while B and C need unit column stride and N a multiple of kTileColumns.
// Six rows by two vectors keep 12 accumulators in registers: on a 2-core AVX2 EPYC this
// runs attention's 64 x 64 x 64 products at 83-85 GFLOP/s per core (MKL's 2048^3: 86-90),
// where a plain triple loop that GCC auto-vectorises ran at 2 (its accumulators spilled).
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
inline constexpr int64_t kTileColumns = 2 * kVectorBytes / sizeof(T);

// n rounded up to a multiple of kTileColumns<T>: the row length of a B or C buffer.
template <typename T>
constexpr int64_t padded_columns(int64_t n) {
  return (n + kTileColumns<T> - 1) / kTileColumns<T> * kTileColumns<T>;
}

// A typedef in a class template: GCC drops vector_size from a dependent alias template.
template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using Vector = typename VectorOf<T>::type;

namespace detail {

template <int kRows, bool kAccumulate, typename T>
inline __attribute__((always_inline)) void tile_rows(int64_t K, const T* a, int64_t a_row, int64_t a_col, const T* b,
                                                     int64_t ldb, T* c, int64_t ldc) {
  constexpr int kLanes = kVectorBytes / sizeof(T);
  Vector<T> acc[kRows][2];
  // Unrolled by hand: GCC left the loops over the tile rolled, which put the accumulators on
  // the stack and moved each through it in 16-byte halves on the way in and out.
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      if constexpr (kAccumulate) {
        std::memcpy(&acc[i][v], c + i * ldc + v * kLanes, sizeof(Vector<T>));
      } else {
        acc[i][v] = Vector<T>{};
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    Vector<T> row[2];
    std::memcpy(&row[0], b + k * ldb, sizeof(Vector<T>));
    std::memcpy(&row[1], b + k * ldb + kLanes, sizeof(Vector<T>));
    for (int i = 0; i < kRows; ++i) {
      const T ai = a[i * a_row + k * a_col];
      acc[i][0] += ai * row[0];
      acc[i][1] += ai * row[1];
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) std::memcpy(c + i * ldc + v * kLanes, &acc[i][v], sizeof(Vector<T>));
}

}  // namespace detail

// C = A B, or C += A B with kAccumulate. A (M x K) at a[i * a_row + k * a_col]; B (K x N) at
// b[k * ldb + j]; C (M x N) at c[i * ldc + j]; N a multiple of kTileColumns<T>, and the
// columns of B and C up to N allocated (zero padding is the caller's).
//
// Never inlined: inside attention's backward GCC gave the inlined tile too few registers, and
// it moved half its accumulators through the stack on every step of K.
template <bool kAccumulate, typename T>
__attribute__((noinline)) void tile_matmul(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_row, int64_t a_col,
                                           const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int kRows = 6;
  for (int64_t j = 0; j < N; j += kTileColumns<T>) {
    int64_t i = 0;
    for (; i + kRows <= M; i += kRows)
      detail::tile_rows<kRows, kAccumulate>(K, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc);
    const T* a_rest = a + i * a_row;
    T* c_rest = c + i * ldc + j;
    switch (M - i) {
      case 5: detail::tile_rows<5, kAccumulate>(K, a_rest, a_row, a_col, b + j, ldb, c_rest, ldc); break;
      case 4: detail::tile_rows<4, kAccumulate>(K, a_rest, a_row, a_col, b + j, ldb, c_rest, ldc); break;
      case 3: detail::tile_rows<3, kAccumulate>(K, a_rest, a_row, a_col, b + j, ldb, c_rest, ldc); break;
      case 2: detail::tile_rows<2, kAccumulate>(K, a_rest, a_row, a_col, b + j, ldb, c_rest, ldc); break;
      case 1: detail::tile_rows<1, kAccumulate>(K, a_rest, a_row, a_col, b + j, ldb, c_rest, ldc); break;
      default: break;
    }
  }
}

}  // namespace genfast::cpu
