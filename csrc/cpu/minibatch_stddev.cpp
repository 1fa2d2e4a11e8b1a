// StyleGAN's minibatch standard deviation layer on the CPU. Sample n = g M + m is member g of
// group m (M = N / G groups of G). For each (m, f) the task walks the run of C / F channels x H x W
// elements that channel set f holds in each of the group's G samples: the mean and variance
// over g position by position, their standard deviations averaged into the statistic. The
// forward also copies x into the output; the backward computes the same means and deviations
// again to spread each statistic's gradient.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "memory.h"
#include "minibatch_stddev.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

constexpr double kEps = 1e-8;
constexpr int64_t kChunk = 256;  // positions whose means and deviations sit in registers and L1 at once

struct Shape {
  int64_t n, c, hw, group, sets, members;  // members: M; sets: F
  int64_t run() const { return c / sets * hw; }  // one sample's elements of one channel set
};

// Calls body(first, count, mean, stddev) for chunks of the run of (m, f): mean and stddev
// over the group of its positions [first, first + count).
template <typename scalar_t, typename Body>
void for_each_chunk(const Shape& s, const scalar_t* x, int64_t m, int64_t f, Body&& body) {
  using acc_t = math_t<scalar_t>;
  const int64_t run = s.run(), sample_stride = s.c * s.hw;
  const scalar_t* base = x + m * sample_stride + f * run;
  const acc_t inv_group = acc_t(1) / acc_t(s.group);
  acc_t mean[kChunk], stddev[kChunk];
  for (int64_t first = 0; first < run; first += kChunk) {
    const int64_t count = std::min(kChunk, run - first);
    std::fill_n(mean, count, acc_t(0));
    std::fill_n(stddev, count, acc_t(0));
    for (int64_t g = 0; g < s.group; ++g) {
      const scalar_t* row = base + g * s.members * sample_stride + first;
#pragma omp simd
      for (int64_t p = 0; p < count; ++p) mean[p] += static_cast<acc_t>(row[p]);
    }
#pragma omp simd
    for (int64_t p = 0; p < count; ++p) mean[p] *= inv_group;
    for (int64_t g = 0; g < s.group; ++g) {
      const scalar_t* row = base + g * s.members * sample_stride + first;
#pragma omp simd
      for (int64_t p = 0; p < count; ++p) {
        const acc_t d = static_cast<acc_t>(row[p]) - mean[p];
        stddev[p] += d * d;
      }
    }
#pragma omp simd
    for (int64_t p = 0; p < count; ++p) stddev[p] = std::sqrt(stddev[p] * inv_group + acc_t(kEps));
    body(first, count, mean, stddev);
  }
}

Shape shape_of(const Tensor& x, int64_t group, int64_t channels) {
  const int64_t n = x.size(0);
  return {n, x.size(1), x.size(2) * x.size(3), group, channels, n / group};
}

}  // namespace

Tensor minibatch_stddev_forward(const Tensor& x, int64_t group, int64_t channels) {
  const Shape s = shape_of(x, group, channels);
  Tensor out = empty_output({s.n, s.c + s.sets, x.size(2), x.size(3)}, x.options());
  dispatch_float_types<true>(x.scalar_type(), "minibatch_stddev", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    scalar_t* outs = out.mutable_data_ptr<scalar_t>();
    const int64_t in_stride = s.c * s.hw, out_stride = (s.c + s.sets) * s.hw;
    at::parallel_for(0, s.members * s.sets, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / s.sets, f = task % s.sets;
        acc_t total = 0;
        for_each_chunk(s, xs, m, f, [&](int64_t, int64_t count, const acc_t*, const acc_t* stddev) {
          total += lane_sum<acc_t>(count, [&](int64_t p) { return stddev[p]; });
        });
        const scalar_t statistic = static_cast<scalar_t>(total / acc_t(s.run()));
        for (int64_t g = 0; g < s.group; ++g) {
          const int64_t sample = g * s.members + m;
          const int64_t run = s.run();
          std::memcpy(outs + sample * out_stride + f * run, xs + sample * in_stride + f * run, run * sizeof(scalar_t));
          std::fill_n(outs + sample * out_stride + in_stride + f * s.hw, s.hw, statistic);
        }
      }
    });
  });
  return out;
}

Tensor minibatch_stddev_backward(const Tensor& dout, const Tensor& x, int64_t group, int64_t channels) {
  const Shape s = shape_of(x, group, channels);
  Tensor dx = empty_output(x.sizes(), x.options());
  dispatch_float_types<true>(x.scalar_type(), "minibatch_stddev_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* douts = dout.const_data_ptr<scalar_t>();
    scalar_t* dxs = dx.mutable_data_ptr<scalar_t>();
    const int64_t in_stride = s.c * s.hw, out_stride = (s.c + s.sets) * s.hw, run = s.run();
    at::parallel_for(0, s.members * s.sets, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / s.sets, f = task % s.sets;
        // The statistic's gradient: its copies' over the group's samples and pixels.
        acc_t dstat = 0;
        for (int64_t g = 0; g < s.group; ++g) {
          const scalar_t* d = douts + (g * s.members + m) * out_stride + in_stride + f * s.hw;
          dstat += lane_sum<acc_t>(s.hw, [&](int64_t p) { return static_cast<acc_t>(d[p]); });
        }
        // d stat / d x[g, p] = (x[g, p] - mean[p]) / (run G stddev[p]).
        const acc_t scale = dstat / acc_t(run * s.group);
        for_each_chunk(s, xs, m, f, [&](int64_t first, int64_t count, const acc_t* mean, const acc_t* stddev) {
          for (int64_t g = 0; g < s.group; ++g) {
            const int64_t sample = g * s.members + m;
            const scalar_t* xr = xs + sample * in_stride + f * run + first;
            const scalar_t* dr = douts + sample * out_stride + f * run + first;
            scalar_t* dxr = dxs + sample * in_stride + f * run + first;
#pragma omp simd
            for (int64_t p = 0; p < count; ++p)
              dxr[p] = static_cast<scalar_t>(static_cast<acc_t>(dr[p]) +
                                             scale * (static_cast<acc_t>(xr[p]) - mean[p]) / stddev[p]);
          }
        });
      }
    });
  });
  return dx;
}

}  // namespace genfast::cpu
