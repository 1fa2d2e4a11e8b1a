// 3x3 convolutions with stride 1 by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
// "Fast Algorithms for Convolutional Neural Networks", 2015).
//
// Each 2x2 block of outputs comes from a 4x4 tile of input: transformed (V = B^T d B), the tile
// and the transformed filter (U = G g G^T) multiply elementwise, summed over input channels, and
// the 4x4 product transforms back (Y = A^T M A). Summed over channels, the elementwise product is
// 16 matrix products, one per tile position: M[p] (tiles x K) = V[p] (tiles x C) U[p] (C x K).
// That is 16 multiplies per input-output channel pair and output block where direct convolution
// takes 36, and the products run at the matrix-product rate of the machine, as oneDNN's direct
// convolutions do not at the small images of a latent U-Net (140-250 GFLOP/s on a 2-core Xeon
// whose matrix products reach 300).
//
// F(2x2, 3x3) and not the larger tiles: F(4x4, 3x3) takes 4 multiplies per 1 instead of 2.25,
// but its transforms' coefficients (up to 8 and 1/24) cost accuracy. Against a float64
// reference its float32 error was 15 to 35 times ATen's; F(2x2, 3x3)'s is 1 to 2 times.
//
// Small filters: tiles go in blocks that stay in L2. One parallel task transforms a block's
// input, takes its 16 products (tile_matmul.h), and transforms them straight into the output,
// so the transformed data (16/4 times the input's size) never goes to memory. Apart, through
// ATen's bmm, the three steps ran a 4 x 32 x 32 x 32 image no faster than oneDNN (270 against
// 300 us): V and M, 2 MB each, went to L3 and back at 64 flops per value.
//
// Large filters: the three steps apart, the products by ATen's batched matrix product (MKL).
// There a tile's transformed input is too large for a block of them to share the filters in
// cache (40 KB at 640 channels): fused, Stable Diffusion's 640-channel convolution ran at half
// the matrix-product rate, while each value of V and M now meets hundreds of flops.
//
// The input is read channels-last, (N, H, W, C), so each transform runs over channels in vector
// lanes; a channels-first input is transposed to that layout first, and the output back.
//
// The backward by the same algorithm: the input's gradient is the full correlation of the
// output's gradient with the filters flipped and transposed, a 3x3 stride-1 convolution of its
// own (conv2d_winograd_weight(weight, flipped) makes its filters); the filters' gradient sums,
// over tiles, products of the input's transformed tiles with the output gradient's tiles
// transformed by the output transform's adjoint (filters_gradient).
//
// The input may be upsampled first, by nearest neighbours, as diffusers' Upsample2D and every
// U-Net decoder do before a 3x3 convolution: a tile's pixels then point into the small image, and
// the upsampled one is never made. (torch's CPU upsampling of a channels-first image converts it
// to channels-last and back: 355 us for 4 x 64 x 16 x 16, where the convolution takes 700.)

#include "conv.h"

#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <memory>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "tile_matmul.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

// The bytes a block's transformed input and products may take: half of a 512 KB L2.
constexpr int64_t kBlockBytes = 256 << 10;
// The bytes of transformed filters one task multiplies by: a filter chunk stays in L2 across the
// blocks of tiles a thread takes, rather than stream from L3 once per block.
constexpr int64_t kFilterBytes = 512 << 10;
// The largest transformed filters that take the fused blocks; larger ones go through ATen's bmm.
constexpr int64_t kFusedFilterBytes = 1 << 20;
constexpr int64_t kTileRows = 6;  // tile_matmul's rows per register tile
constexpr int64_t kLineFloats = 16;  // a cache line

struct TileGrid {
  int64_t N, H, W, C, K, pad_h, pad_w;
  int64_t upsample = 1;  // H and W are the upsampled input's: the image read is H / upsample high
  int64_t out_h() const { return H + 2 * pad_h - 2; }
  int64_t out_w() const { return W + 2 * pad_w - 2; }
  int64_t rows() const { return (out_h() + 1) / 2; }
  int64_t cols() const { return (out_w() + 1) / 2; }
  int64_t tiles() const { return N * rows() * cols(); }
  int64_t padded_k() const { return padded_columns<float>(K); }
};

inline bool fused_products(int64_t C, int64_t Kp) { return 16 * C * Kp * int64_t(sizeof(float)) <= kFusedFilterBytes; }

// Where filter column k of row c sits in one position's transformed filters (C x Kp). For the
// fused blocks: in panels of tile_matmul's strip width, each panel's rows contiguous, so a strip
// of products streams its filters from one run of memory (from rows 512 B apart, the loads of
// the filters took 29% of the samples at 256 to 128 channels). For bmm: row-major.
inline int64_t filter_offset(int64_t c, int64_t k, int64_t C, int64_t Kp) {
  if (!fused_products(C, Kp)) return c * Kp + k;
  const int64_t start = k / kTileColumns<float> * kTileColumns<float>;
  const int64_t width = std::min(kTileColumns<float>, Kp - start);
  return start * C + c * width + (k - start);
}

// How the work splits into tasks: blocks of tiles times chunks of output channels.
struct Schedule {
  int64_t block, blocks, k_chunk, k_chunks;

  // Large filters split into up to a chunk per thread (each chunk's tasks are consecutive, so a
  // thread keeps its chunk in cache); blocks as large as fit kBlockBytes, but at least four
  // tasks per thread, so the threads finish together; a multiple of tile_matmul's rows.
  explicit Schedule(const TileGrid& g) {
    const int64_t threads = at::get_num_threads(), Kp = g.padded_k();
    const int64_t filter_bytes = 16 * g.C * Kp * int64_t(sizeof(float));
    k_chunks = std::clamp<int64_t>(filter_bytes / kFilterBytes, 1, threads);
    constexpr int64_t strip = kTileColumns<float>;
    k_chunk = std::min(Kp, ((Kp + k_chunks - 1) / k_chunks + strip - 1) / strip * strip);
    k_chunks = (Kp + k_chunk - 1) / k_chunk;
    const int64_t fit = kBlockBytes / (16 * int64_t(sizeof(float)) * (g.C + k_chunk));
    const int64_t share = (g.tiles() * k_chunks + 4 * threads - 1) / (4 * threads);
    block = std::max<int64_t>(kTileRows, std::min(fit, share) / kTileRows * kTileRows);
    blocks = (g.tiles() + block - 1) / block;
  }
};

// Calls visit(c, tap, k) for every input channel c < channels, tap < 9 and filter k < filters, in
// the order that walks a weight of these strides with its smallest stride innermost: each line
// of it is used up while in L1, read or written. (The taps' stride is their columns'.)
template <class Visit>
void walk_filters(int64_t channels, int64_t filters, int64_t channel_stride, int64_t tap_stride,
                  int64_t filter_stride, Visit visit) {
  if (tap_stride < std::min(channel_stride, filter_stride)) {  // channels-first: a filter's taps
    for (int64_t k = 0; k < filters; ++k)
      for (int64_t c = 0; c < channels; ++c)
        for (int tap = 0; tap < 9; ++tap) visit(c, tap, k);
  } else if (channel_stride < filter_stride) {  // channels-last: a tap's channels
    for (int64_t k = 0; k < filters; ++k)
      for (int tap = 0; tap < 9; ++tap)
        for (int64_t c = 0; c < channels; ++c) visit(c, tap, k);
  } else {  // a flipped channels-last weight: a tap's filters
    for (int64_t c = 0; c < channels; ++c)
      for (int tap = 0; tap < 9; ++tap)
        for (int64_t k = 0; k < filters; ++k) visit(c, tap, k);
  }
}

#ifdef __AVX__
// The 8x8 block at src (rows lds apart) transposed into dst (rows ldd apart), in registers.
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], pairs[8], quads[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // interleave rows i and i + 1
    pairs[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    pairs[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)  // then pairs of pairs: columns within each 128-bit half
    for (int j = 0; j < 2; ++j) {
      quads[i + 2 * j] = _mm256_shuffle_ps(pairs[i + j], pairs[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      quads[i + 2 * j + 1] = _mm256_shuffle_ps(pairs[i + j], pairs[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int i = 0; i < 4; ++i) {  // then the halves: rows 0-3 with rows 4-7
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(quads[i], quads[i + 4], 0x31));
  }
}
#endif

// dst (N, cols, rows) = src (N, rows, cols) transposed: a channels-first image to channels-last
// (rows = channels, cols = pixels) or back. Through ATen's layout conversion it ran at an eighth
// of a copy's speed (177 us for a 4 x 64 x 32 x 32 image, where a copy takes 23).
void transpose_batched(const float* src, float* dst, int64_t N, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 8;
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock;
  at::parallel_for(0, N * row_blocks, std::max<int64_t>(1, 4096 / cols), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / row_blocks, r0 = task % row_blocks * kBlock, r1 = std::min(rows, r0 + kBlock);
      const float* in = src + n * rows * cols;
      float* out = dst + n * rows * cols;
      int64_t c0 = 0;
#ifdef __AVX__
      if (r1 - r0 == kBlock)
        for (; c0 + kBlock <= cols; c0 += kBlock) transpose_8x8(in + r0 * cols + c0, cols, out + c0 * rows + r0, rows);
#endif
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
    }
  });
}

// v[p * plane + c] = (B^T d B)[p] of tile t, with B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
// Reads the tile's 4x4 pixels of x (N, H, W, C); pixels in the padding read `zeros` (C of them).
void transform_input_tile(const float* x, const float* zeros, const TileGrid& g, int64_t t, float* v,
                          int64_t plane) {
  const int64_t n = t / (g.rows() * g.cols()), ty = t / g.cols() % g.rows(), tx = t % g.cols();
  // The image's row and column of each of the tile's 4 rows and columns, or -1 in the padding.
  // Divisions only when upsampled: 32 of them a tile cost more than the transform of 32 channels.
  // A row's pointer plus a column's offset: 8 multiplies a tile rather than 16 (at 32 channels
  // the pointers took as long as the transform).
  const int64_t u = g.upsample;
  const float* row[4];
  int64_t col[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t y = 2 * ty - g.pad_h + i, xx = 2 * tx - g.pad_w + i;
    row[i] = y < 0 || y >= g.H ? nullptr : x + (n * (g.H / u) + (u == 1 ? y : y / u)) * (g.W / u) * g.C;
    col[i] = xx < 0 || xx >= g.W ? -1 : (u == 1 ? xx : xx / u) * g.C;
  }
  const float* d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) d[i][j] = row[i] == nullptr || col[j] < 0 ? zeros : row[i] + col[j];
#pragma omp simd
  for (int64_t c = 0; c < g.C; ++c) {
    float r[4][4];  // B^T d: combinations of the tile's rows
    for (int j = 0; j < 4; ++j) {
      r[0][j] = d[0][j][c] - d[2][j][c];
      r[1][j] = d[1][j][c] + d[2][j][c];
      r[2][j] = d[2][j][c] - d[1][j][c];
      r[3][j] = d[1][j][c] - d[3][j][c];
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B: the same combinations of its columns
      v[(4 * i + 0) * plane + c] = r[i][0] - r[i][2];
      v[(4 * i + 1) * plane + c] = r[i][1] + r[i][2];
      v[(4 * i + 2) * plane + c] = r[i][2] - r[i][1];
      v[(4 * i + 3) * plane + c] = r[i][1] - r[i][3];
    }
  }
}

// What the output transform adds to the convolution: a bias (K) and a residual (N, out_h, out_w, K)
// read through its strides (a channel's stride is 1; a broadcast dimension's is 0); either may
// be absent (null). A ResNet block's skip connection and a U-Net's timestep embedding are added
// here, rather than in a pass of their own over the output.
struct Addends {
  const float* bias = nullptr;
  const float* residual = nullptr;
  int64_t residual_n = 0, residual_h = 0, residual_w = 0;

  // The addends of output channels k0 and on.
  Addends from_channel(int64_t k0) const {
    return {bias ? bias + k0 : nullptr, residual ? residual + k0 : nullptr, residual_n, residual_h, residual_w};
  }
};

// Tile t's 2x2 outputs A^T M A + the addends for g.K channels, with A^T = [1 1 1 0; 0 1 -1 -1],
// from m[p * plane + k]; written to y (N, out_h, out_w, pixel_stride), the outputs past the
// image's edge to `discard` (g.K floats).
template <bool kResidual>
void transform_output_tile(const float* m, int64_t plane, const Addends& add, float* y, float* discard,
                           const TileGrid& g, int64_t pixel_stride, int64_t t) {
  const int64_t n = t / (g.rows() * g.cols()), ty = t / g.cols() % g.rows(), tx = t % g.cols();
  float* out[2][2];
  const float* residual[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
      const bool inside = oy < g.out_h() && ox < g.out_w();
      out[i][j] = inside ? y + ((n * g.out_h() + oy) * g.out_w() + ox) * pixel_stride : discard;
      if constexpr (kResidual)
        residual[i][j] = inside ? add.residual + n * add.residual_n + oy * add.residual_h + ox * add.residual_w
                                : discard;
    }
#pragma omp simd
  for (int64_t k = 0; k < g.K; ++k) {
    float r[2][4];  // A^T M
    for (int j = 0; j < 4; ++j) {
      const float m0 = m[j * plane + k], m1 = m[(4 + j) * plane + k], m2 = m[(8 + j) * plane + k],
                  m3 = m[(12 + j) * plane + k];
      r[0][j] = m0 + m1 + m2;
      r[1][j] = m1 - m2 - m3;
    }
    const float b = add.bias ? add.bias[k] : 0.0f;
    for (int i = 0; i < 2; ++i) {
      float first = r[i][0] + r[i][1] + r[i][2] + b, second = r[i][1] - r[i][2] - r[i][3] + b;
      if constexpr (kResidual) {
        first += residual[i][0][k];
        second += residual[i][1][k];
      }
      out[i][0][k] = first;
      out[i][1][k] = second;
    }
  }
}

void transform_output_tile(const float* m, int64_t plane, const Addends& add, float* y, float* discard,
                           const TileGrid& g, int64_t pixel_stride, int64_t t) {
  if (add.residual) {
    transform_output_tile<true>(m, plane, add, y, discard, g, pixel_stride, t);
  } else {
    transform_output_tile<false>(m, plane, add, y, discard, g, pixel_stride, t);
  }
}

// The convolution of x (N, H, W, C) into y (N, out_h, out_w, K) by fused blocks, task by task.
void convolve_blocks(const float* x, const float* U, const Addends& add, float* y, const TileGrid& g) {
  const Schedule s(g);
  const int64_t T = g.tiles(), C = g.C, Kp = g.padded_k();
  at::parallel_for(0, s.blocks * s.k_chunks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<float> zeros(C, 0.0f);
    // Not zeroed: every value read is written.
    const std::unique_ptr<float[]> V(new float[16 * s.block * C]), M(new float[16 * s.block * s.k_chunk]);
    std::vector<float> discard(g.K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task % s.blocks * s.block, count = std::min(s.block, T - first);
      const int64_t k0 = task / s.blocks * s.k_chunk, k_count = std::min(s.k_chunk, Kp - k0);
      const TileGrid chunk{g.N, g.H, g.W, C, std::min(k_count, g.K - k0), g.pad_h, g.pad_w, g.upsample};
      for (int64_t t = 0; t < count; ++t)
        transform_input_tile(x, zeros.data(), g, first + t, V.get() + t * C, s.block * C);
      for (int p = 0; p < 16; ++p)
        for (int64_t j = 0; j < k_count; j += kTileColumns<float>) {
          const int64_t width = std::min(kTileColumns<float>, Kp - k0 - j);
          tile_matmul<false>(count, width, C, V.get() + p * s.block * C, C, 1, U + p * C * Kp + (k0 + j) * C, width,
                             M.get() + p * s.block * s.k_chunk + j, s.k_chunk);
        }
      for (int64_t t = 0; t < count; ++t)
        transform_output_tile(M.get() + t * s.k_chunk, s.block * s.k_chunk, add.from_channel(k0),
                              y + k0, discard.data(), chunk, g.K, first + t);
    }
  });
}

// The same convolution by its three steps apart, the products through ATen's bmm.
void convolve_batched(const float* x, const Tensor& U, const Addends& add, float* y, const TileGrid& g) {
  const int64_t T = g.tiles(), C = g.C, Kp = g.padded_k();
  Tensor V = at::empty({16, T, C}, U.options());
  float* v = V.data_ptr<float>();
  at::parallel_for(0, T, kTileRows, [&](int64_t begin, int64_t end) {
    const std::vector<float> zeros(C, 0.0f);
    for (int64_t t = begin; t < end; ++t) transform_input_tile(x, zeros.data(), g, t, v + t * C, T * C);
  });
  const Tensor M = at::bmm(V, U);
  const float* m = M.data_ptr<float>();
  at::parallel_for(0, T, kTileRows, [&](int64_t begin, int64_t end) {
    std::vector<float> discard(g.K);
    for (int64_t t = begin; t < end; ++t) transform_output_tile(m + t * Kp, T * Kp, add, y, discard.data(), g, g.K, t);
  });
}

void convolve(const float* x, const Tensor& U, const Addends& add, float* y, const TileGrid& g) {
  if (fused_products(g.C, g.padded_k())) {
    convolve_blocks(x, U.data_ptr<float>(), add, y, g);
  } else {
    convolve_batched(x, U, add, y, g);
  }
}

// z[p * plane + k] = (A dY A^T)[p] of tile t's 2x2 outputs dY, for K channels, zero up to Kp: the
// gradient of the 16 products M[p], the output transform's adjoint. Reads dy (N, out_h, out_w,
// K); outputs past the image's edge read `zeros`. Adds the tile's outputs, one sum per channel, to
// bias_sum unless it is null: (A dY A^T)[5] is that sum.
void transform_gradient_tile(const float* dy, const float* zeros, const TileGrid& g, int64_t t, float* z,
                             int64_t plane, float* bias_sum) {
  const int64_t n = t / (g.rows() * g.cols()), ty = t / g.cols() % g.rows(), tx = t % g.cols();
  const float* d[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
      d[i][j] = oy < g.out_h() && ox < g.out_w() ? dy + ((n * g.out_h() + oy) * g.out_w() + ox) * g.K : zeros;
    }
#pragma omp simd
  for (int64_t k = 0; k < g.K; ++k) {
    // A dY, with A = [1 0; 1 1; 1 -1; 0 -1]: four rows of two
    const float r[4][2] = {{d[0][0][k], d[0][1][k]},
                           {d[0][0][k] + d[1][0][k], d[0][1][k] + d[1][1][k]},
                           {d[0][0][k] - d[1][0][k], d[0][1][k] - d[1][1][k]},
                           {-d[1][0][k], -d[1][1][k]}};
    for (int i = 0; i < 4; ++i) {  // (A dY) A^T: the same combinations of its columns
      z[(4 * i + 0) * plane + k] = r[i][0];
      z[(4 * i + 1) * plane + k] = r[i][0] + r[i][1];
      z[(4 * i + 2) * plane + k] = r[i][0] - r[i][1];
      z[(4 * i + 3) * plane + k] = -r[i][1];
    }
    if (bias_sum) bias_sum[k] += r[1][0] + r[1][1];
  }
  for (int p = 0; p < 16; ++p) std::fill(z + p * plane + g.K, z + p * plane + g.padded_k(), 0.0f);
}

// The filters' gradient is dW (K, C, 3, 3) = G^T M G, M[p] = the sum over tiles of V[p]^T Z[p]:
// V the input's tiles transformed as the forward does and Z the output gradient's, so the 16
// products' gradients are (tiles x C)^T (tiles x K) products. Two ways to sum them, each into
// `partials` (16, C, Kp) sums that dW adds up, and each also summing dy per channel (the bias's
// gradient) into bias_partials (threads, K).

// Many tiles: each thread sums its blocks of tiles, whose transforms stay in L2 as in
// convolve_blocks, into a (16, C, Kp) of its own. Returns the number of partial sums, one per thread.
int64_t products_by_thread(const float* x, const float* dy, const TileGrid& g, float* partials,
                           float* bias_partials) {
  const int64_t T = g.tiles(), C = g.C, Kp = g.padded_k();
  const int64_t threads = at::get_num_threads();
  // Deep enough products that each accumulator tile loads and stores once per 32 tiles or more.
  const int64_t fit = kBlockBytes / (16 * int64_t(sizeof(float)) * (C + Kp));
  const int64_t block = std::clamp<int64_t>(std::min(fit, (T + 4 * threads - 1) / (4 * threads)), 32, 256);
  const int64_t blocks = (T + block - 1) / block;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {  // each thread zeroes its own sums
    std::fill(partials + begin * 16 * C * Kp, partials + end * 16 * C * Kp, 0.0f);
  });
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    float* M = partials + thread * 16 * C * Kp;
    float* bias_sum = bias_partials ? bias_partials + thread * g.K : nullptr;
    const std::vector<float> zeros(std::max(C, g.K), 0.0f);
    // A line past each position's plane: at a power-of-two plane the 16 rows a tile writes would share one set of L1.
    const int64_t v_plane = block * C + kLineFloats, z_plane = block * Kp + kLineFloats;
    // Not zeroed: every value read is written (zeroing took 8% of an 8 x 8 image's filters' gradient).
    const std::unique_ptr<float[]> V(new float[16 * v_plane]), Z(new float[16 * z_plane]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task * block, count = std::min(block, T - first);
      for (int64_t t = 0; t < count; ++t) {
        transform_input_tile(x, zeros.data(), g, first + t, V.get() + t * C, v_plane);
        transform_gradient_tile(dy, zeros.data(), g, first + t, Z.get() + t * Kp, z_plane, bias_sum);
      }
      for (int p = 0; p < 16; ++p)  // M[p] (C x Kp) += V[p]^T Z[p]: V read down its columns
        tile_matmul<true>(C, Kp, count, V.get() + p * v_plane, 1, C, Z.get() + p * z_plane, Kp, M + p * C * Kp, Kp);
    }
  });
  return threads;
}

// Few tiles: every tile transformed first, then a task per position and block of input channels
// takes its rows of M[p] over all the tiles at once, so there are no threads' sums to zero and
// add (at 128 x 128 channels, 1 MB a thread, as long as the products of 64 tiles). Returns 1.
int64_t products_at_once(const float* x, const float* dy, const TileGrid& g, float* partials,
                         float* bias_partials) {
  const int64_t T = g.tiles(), C = g.C, Kp = g.padded_k();
  const int64_t v_plane = T * C + kLineFloats, z_plane = T * Kp + kLineFloats;
  const std::unique_ptr<float[]> V(new float[16 * v_plane]), Z(new float[16 * z_plane]);  // as in products_by_thread
  at::parallel_for(0, T, kTileRows, [&](int64_t begin, int64_t end) {
    float* bias_sum = bias_partials ? bias_partials + at::get_thread_num() * g.K : nullptr;
    const std::vector<float> zeros(std::max(C, g.K), 0.0f);
    for (int64_t t = begin; t < end; ++t) {
      transform_input_tile(x, zeros.data(), g, t, V.get() + t * C, v_plane);
      transform_gradient_tile(dy, zeros.data(), g, t, Z.get() + t * Kp, z_plane, bias_sum);
    }
  });
  const int64_t row_blocks = (C + 4 * kTileRows - 1) / (4 * kTileRows);
  at::parallel_for(0, 16 * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / row_blocks, c0 = task % row_blocks * 4 * kTileRows;
      tile_matmul<false>(std::min(4 * kTileRows, C - c0), Kp, T, V.get() + p * v_plane + c0, 1, C,
                         Z.get() + p * z_plane, Kp, partials + (p * C + c0) * Kp, Kp);
    }
  });
  return 1;
}

// The most bytes the tiles' transforms may take for products_at_once: at 4 MB (256 tiles of 128
// channels) its products, streaming them from L3, ran slower than each thread's own sums.
constexpr int64_t kAtOnceBytes = 2 << 20;

// dW and db (unless it is null) from the input x (N, H, W, C) and the output's gradient dy (N,
// out_h, out_w, K); dW's (k, c, tap) at dw[k * filter_stride + c * channel_stride + tap * tap_stride].
void filters_gradient(const float* x, const float* dy, const TileGrid& g, float* dw, int64_t filter_stride,
                      int64_t channel_stride, int64_t tap_stride, float* db) {
  const int64_t C = g.C, K = g.K, Kp = g.padded_k(), threads = at::get_num_threads();
  std::vector<float> bias_sums(db ? threads * K : 0, 0.0f);
  float* bias_partials = db ? bias_sums.data() : nullptr;
  const bool at_once = 16 * g.tiles() * (C + Kp) * int64_t(sizeof(float)) <= kAtOnceBytes;
  const std::unique_ptr<float[]> sums(new float[(at_once ? 1 : threads) * 16 * C * Kp]);  // each way fills its own
  const int64_t partials = at_once ? products_at_once(x, dy, g, sums.get(), bias_partials)
                                   : products_by_thread(x, dy, g, sums.get(), bias_partials);
  if (db)
    for (int64_t k = 0; k < K; ++k) {
      db[k] = 0.0f;
      for (int64_t thread = 0; thread < threads; ++thread) db[k] += bias_sums[thread * K + k];
    }
  // A task per block of input channels and of filters, a vector of them: the partial sums load as
  // vectors. (A filter at a time, their 16 scalar loads, each from another line, took a third of
  // the time at 64 tiles of 128 channels.) The block's taps are written along dw's smallest
  // stride: a channel at a time, its 9 x 16 scattered stores took half of the filters' gradient
  // at 8 x 8 pixels of 128 channels.
  constexpr int64_t kLanes = kVectorLanes<float>, kChannels = kLineFloats;
  const int64_t channel_blocks = (C + kChannels - 1) / kChannels;
  at::parallel_for(0, channel_blocks * ((K + kLanes - 1) / kLanes), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task % channel_blocks * kChannels, k0 = task / channel_blocks * kLanes;
      const int64_t channels = std::min(kChannels, C - c0);
      float w[kChannels][9][kLanes];  // tap t of filter k0 + l, input channel c0 + c
      for (int64_t c = 0; c < channels; ++c) {
        // The partial sums added, from the first: zeroing m first took 7% of the filters' gradient.
        float m[16][kLanes];
        for (int64_t part = 0; part < partials; ++part)
          for (int p = 0; p < 16; ++p) {
            const float* sum = sums.get() + ((part * 16 + p) * C + c0 + c) * Kp + k0;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) m[p][l] = (part ? m[p][l] : 0.0f) + sum[l];
          }
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          float r[3][4];  // G^T m, with G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1]
          for (int j = 0; j < 4; ++j) {
            r[0][j] = m[j][l] + 0.5f * (m[4 + j][l] + m[8 + j][l]);
            r[1][j] = 0.5f * (m[4 + j][l] - m[8 + j][l]);
            r[2][j] = 0.5f * (m[4 + j][l] + m[8 + j][l]) + m[12 + j][l];
          }
          for (int i = 0; i < 3; ++i) {  // (G^T m) G
            w[c][3 * i + 0][l] = r[i][0] + 0.5f * (r[i][1] + r[i][2]);
            w[c][3 * i + 1][l] = 0.5f * (r[i][1] - r[i][2]);
            w[c][3 * i + 2][l] = 0.5f * (r[i][1] + r[i][2]) + r[i][3];
          }
        }
      }
      float* block = dw + k0 * filter_stride + c0 * channel_stride;
      walk_filters(channels, std::min(kLanes, K - k0), channel_stride, tap_stride, filter_stride,
                   [&](int64_t c, int tap, int64_t k) {
                     block[k * filter_stride + c * channel_stride + tap * tap_stride] = w[c][tap][k];
                   });
    }
  });
}

// One input channel's row of a panel of transformed filters, U = G g G^T, from its taps f (tap t of
// filter l at f[t][l]), the filters in vector lanes (a filter at a time, the transform's scalar
// arithmetic took 220 us at 128 x 128 channels); the 16 positions' rows written `plane` floats
// apart from panel, `width` filters of them. plane is a power of two at usual sizes, so the rows'
// lines share one set of L1: written a value at a time they evicted each other (1 ms at 256 to
// 128 channels), so they are made in registers first.
inline void transform_filters(const float (&f)[9][kTileColumns<float>], int64_t width, float* panel, int64_t plane) {
  constexpr int64_t kPanel = kTileColumns<float>;
  float rows[16][kPanel];
#pragma omp simd
  for (int64_t l = 0; l < kPanel; ++l) {
    float r[4][3];  // G g, with G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
    for (int j = 0; j < 3; ++j) {
      r[0][j] = f[j][l];
      r[1][j] = 0.5f * (f[j][l] + f[3 + j][l] + f[6 + j][l]);
      r[2][j] = 0.5f * (f[j][l] - f[3 + j][l] + f[6 + j][l]);
      r[3][j] = f[6 + j][l];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      rows[4 * i][l] = r[i][0];
      rows[4 * i + 1][l] = 0.5f * (r[i][0] + r[i][1] + r[i][2]);
      rows[4 * i + 2][l] = 0.5f * (r[i][0] - r[i][1] + r[i][2]);
      rows[4 * i + 3][l] = r[i][2];
    }
  }
  if (width == kPanel) {  // a copy of constant length: inlined, where a call per row took a tenth of the time
    for (int p = 0; p < 16; ++p) std::copy_n(rows[p], kPanel, panel + p * plane);
  } else {
    for (int p = 0; p < 16; ++p) std::copy_n(rows[p], width, panel + p * plane);
  }
}

}  // namespace

Tensor conv2d_winograd_weight(const Tensor& weight, bool flipped) {
  // Read through its strides: a channels-last model's weights are, and a copy of 128 x 128 filters took 90 us.
  const Tensor& w = weight;
  const int64_t K = w.size(flipped ? 1 : 0), C = w.size(flipped ? 0 : 1), Kp = padded_columns<float>(K);
  const int64_t filter_stride = w.stride(flipped ? 1 : 0), channel_stride = w.stride(flipped ? 0 : 1);
  const int64_t row_stride = w.stride(2), column_stride = w.stride(3);
  Tensor U = at::empty({16, C, Kp}, w.options());
  const float* g = w.data_ptr<float>();
  float* u = U.data_ptr<float>();
  // A task per panel of filters and block of input channels.
  constexpr int64_t kPanel = kTileColumns<float>;
  constexpr int64_t kChannels = kLineFloats;
  const int64_t panels = (Kp + kPanel - 1) / kPanel, channel_blocks = (C + kChannels - 1) / kChannels;
  at::parallel_for(0, channel_blocks * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task % channel_blocks * kChannels, k0 = task / channel_blocks * kPanel;
      const int64_t channels = std::min(kChannels, C - c0), width = std::min(kPanel, Kp - k0);
      // The block's taps gathered along the weight's smallest stride. A channel at a time, a
      // channels-last panel's taps (filters 9 C floats apart) fell in four sets of L1 and missed it
      // every load: the gather took 80% of the transform's 350-700 us at 256 to 128 channels.
      float f[kChannels][9][kPanel];  // tap t of filter k0 + l, flipped: the last tap first; zero past K
      if (K - k0 < kPanel) std::fill_n(&f[0][0][0], kChannels * 9 * kPanel, 0.0f);
      const float* block = g + k0 * filter_stride + c0 * channel_stride;
      walk_filters(channels, std::min(kPanel, K - k0), channel_stride, column_stride, filter_stride,
                   [&](int64_t c, int tap, int64_t k) {
                     const int at = flipped ? 8 - tap : tap;
                     f[c][tap][k] = block[k * filter_stride + c * channel_stride + at / 3 * row_stride +
                                          at % 3 * column_stride];
                   });
      for (int64_t c = 0; c < channels; ++c)
        transform_filters(f[c], width, u + filter_offset(c0 + c, k0, C, Kp), C * Kp);
    }
  });
  return U;
}

Tensor conv2d_winograd(const Tensor& x, const Tensor& U, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, int64_t out_channels, int64_t pad_h, int64_t pad_w,
                       int64_t upsample) {
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const TileGrid g{x.size(0), upsample * x.size(2), upsample * x.size(3), x.size(1), out_channels, pad_h, pad_w,
                   upsample};
  const auto options = x.options();
  Tensor y = at::empty({g.N, g.K, g.out_h(), g.out_w()}, options.memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return channels_last ? y : y.contiguous();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  Addends add;
  add.bias = bias ? b.data_ptr<float>() : nullptr;
  if (residual) {
    add.residual = residual->data_ptr<float>();
    add.residual_n = residual->stride(0), add.residual_h = residual->stride(2), add.residual_w = residual->stride(3);
  }
  if (channels_last) {
    convolve(x.data_ptr<float>(), U.contiguous(), add, y.data_ptr<float>(), g);
    return y;
  }
  const Tensor input = x.contiguous(), pixels = at::empty({g.N, x.size(2), x.size(3), g.C}, options);
  transpose_batched(input.data_ptr<float>(), pixels.data_ptr<float>(), g.N, g.C, x.size(2) * x.size(3));
  convolve(pixels.data_ptr<float>(), U.contiguous(), add, y.data_ptr<float>(), g);
  Tensor out = at::empty({g.N, g.K, g.out_h(), g.out_w()}, options);
  transpose_batched(y.data_ptr<float>(), out.data_ptr<float>(), g.N, g.out_h() * g.out_w(), g.K);
  return out;
}


std::tuple<Tensor, Tensor> conv2d_winograd_filters_backward(const Tensor& x, const Tensor& dy, int64_t pad_h,
                                                           int64_t pad_w, int64_t upsample, bool bias,
                                                           bool filters_channels_last) {
  const TileGrid g{x.size(0), upsample * x.size(2), upsample * x.size(3), x.size(1), dy.size(1), pad_h, pad_w,
                   upsample};
  const auto options = x.options();
  Tensor dw = at::empty({g.K, g.C, 3, 3}, options.memory_format(filters_channels_last ? at::MemoryFormat::ChannelsLast
                                                                                     : at::MemoryFormat::Contiguous));
  Tensor db = bias ? at::empty({g.K}, options) : Tensor();
  float* db_data = bias ? db.data_ptr<float>() : nullptr;
  // Both read channels-last: each transform runs over channels in vector lanes.
  auto pixels = [&](const Tensor& t) {
    if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
    const Tensor input = t.contiguous();
    Tensor out = at::empty({t.size(0), t.size(2), t.size(3), t.size(1)}, options);
    transpose_batched(input.data_ptr<float>(), out.data_ptr<float>(), t.size(0), t.size(1), t.size(2) * t.size(3));
    return out;
  };
  // A 3x3 filter's taps are one stride apart in either layout.
  filters_gradient(pixels(x).data_ptr<float>(), pixels(dy).data_ptr<float>(), g, dw.data_ptr<float>(), dw.stride(0),
                   dw.stride(1), dw.stride(3), db_data);
  return {dw, db};
}

}  // namespace genfast::cpu
