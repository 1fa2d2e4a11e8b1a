// LayerNorm and RMSNorm over the last dimension, with an optional residual add, on the CPU.
//
// x is (rows, D), dense. A task owns a block of rows; each row is read once from memory, then
// walked again in L1 (a 4096-wide fp32 row is 16 KB): the statistics in two passes (mean, then
// the centred sum of squares, which cannot cancel the way a one-pass E[x^2] - E[x]^2 does), then
// the output. RMSNorm is the same code with the centring and the bias compiled out.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"
#include "memory.h"
#include "norm.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

constexpr int64_t kTaskElements = 1 << 15;  // elements per task at least: rows are short
constexpr int64_t kMaxTasks = 64;           // bounds the backward's per-task weight-gradient partials

struct Tasks {
  int64_t rows_each, count;
};

// Blocks of whole rows, about kTaskElements each and at most kMaxTasks of them. The split
// depends on the shape only, never on the thread count.
Tasks split_rows(int64_t rows, int64_t D) {
  const int64_t rows_each = std::max({int64_t(1), kTaskElements / D, (rows + kMaxTasks - 1) / kMaxTasks});
  return {rows_each, (rows + rows_each - 1) / rows_each};
}

// Calls body(task, first row, end row) for every task, in parallel.
template <typename Body>
void for_each_task(int64_t rows, int64_t D, Body&& body) {
  const Tasks tasks = split_rows(rows, D);
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      body(task, task * tasks.rows_each, std::min(rows, (task + 1) * tasks.rows_each));
  });
}

// The normalised row in acc_t: x itself where it already is acc_t and there is no residual, else
// converted into `buffer`. With a residual, h = x + residual is rounded to scalar_t and written
// out first (write_output's way), so the row normalised is exactly the h returned.
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* x, const scalar_t* residual, scalar_t* h, acc_t* buffer, int64_t D,
                      bool streaming = false) {
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      buffer[i] = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x[i]) + static_cast<acc_t>(residual[i])));
    }
    write_output(h, buffer, D, streaming);
    return buffer;
  }
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) buffer[i] = static_cast<acc_t>(x[i]);
    return buffer;
  }
}

template <bool kRms, typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* residual, const math_t<scalar_t>* weight,
                  const math_t<scalar_t>* bias, scalar_t* y, scalar_t* h, math_t<scalar_t>* mean,
                  math_t<scalar_t>* rstd, int64_t rows, int64_t D, double eps, bool stream_y, bool stream_h) {
  using acc_t = math_t<scalar_t>;
  for_each_task(rows, D, [&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(D), normalised(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t at = r * D;
      const acc_t* v =
          load_row(x + at, residual ? residual + at : nullptr, h ? h + at : nullptr, buffer.data(), D, stream_h);
      // Centred on the row's first value: v - pivot is exact for values near it, so the mean of
      // a row far from 0 keeps its digits (the mean itself rounded would cost up to half an ulp of
      // |mean| in every output).
      const acc_t pivot = kRms ? acc_t(0) : v[0];
      const acc_t shift = kRms ? acc_t(0) : lane_sum<acc_t>(D, [&](int64_t i) { return v[i] - pivot; }) / D;
      const acc_t var =
          lane_sum<acc_t>(D, [&](int64_t i) { return (v[i] - pivot - shift) * (v[i] - pivot - shift); }) / D;
      const acc_t inv = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(var) + eps));
      mean[r] = pivot + shift;
      rstd[r] = inv;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) {
        const acc_t z = (v[i] - pivot - shift) * inv * weight[i];
        normalised[i] = kRms ? z : z + bias[i];
      }
      write_output(y + at, normalised.data(), D, stream_y);
    }
    store_fence();
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dh] with g = dy * weight and, for
// RMSNorm, no mean(g) term. Each task also sums dy * xhat and dy over its rows into its own
// partials, in acc_t over blocks of kBlockRows rows and in double across blocks, so the weight
// and bias gradients add up the same way whatever the thread count.
template <bool kRms, typename scalar_t>
void backward_rows(const scalar_t* dy, const scalar_t* dh, const scalar_t* h, const math_t<scalar_t>* weight,
                   const math_t<scalar_t>* mean, const math_t<scalar_t>* rstd, scalar_t* dx, double* partials,
                   int64_t rows, int64_t D, bool stream_dx) {
  using acc_t = math_t<scalar_t>;
  constexpr int64_t kBlockRows = 16;
  for_each_task(rows, D, [&](int64_t task, int64_t begin, int64_t end) {
    std::vector<acc_t> h_buffer(D), dy_buffer(D), dweight(D), dbias(D), grad(D);
    double* task_dweight = partials + task * 2 * D;
    double* task_dbias = task_dweight + D;
    for (int64_t block = begin; block < end; block += kBlockRows) {
      std::fill(dweight.begin(), dweight.end(), acc_t(0));
      std::fill(dbias.begin(), dbias.end(), acc_t(0));
      for (int64_t r = block; r < std::min(end, block + kBlockRows); ++r) {
        const int64_t at = r * D;
        const acc_t* v = load_row<scalar_t, acc_t>(h + at, nullptr, nullptr, h_buffer.data(), D);
        const acc_t* g = load_row<scalar_t, acc_t>(dy + at, nullptr, nullptr, dy_buffer.data(), D);
        const acc_t mu = mean[r], inv = rstd[r];
        const acc_t mean_g = kRms ? acc_t(0) : lane_sum<acc_t>(D, [&](int64_t i) { return g[i] * weight[i]; }) / D;
        const acc_t mean_g_xhat =
            lane_sum<acc_t>(D, [&](int64_t i) { return g[i] * weight[i] * (v[i] - mu) * inv; }) / D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) {
          const acc_t xhat = (v[i] - mu) * inv;
          dweight[i] += g[i] * xhat;
          dbias[i] += g[i];
          const acc_t dxhat = inv * (g[i] * weight[i] - mean_g - xhat * mean_g_xhat);
          grad[i] = dh ? dxhat + static_cast<acc_t>(dh[at + i]) : dxhat;
        }
        write_output(dx + at, grad.data(), D, stream_dx);
      }
      for (int64_t i = 0; i < D; ++i) {
        task_dweight[i] += dweight[i];
        task_dbias[i] += dbias[i];
      }
    }
    store_fence();
  });
}

}  // namespace

std::vector<Tensor> layer_norm_forward(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight,
                                       const Tensor& bias, double eps, bool rms) {
  const int64_t D = x.size(-1), rows = x.numel() / D;
  bool stream_y, stream_h = false;  // write_output's choice for each
  Tensor y = empty_output_like(x, &stream_y);
  Tensor h = residual ? empty_output_like(x, &stream_h) : at::empty({0}, x.options());
  Tensor mean = at::empty({rows}, weight.options());
  Tensor rstd = at::empty({rows}, weight.options());
  dispatch_float_types<true>(x.scalar_type(), "layer_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    auto run = [&](auto rms_tag) {
      forward_rows<decltype(rms_tag)::value>(
          x.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
          weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(),
          residual ? h.mutable_data_ptr<scalar_t>() : nullptr, mean.mutable_data_ptr<acc_t>(),
          rstd.mutable_data_ptr<acc_t>(), rows, D, eps, stream_y, stream_h);
    };
    rms ? run(std::true_type{}) : run(std::false_type{});
  });
  return {y, h, mean, rstd};
}

std::vector<Tensor> layer_norm_backward(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                                        const Tensor& weight, const Tensor& mean, const Tensor& rstd, bool rms) {
  const int64_t D = h.size(-1), rows = h.numel() / D, tasks = split_rows(rows, D).count;
  bool stream_dx;
  Tensor dx = empty_output_like(h, &stream_dx);
  // Two tensors, not views of one: a custom op's outputs may not alias each other.
  Tensor dweight = at::empty({D}, weight.options()), dbias = at::empty({D}, weight.options());
  std::vector<double> partials(tasks * 2 * D, 0.0);
  dispatch_float_types<true>(h.scalar_type(), "layer_norm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    auto run = [&](auto rms_tag) {
      backward_rows<decltype(rms_tag)::value>(
          dy.const_data_ptr<scalar_t>(), dh ? dh->const_data_ptr<scalar_t>() : nullptr, h.const_data_ptr<scalar_t>(),
          weight.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), partials.data(), rows, D, stream_dx);
    };
    rms ? run(std::true_type{}) : run(std::false_type{});
    // The tasks' partials summed here rather than by ATen ops after the kernel: each of those
    // cost about 20 us on a 2-core VM right after the rows had swept the caches.
    acc_t *dweight_out = dweight.mutable_data_ptr<acc_t>(), *dbias_out = dbias.mutable_data_ptr<acc_t>();
    std::vector<double> dweight_sum(D, 0.0), dbias_sum(D, 0.0);
    for (int64_t task = 0; task < tasks; ++task) {
      const double* task_partials = partials.data() + task * 2 * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) {
        dweight_sum[i] += task_partials[i];
        dbias_sum[i] += task_partials[D + i];
      }
    }
    for (int64_t i = 0; i < D; ++i) {
      dweight_out[i] = static_cast<acc_t>(dweight_sum[i]);
      dbias_out[i] = static_cast<acc_t>(dbias_sum[i]);
    }
  });
  return {dx, dweight, dbias};
}

}  // namespace genfast::cpu
