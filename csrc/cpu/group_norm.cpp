// GroupNorm with a fused activation on the CPU.
//
// Channels-first (N, C, S): a group is one contiguous run of cpg * S values,
// so each (n, group) is one task: a read pass for the statistics, then a
// normalise+activate pass that finds the group still in L2 (the SD U-Net's
// 10 x 64 x 64 fp32 group is 160 KB). Channels-last (N, S, C): tasks are
// blocks of rows; per-channel partial sums are reduced into group statistics
// between the two passes.
//
// Statistics use shifted data: sums of (x - K) and (x - K)^2 with K the first
// value of the group, so a large mean does not cancel the variance away. Sums
// run in float lanes over chunks and in double across chunks.

#include "norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "../layout.h"
#include "activation.h"
#include "memory.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 4096;  // values summed in float lanes before going to double
constexpr int64_t kRows = 64;     // channels-last rows per task

struct GroupShape {
  int64_t N, C, S, G;
  int64_t cpg() const { return C / G; }
  int64_t group_size() const { return cpg() * S; }
  int64_t row_blocks() const { return (S + kRows - 1) / kRows; }
};

// mean and 1/sqrt(var + eps) from sums of (x - pivot) over `count` values.
template <typename acc_t>
void finish_moments(double sum, double sumsq, double count, double pivot, double eps, acc_t& mean, acc_t& rstd) {
  const double shift_mean = sum / count;
  const double var = std::max(sumsq / count - shift_mean * shift_mean, 0.0);
  mean = static_cast<acc_t>(pivot + shift_mean);
  rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
}

template <typename scalar_t, typename acc_t>
void shifted_sums(const scalar_t* x, int64_t len, acc_t pivot, double& sum, double& sumsq) {
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t end = std::min(len, start + kChunk);
    acc_t s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = start; i < end; ++i) {
      const acc_t d = static_cast<acc_t>(x[i]) - pivot;
      s += d;
      q += d * d;
    }
    sum += s;
    sumsq += q;
  }
}

// The output is x * scale + shift, shift = b - mean * scale folded per channel: one operation per
// element fewer than (x - mean) * scale + b, a few percent of GroupNorm+SiLU. But the folded shift
// rounds at |mean| * scale, which in a near-constant group (rstd up to 1/sqrt(eps)) dwarfs the
// output. Past |mean| * rstd = kFoldedLimit the mean is subtracted first; so it is where the
// scale is not finite (an infinite weight), as x * inf - inf would be NaN.
constexpr double kFoldedLimit = 4;

template <typename acc_t>
bool needs_centring(acc_t mean, acc_t rstd, acc_t scale) {
  return !(std::abs(mean) * rstd <= acc_t(kFoldedLimit) && std::isfinite(scale));
}

// y[i] = act(((x[i] - centre[i]) or x[i]) * scale[i] + shift[i]) over n values; kStep 0 reads
// element 0 of centre, scale and shift for every i (one channel's run), 1 reads element i.
template <bool kCentred, int kStep, typename Act, typename scalar_t, typename acc_t>
void normalise(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* centre, const acc_t* scale,
               const acc_t* shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    const acc_t u = kCentred ? v - centre[i * kStep] : v;
    y[i] = static_cast<scalar_t>(Act::forward(u * scale[i * kStep] + shift[i * kStep]));
  }
}

template <typename Act, typename scalar_t, typename acc_t>
void forward_channels_first(const scalar_t* x, const acc_t* weight, const acc_t* bias, scalar_t* y, acc_t* mean,
                            acc_t* rstd, GroupShape shape, double eps) {
  const int64_t cpg = shape.cpg(), len = shape.group_size(), S = shape.S;
  at::parallel_for(0, shape.N * shape.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const scalar_t* xg = x + ng * len;
      scalar_t* yg = y + ng * len;
      const acc_t pivot = static_cast<acc_t>(xg[0]);
      double sum = 0, sumsq = 0;
      shifted_sums(xg, len, pivot, sum, sumsq);
      finish_moments(sum, sumsq, double(len), double(pivot), eps, mean[ng], rstd[ng]);
      const int64_t c0 = (ng % shape.G) * cpg;
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t scale = rstd[ng] * weight[c0 + c];
        const bool centred = needs_centring(mean[ng], rstd[ng], scale);
        const acc_t shift = centred ? bias[c0 + c] : bias[c0 + c] - mean[ng] * scale;
        const scalar_t* xr = xg + c * S;
        scalar_t* yr = yg + c * S;
        if (centred) {
          normalise<true, 0, Act>(xr, yr, S, &mean[ng], &scale, &shift);
        } else {
          normalise<false, 0, Act>(xr, yr, S, &mean[ng], &scale, &shift);
        }
      }
    }
  });
}

// Channels-last tasks walk their rows either a block of kLanes channels at a time, rows inner
// (kBlocked: a block's sums stay in registers across the rows), or row by row, each row's C
// channels in turn, the sums in memory. Row by row, the U-Net's 32 channels (two vectors) made a
// store-to-load chain per row and paid a short loop's entry and exit per row: 4 x 32 x 32 x 32
// took 50 us forward and 84 backward, against 35 and 57 by blocks (2-core Xeon). With more
// channels the strided walks over a block's rows lose to the row by row one, whose reads the
// prefetchers follow: 4 x 96 x 32 x 32 took 290-350 us backward by blocks against 230, and the SD
// U-Net's 8 x 320 x 64 x 64 1.6 times as long forward and 1.9 times backward. 64 to 128 channels
// measured within noise of either.
constexpr int64_t kLanes = 16;
constexpr int64_t kBlockedChannels = 64;

template <typename T>
struct LanesOf {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

// p[0, width) as the math type, 0 past width (kWidth: width known at compile time, or 0).
template <int64_t kWidth, typename acc_t, typename scalar_t>
GENFAST_VECTOR_INLINE Lanes<acc_t> load_lanes(const scalar_t* p, int64_t width) {
  Lanes<acc_t> v{};
  for (int64_t l = 0; l < (kWidth ? kWidth : width); ++l) v[l] = static_cast<acc_t>(p[l]);
  return v;
}

// Calls body.template operator()<kWidth>(c0, width) for each block of channels [c0, c0 + width)
// of [0, C): kWidth is kLanes for full blocks (a trip count the compiler sees), 0 for the last,
// short one.
template <typename Body>
void for_channel_blocks(int64_t C, Body&& body) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) body.template operator()<kLanes>(c0, kLanes);
  if (c0 < C) body.template operator()<0>(c0, C - c0);
}

// The channels-last passes: sums(n, row0, rows) over every block of rows [row0, row0 + rows) of
// sample n, then finish(n) for every sample, then apply(n, row0, rows) over every block. Where the
// samples split evenly among the threads, each thread takes its samples through all three in one
// parallel region, if a sample is small enough that its second pass finds it in L2; otherwise each
// pass shares the row blocks among the threads, and the samples are finished between them. (At the
// small U-Net's 4 x 256 x 8 x 8 the two regions and the serial step between them took 34 us
// forward against 28 in one region; at the SD U-Net's 8 x 320 x 64 x 64, 5 MB a sample, whole
// samples took 10.4 ms backward against 9.3.)
constexpr int64_t kSampleValues = 256 << 10;

template <typename Sums, typename Finish, typename Apply>
void for_row_blocks(const GroupShape& shape, Sums&& sums, Finish&& finish, Apply&& apply) {
  const int64_t blocks = shape.row_blocks();
  const auto each_block = [&](int64_t begin, int64_t end, auto&& body) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int64_t row0 = (nb % blocks) * kRows;
      body(nb / blocks, row0, std::min(kRows, shape.S - row0));
    }
  };
  if (shape.N % at::get_num_threads() == 0 && shape.C * shape.S <= kSampleValues) {
    at::parallel_for(0, shape.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        each_block(n * blocks, (n + 1) * blocks, sums);
        finish(n);
        each_block(n * blocks, (n + 1) * blocks, apply);
      }
    });
    return;
  }
  at::parallel_for(0, shape.N * blocks, 1, [&](int64_t begin, int64_t end) { each_block(begin, end, sums); });
  for (int64_t n = 0; n < shape.N; ++n) finish(n);
  at::parallel_for(0, shape.N * blocks, 1, [&](int64_t begin, int64_t end) { each_block(begin, end, apply); });
}

// total[c] = the sum over row blocks b of part[b * C + c], in double.
template <typename acc_t>
void sum_row_blocks(const acc_t* part, int64_t blocks, int64_t C, double* total) {
  std::fill(total, total + C, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) total[c] += part[b * C + c];
  }
}

template <bool kBlocked, typename Act, typename scalar_t, typename acc_t>
void forward_channels_last(const scalar_t* x, const acc_t* weight, const acc_t* bias, scalar_t* y, acc_t* mean,
                           acc_t* rstd, GroupShape shape, double eps) {
  const int64_t N = shape.N, C = shape.C, S = shape.S, G = shape.G, cpg = shape.cpg();
  const int64_t blocks = shape.row_blocks();
  // Per (n, row block, channel) sums of x - pivot, pivot = x[n, 0, first channel of the group].
  std::vector<acc_t> pivot(N * C), part_sum(N * blocks * C), part_sumsq(N * blocks * C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c0 = 0; c0 < C; c0 += cpg) std::fill_n(&pivot[n * C + c0], cpg, static_cast<acc_t>(x[n * S * C + c0]));
  }
  const auto sums = [&](int64_t n, int64_t row0, int64_t rows) {
    acc_t* sum = &part_sum[(n * blocks + row0 / kRows) * C];
    acc_t* sumsq = &part_sumsq[(n * blocks + row0 / kRows) * C];
    const scalar_t* xb = x + (n * S + row0) * C;
    if constexpr (kBlocked) {
      for_channel_blocks(C, [&]<int64_t kWidth>(int64_t c0, int64_t width) {
        // Explicit vectors: GCC kept arrays of kLanes sums on the stack, a store-to-load chain per
        // row. Two sets, for even and odd rows, halve the chain of dependent additions.
        const Lanes<acc_t> p = load_lanes<kWidth, acc_t>(&pivot[n * C + c0], width);
        Lanes<acc_t> s0{}, s1{}, q0{}, q1{};
        int64_t r = 0;
        for (; r + 1 < rows; r += 2) {
          const Lanes<acc_t> d0 = load_lanes<kWidth, acc_t>(xb + r * C + c0, width) - p;
          const Lanes<acc_t> d1 = load_lanes<kWidth, acc_t>(xb + (r + 1) * C + c0, width) - p;
          s0 += d0;
          s1 += d1;
          q0 += d0 * d0;
          q1 += d1 * d1;
        }
        if (r < rows) {
          const Lanes<acc_t> d0 = load_lanes<kWidth, acc_t>(xb + r * C + c0, width) - p;
          s0 += d0;
          q0 += d0 * d0;
        }
        for (int64_t l = 0; l < (kWidth ? kWidth : width); ++l) {
          sum[c0 + l] = s0[l] + s1[l];
          sumsq[c0 + l] = q0[l] + q1[l];
        }
      });
    } else {
      const acc_t* p = &pivot[n * C];
      std::fill_n(sum, C, acc_t(0));
      std::fill_n(sumsq, C, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(xb[r * C + c]) - p[c];
          sum[c] += d;
          sumsq[c] += d * d;
        }
      }
    }
  };
  // Sample n's statistics, and the scale and shift of each of its channels; a sample is centred if
  // any of its groups needs it, as a pixel's channels span every group.
  std::vector<acc_t> centre(N * C), scale(N * C), shift(N * C);
  std::vector<char> centred(N, 0);
  const auto finish = [&](int64_t n) {
    std::vector<double> sum(C), sumsq(C);
    sum_row_blocks(&part_sum[n * blocks * C], blocks, C, sum.data());
    sum_row_blocks(&part_sumsq[n * blocks * C], blocks, C, sumsq.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * cpg, ng = n * G + g;
      finish_moments(std::accumulate(&sum[c0], &sum[c0] + cpg, 0.0), std::accumulate(&sumsq[c0], &sumsq[c0] + cpg, 0.0),
                     double(shape.group_size()), double(pivot[n * C + c0]), eps, mean[ng], rstd[ng]);
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        centre[n * C + c] = mean[ng];
        scale[n * C + c] = rstd[ng] * weight[c];
        centred[n] |= needs_centring(mean[ng], rstd[ng], scale[n * C + c]);
      }
    }
    for (int64_t c = 0; c < C; ++c)
      shift[n * C + c] = centred[n] ? bias[c] : bias[c] - centre[n * C + c] * scale[n * C + c];
  };
  const auto apply = [&](int64_t n, int64_t row0, int64_t rows) {
    const acc_t *mu = &centre[n * C], *sc = &scale[n * C], *sh = &shift[n * C];
    const auto write = [&]<bool kCentred>() {
      const scalar_t* xb = x + (n * S + row0) * C;
      scalar_t* yb = y + (n * S + row0) * C;
      if constexpr (kBlocked) {
        for_channel_blocks(C, [&]<int64_t kWidth>(int64_t c0, int64_t width) {
          for (int64_t r = 0; r < rows; ++r) {
            normalise<kCentred, 1, Act>(xb + r * C + c0, yb + r * C + c0, kWidth ? kWidth : width, mu + c0, sc + c0,
                                        sh + c0);
          }
        });
      } else {
        for (int64_t r = 0; r < rows; ++r) normalise<kCentred, 1, Act>(xb + r * C, yb + r * C, C, mu, sc, sh);
      }
    };
    if (centred[n]) {
      write.template operator()<true>();
    } else {
      write.template operator()<false>();
    }
  };
  for_row_blocks(shape, sums, finish, apply);
}

// Backward, channels-first. Per (n, group): pass 1 takes dy through the
// activation (recomputing z from x), keeps dz in a float scratch row that stays
// in L2, and sums dz and dz * xhat per channel; pass 2 writes
// dx = rstd * (w * dz - mean_g(w * dz) - xhat * mean_g(w * dz * xhat)).
template <typename Act, typename scalar_t, typename acc_t>
void backward_channels_first(const scalar_t* dy, const scalar_t* x, const acc_t* weight, const acc_t* bias,
                             const acc_t* mean, const acc_t* rstd, scalar_t* dx, acc_t* sum_dz, acc_t* sum_dz_xhat,
                             GroupShape shape) {
  const int64_t cpg = shape.cpg(), len = shape.group_size(), S = shape.S;
  at::parallel_for(0, shape.N * shape.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dz(len);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t c0 = (ng % shape.G) * cpg, offset = ng * len;
      const acc_t mu = mean[ng], r = rstd[ng];
      double sum_wdz = 0, sum_wdz_xhat = 0;
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t w = weight[c0 + c], b = bias[c0 + c];
        const scalar_t* xr = x + offset + c * S;
        const scalar_t* dyr = dy + offset + c * S;
        acc_t* dzr = dz.data() + c * S;
        double s_dz = 0, s_dz_xc = 0;
        for (int64_t start = 0; start < S; start += kChunk) {
          const int64_t stop = std::min(S, start + kChunk);
          acc_t s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
          for (int64_t i = start; i < stop; ++i) {
            const acc_t xc = static_cast<acc_t>(xr[i]) - mu;
            const acc_t d = Act::backward(xc * r * w + b, static_cast<acc_t>(dyr[i]));
            dzr[i] = d;
            s += d;
            q += d * xc;
          }
          s_dz += s;
          s_dz_xc += q;
        }
        const int64_t nc = (ng / shape.G) * shape.C + c0 + c;
        sum_dz[nc] = static_cast<acc_t>(s_dz);
        sum_dz_xhat[nc] = static_cast<acc_t>(s_dz_xc * r);
        sum_wdz += w * s_dz;
        sum_wdz_xhat += w * s_dz_xc * r;
      }
      const acc_t a = static_cast<acc_t>(r * sum_wdz / len);
      const acc_t b = static_cast<acc_t>(r * r * sum_wdz_xhat / len);
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t rw = r * weight[c0 + c];
        const scalar_t* xr = x + offset + c * S;
        const acc_t* dzr = dz.data() + c * S;
        scalar_t* dxr = dx + offset + c * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          dxr[i] = static_cast<scalar_t>(rw * dzr[i] - a - (static_cast<acc_t>(xr[i]) - mu) * b);
        }
      }
    }
  });
}

// Backward, channels-last: pass 1 sums dz and dz * (x - mean) per channel over row blocks; pass 2
// reads dz back from a scratch copy where it fits in L2 (the U-Net's levels, 128 to 512 KB:
// recomputing SiLU's derivative took a third of the pass), else recomputes it.
constexpr int64_t kScratchBytes = 1 << 20;

template <bool kBlocked, typename Act, typename scalar_t, typename acc_t>
void backward_channels_last(const scalar_t* dy, const scalar_t* x, const acc_t* weight, const acc_t* bias,
                            const acc_t* mean, const acc_t* rstd, scalar_t* dx, acc_t* sum_dz, acc_t* sum_dz_xhat,
                            GroupShape shape) {
  const int64_t N = shape.N, C = shape.C, S = shape.S, G = shape.G, cpg = shape.cpg();
  const int64_t blocks = shape.row_blocks(), len = shape.group_size();
  // Per (n, c): z = x * scale + shift, and the mean of the channel's group.
  std::vector<acc_t> scale(N * C), shift(N * C), mu(N * C);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    for (int64_t c = ng % G * cpg, nc = ng * cpg; c < (ng % G + 1) * cpg; ++c, ++nc) {
      mu[nc] = mean[ng];
      scale[nc] = rstd[ng] * weight[c];
      shift[nc] = bias[c] - mean[ng] * scale[nc];
    }
  }
  const bool keep_dz = N * S * C * int64_t(sizeof(acc_t)) <= kScratchBytes;
  const auto scratch = std::make_unique_for_overwrite<acc_t[]>(keep_dz ? N * S * C : 0);
  // dz at x[at]: dy[at] through the activation's derivative at z = x[at] * scale + shift, with the
  // scale and shift of channel c of sample n.
  const auto dz_at = [&](int64_t n, int64_t at, int64_t c) __attribute__((always_inline)) {
    return Act::backward(static_cast<acc_t>(x[at]) * scale[n * C + c] + shift[n * C + c], static_cast<acc_t>(dy[at]));
  };
  std::vector<acc_t> part_dz(N * blocks * C), part_dz_xc(N * blocks * C);
  const auto sums = [&](int64_t n, int64_t row0, int64_t rows) {
    acc_t* s_dz = &part_dz[(n * blocks + row0 / kRows) * C];
    acc_t* s_dz_xc = &part_dz_xc[(n * blocks + row0 / kRows) * C];
    const int64_t first = (n * S + row0) * C;
    if constexpr (kBlocked) {
      for_channel_blocks(C, [&]<int64_t kWidth>(int64_t c0, int64_t width) {
        const Lanes<acc_t> m = load_lanes<kWidth, acc_t>(&mu[n * C + c0], width);
        Lanes<acc_t> s{}, q{};  // in registers, as the forward's sums
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t at = first + r * C + c0;
          acc_t dz[kLanes] = {};
#pragma omp simd
          for (int64_t l = 0; l < (kWidth ? kWidth : width); ++l) dz[l] = dz_at(n, at + l, c0 + l);
          if (keep_dz) std::copy_n(dz, kWidth ? kWidth : width, &scratch[at]);
          const Lanes<acc_t> d = load_lanes<kLanes, acc_t>(dz, kLanes);
          s += d;
          q += d * (load_lanes<kWidth, acc_t>(x + at, width) - m);
        }
        for (int64_t l = 0; l < (kWidth ? kWidth : width); ++l) {
          s_dz[c0 + l] = s[l];
          s_dz_xc[c0 + l] = q[l];
        }
      });
    } else {
      const acc_t* m = &mu[n * C];
      std::fill_n(s_dz, C, acc_t(0));
      std::fill_n(s_dz_xc, C, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = first + r * C;
        acc_t* kept = keep_dz ? &scratch[at] : nullptr;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t dz = dz_at(n, at + c, c);
          if (kept) kept[c] = dz;
          s_dz[c] += dz;
          s_dz_xc[c] += dz * (static_cast<acc_t>(x[at + c]) - m[c]);
        }
      }
    }
  };
  // dx = coef_dz[c] * dz + coef_x * x + coef_1, coefficients per (n, c).
  std::vector<acc_t> coef_dz(N * C), coef_x(N * C), coef_1(N * C);
  const auto finish = [&](int64_t n) {
    std::vector<double> s_dz(C), s_dz_xc(C);
    sum_row_blocks(&part_dz[n * blocks * C], blocks, C, s_dz.data());
    sum_row_blocks(&part_dz_xc[n * blocks * C], blocks, C, s_dz_xc.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t ng = n * G + g, c0 = g * cpg;
      const double r = rstd[ng];
      double mean_wdz = 0, mean_wdz_xhat = 0;
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        sum_dz[n * C + c] = static_cast<acc_t>(s_dz[c]);
        sum_dz_xhat[n * C + c] = static_cast<acc_t>(s_dz_xc[c] * r);
        mean_wdz += weight[c] * s_dz[c] / len;
        mean_wdz_xhat += weight[c] * s_dz_xc[c] * r / len;
      }
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        coef_dz[n * C + c] = static_cast<acc_t>(r * weight[c]);
        coef_x[n * C + c] = static_cast<acc_t>(-r * r * mean_wdz_xhat);
        coef_1[n * C + c] = static_cast<acc_t>(-r * mean_wdz + r * r * mean_wdz_xhat * mean[ng]);
      }
    }
  };
  const auto apply = [&](int64_t n, int64_t row0, int64_t rows) {
    const int64_t first = (n * S + row0) * C;
    // dx over `width` channels from c0 of the row at x + at.
    const auto write = [&]<int64_t kWidth, bool kKept>(int64_t at, int64_t c0, int64_t width) {
      const acc_t *kd = &coef_dz[n * C + c0], *kx = &coef_x[n * C + c0], *k1 = &coef_1[n * C + c0];
#pragma omp simd
      for (int64_t l = 0; l < (kWidth ? kWidth : width); ++l) {
        const acc_t dz = kKept ? scratch[at + l] : dz_at(n, at + l, c0 + l);
        dx[at + l] = static_cast<scalar_t>(kd[l] * dz + kx[l] * static_cast<acc_t>(x[at + l]) + k1[l]);
      }
    };
    const auto write_rows = [&]<bool kKept>() {
      if constexpr (kBlocked) {
        for_channel_blocks(C, [&]<int64_t kWidth>(int64_t c0, int64_t width) {
          for (int64_t r = 0; r < rows; ++r) write.template operator()<kWidth, kKept>(first + r * C + c0, c0, width);
        });
      } else {
        for (int64_t r = 0; r < rows; ++r) write.template operator()<0, kKept>(first + r * C, 0, C);
      }
    };
    if (keep_dz) {
      write_rows.template operator()<true>();
    } else {
      write_rows.template operator()<false>();
    }
  };
  for_row_blocks(shape, sums, finish, apply);
}

GroupShape shape_of(const Tensor& x, int64_t groups) {
  return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), groups};
}

}  // namespace

std::vector<Tensor> group_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t groups,
                                       double eps, bool silu) {
  const GroupShape shape = shape_of(x, groups);
  Tensor y = empty_output_like(x);
  Tensor mean = at::empty({shape.N, groups}, weight.options());
  Tensor rstd = at::empty({shape.N, groups}, weight.options());
  const bool channels_last = is_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(silu ? ActivationKind::kSiLU : ActivationKind::kIdentity, [&]<typename Act>() {
      auto run = !channels_last                ? forward_channels_first<Act, scalar_t, acc_t>
                 : shape.C <= kBlockedChannels ? forward_channels_last<true, Act, scalar_t, acc_t>
                                               : forward_channels_last<false, Act, scalar_t, acc_t>;
      run(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(),
          y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), shape, eps);
    });
  });
  return {y, mean, rstd};
}

std::vector<Tensor> group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                        const Tensor& mean, const Tensor& rstd, int64_t groups, bool silu) {
  const GroupShape shape = shape_of(x, groups);
  Tensor dx = empty_output_like(x);
  Tensor sum_dz = at::empty({shape.N, shape.C}, weight.options());
  Tensor sum_dz_xhat = at::empty({shape.N, shape.C}, weight.options());
  const bool channels_last = is_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(silu ? ActivationKind::kSiLU : ActivationKind::kIdentity, [&]<typename Act>() {
      auto run = !channels_last                ? backward_channels_first<Act, scalar_t, acc_t>
                 : shape.C <= kBlockedChannels ? backward_channels_last<true, Act, scalar_t, acc_t>
                                               : backward_channels_last<false, Act, scalar_t, acc_t>;
      run(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(),
          bias.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), sum_dz.mutable_data_ptr<acc_t>(), sum_dz_xhat.mutable_data_ptr<acc_t>(),
          shape);
    });
  });
  // Weight and bias gradients: the per-sample sums added over the batch, here rather than by two
  // ATen sums, which cost about as much as the passes at U-Net's 2 x 1280 x 8 x 8.
  Tensor d_weight = at::empty({shape.C}, weight.options()), d_bias = at::empty({shape.C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "group_norm_backward", [&] {
    const scalar_t *per_xhat = sum_dz_xhat.const_data_ptr<scalar_t>(), *per_dz = sum_dz.const_data_ptr<scalar_t>();
    scalar_t *dw = d_weight.mutable_data_ptr<scalar_t>(), *db = d_bias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < shape.C; ++c) {
      double w = 0, b = 0;
      for (int64_t n = 0; n < shape.N; ++n) w += per_xhat[n * shape.C + c], b += per_dz[n * shape.C + c];
      dw[c] = static_cast<scalar_t>(w), db[c] = static_cast<scalar_t>(b);
    }
  });
  return {dx, d_weight, d_bias};
}

}  // namespace genfast::cpu
