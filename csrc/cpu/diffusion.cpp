// The diffusion ops on CPU. The fused sampler step is one pass over memory: each
// task converts a tile of every input to float in L1-sized buffers (or makes the
// tile's fused noise there), runs the formula as a few branch-free loops over
// the tile (each vectorises; the optional terms decide which loops run, once per
// tile), and writes the outputs. Reads sample, model_output (both guided halves,
// the variance channels), noise and history when given; writes prev and
// optionally denoised. The timestep embedding and the training ops follow.
#include "diffusion.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "dispatch.h"
#include "memory.h"
#include "philox.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

constexpr int64_t kTile = 512;  // elements per task: its 7 float buffers of 2 KB stay in L1
static_assert(kTile <= kPhiloxMaxCount, "a tile's fused noise is one philox_normal call");

// The tile at `in` as floats: float input is read in place, other types are converted into buf.
template <typename T>
const float* as_float(const T* in, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return in;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(in[i]);
    return buf;
  }
}

// The model output's tile at row, or with guidance uncond + guidance * (cond - uncond), the
// conditional half lying cond_offset further. buf and scratch are L1 buffers.
template <typename T>
const float* model_output_tile(const T* row, int64_t cond_offset, const StepCoefficients& c, float* buf,
                               float* scratch, int64_t len) {
  const float* uncond = as_float(row, buf, len);
  if (!c.guided) return uncond;
  const float* cond = as_float(row + cond_offset, scratch, len);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) buf[i] = uncond[i] + c.guidance * (cond[i] - uncond[i]);
  return buf;
}

template <typename T>
void step(const T* x, const T* m, const T* noise, const T* history, const float* threshold, T* prev, T* denoised,
          int64_t batch, int64_t n, int64_t m_stride, const StepCoefficients& c) {
  const int64_t tiles = (n + kTile - 1) / kTile, cond_offset = batch * m_stride;
  const bool need_x0 = denoised || c.prev_x0 != 0.f;  // a flow-matching Euler step has no x0 term
  at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float x_buf[kTile], m_buf[kTile], n_buf[kTile], x0[kTile], p[kTile], buf[kTile], scratch[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, i0 = task % tiles * kTile, len = std::min(kTile, n - i0);
      const int64_t at = b * n + i0;
      const T* m_row = m + b * m_stride + i0;
      const float* xs = as_float(x + at, x_buf, len);
      const float* ns = noise ? as_float(noise + at, n_buf, len) : nullptr;
      if (c.fused_noise) {
        // The tile's inputs are asked for before its noise is made, so that memory serves them
        // while Philox computes: 1.1-1.4 ms a DDPM step instead of 1.3-1.6 on a 2-core Xeon.
        prefetch(x + at, len);
        prefetch(m_row, len);
        if (c.guided) prefetch(m_row + cond_offset, len);
        philox_normal(c.noise_seed, at, len, n_buf);
        ns = n_buf;
      }
      if (ns && c.sample_noise != 0.f) {  // Euler's churn: x = sample + sample_noise * noise
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) x_buf[i] = xs[i] + c.sample_noise * ns[i];
        xs = x_buf;
      }
      const float* ms = model_output_tile(m_row, cond_offset, c, m_buf, scratch, len);
      if (need_x0) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) x0[i] = c.x0_sample * xs[i] + c.x0_model * ms[i];
        if (c.clipped) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) x0[i] = x0[i] < -c.clip ? -c.clip : (x0[i] > c.clip ? c.clip : x0[i]);
        }
        if (threshold) {  // dynamic thresholding: clamp to the sample's bound s, then divide by it
          const float s = threshold[b], inverse = 1.f / s;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) x0[i] = (x0[i] < -s ? -s : (x0[i] > s ? s : x0[i])) * inverse;
        }
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) p[i] = c.prev_x0 * x0[i] + c.prev_sample * xs[i] + c.prev_model * ms[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) p[i] = c.prev_sample * xs[i] + c.prev_model * ms[i];
      }
      // Terms of coefficient 0 are left out, as the reference does: a NaN there must not reach prev.
      if (history && c.prev_history != 0.f) {
        const float* hs = as_float(history + at, buf, len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) p[i] += c.prev_history * hs[i];
      }
      if (ns && c.prev_noise != 0.f) {
        if (c.learned_variance) {
          const float* vs = model_output_tile(m_row + n, cond_offset, c, m_buf, scratch, len);  // variance channels
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const float frac = (vs[i] + 1.f) / 2.f;
            p[i] += c.prev_noise * exp_fast(0.5f * (frac * c.max_log + (1.f - frac) * c.min_log)) * ns[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) p[i] += c.prev_noise * ns[i];
        }
      }
      write_streaming(prev + at, p, len);
      if (denoised) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) buf[i] = c.out_x0 * x0[i] + c.out_sample * xs[i];
        write_streaming(denoised + at, buf, len);
      }
    }
    store_fence();
  });
}

template <typename T>
const T* data_or_null(const std::optional<Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

std::vector<Tensor> denoise_step(const Tensor& sample, const Tensor& model_output, const std::optional<Tensor>& noise,
                                 const std::optional<Tensor>& history, const std::optional<Tensor>& threshold,
                                 const StepCoefficients& c, bool want_denoised) {
  Tensor prev = empty_output_like(sample);
  Tensor denoised = want_denoised ? empty_output_like(sample) : Tensor();
  const int64_t batch = sample.size(0), n = sample.numel() / batch, m_stride = model_output.numel() /
                                                                            model_output.size(0);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    step<T>(sample.const_data_ptr<T>(), model_output.const_data_ptr<T>(), data_or_null<T>(noise),
            data_or_null<T>(history), data_or_null<float>(threshold), prev.mutable_data_ptr<T>(),
            want_denoised ? denoised.mutable_data_ptr<T>() : nullptr,
            batch, n, m_stride, c);
  };
  dispatch_float_types(sample.scalar_type(), "denoise_step", run);
  return {prev, denoised};
}

// One pass writing each row of the embedding: sin and cos of the angles scale * (t * f_j).
// Reads timesteps and the frequencies; writes the (N, embedding_dim) output.
Tensor timestep_embedding(const Tensor& timesteps, const Tensor& frequencies, int64_t embedding_dim,
                          bool flip_sin_to_cos, double scale) {
  const int64_t rows = timesteps.size(0), half = embedding_dim / 2;
  Tensor out = at::empty({rows, embedding_dim}, timesteps.options().dtype(at::kFloat));
  const float* f = frequencies.const_data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  float* out_data = out.mutable_data_ptr<float>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, timesteps.scalar_type(), "timestep_embedding", [&] {
    const scalar_t* t = timesteps.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* row = out_data + r * embedding_dim;
        float* sines = row + (flip_sin_to_cos ? half : 0);
        float* cosines = row + (flip_sin_to_cos ? 0 : half);
        const float time = static_cast<float>(t[r]);
        for (int64_t j = 0; j < half; ++j) {
          const float angle = scale_f * (time * f[j]);
          sines[j] = std::sin(angle);
          cosines[j] = std::cos(angle);
        }
        if (embedding_dim % 2) row[embedding_dim - 1] = 0.f;
      }
    });
  });
  return out;
}

// Noises a training batch in one pass: per sample a = alphas_cumprod[t], then per element
// noisy = sqrt(a) x0 + sqrt(1 - a) noise and velocity = sqrt(a) noise - sqrt(1 - a) x0. Reads x0
// and noise; writes noisy and optionally velocity.
std::vector<Tensor> add_noise(const Tensor& x0, const Tensor& noise, const Tensor& timesteps,
                              const Tensor& alphas_cumprod, bool velocity) {
  Tensor noisy = empty_output_like(x0), v = velocity ? empty_output_like(x0) : Tensor();
  const int64_t batch = x0.size(0), n = x0.numel() / batch, tiles = (n + kTile - 1) / kTile;
  const int64_t* t = timesteps.const_data_ptr<int64_t>();
  const float* alphas = alphas_cumprod.const_data_ptr<float>();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T *xs = x0.const_data_ptr<T>(), *ns = noise.const_data_ptr<T>();
    T *noisy_out = noisy.mutable_data_ptr<T>(), *v_out = velocity ? v.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float x_buf[kTile], n_buf[kTile], out[kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, i0 = task % tiles * kTile, len = std::min(kTile, n - i0), at = b * n + i0;
        const float alpha = alphas[t[b]], a = std::sqrt(alpha), s = std::sqrt(1.f - alpha);
        const float* x = as_float(xs + at, x_buf, len);
        const float* e = as_float(ns + at, n_buf, len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) out[i] = a * x[i] + s * e[i];
        write_streaming(noisy_out + at, out, len);
        if (v_out) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) out[i] = a * e[i] - s * x[i];
          write_streaming(v_out + at, out, len);
        }
      }
      store_fence();
    });
  };
  dispatch_float_types(x0.scalar_type(), "add_noise", run);
  return {noisy, v};
}

// The loss and its gradient in one pass: each task sums (model_output - target)^2 over a tile in
// float and, if asked, writes the tile's gradient; the tiles of a sample add up in double in a
// fixed order (the same loss whatever the thread count). Reads model_output and target; writes
// the per-sample errors, the loss and optionally the gradient.
std::vector<Tensor> denoising_loss(const Tensor& model_output, const Tensor& target,
                                   const std::optional<Tensor>& weights, bool want_gradient) {
  const int64_t batch = model_output.size(0), n = model_output.numel() / batch, tiles = (n + kTile - 1) / kTile;
  const float* w = weights ? weights->const_data_ptr<float>() : nullptr;
  const float gradient_scale = 2.f / static_cast<float>(batch * n);
  Tensor gradient = want_gradient ? empty_output_like(model_output) : Tensor();
  std::vector<double> tile_sums(batch * tiles);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T *ms = model_output.const_data_ptr<T>(), *ts = target.const_data_ptr<T>();
    T* grad = want_gradient ? gradient.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float m_buf[kTile], t_buf[kTile], diff[kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, i0 = task % tiles * kTile, len = std::min(kTile, n - i0), at = b * n + i0;
        const float* m = as_float(ms + at, m_buf, len);
        const float* t = as_float(ts + at, t_buf, len);
        tile_sums[task] = lane_sum<float>(len, [&](int64_t i) { return (m[i] - t[i]) * (m[i] - t[i]); });
        if (grad) {
          const float scale = w ? gradient_scale * w[b] : gradient_scale;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) diff[i] = scale * (m[i] - t[i]);
          write_streaming(grad + at, diff, len);
        }
      }
      store_fence();
    });
  };
  dispatch_float_types(model_output.scalar_type(), "denoising_loss", run);
  Tensor per_sample = at::empty({batch}, model_output.options().dtype(at::kFloat));
  float* mse = per_sample.mutable_data_ptr<float>();
  double loss = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0.0;
    for (int64_t tile = 0; tile < tiles; ++tile) sum += tile_sums[b * tiles + tile];
    mse[b] = static_cast<float>(sum / n);
    loss += (w ? w[b] : 1.0) * sum / n;
  }
  return {at::scalar_tensor(loss / batch, model_output.options().dtype(at::kFloat)), per_sample, gradient};
}

// Backward of the loss: scales the gradient its forward wrote. Reads x; writes the scaled copy.
Tensor scale(const Tensor& x, double scale) {
  Tensor out = empty_output_like(x);
  const int64_t n = x.numel(), tiles = (n + kTile - 1) / kTile;
  const float s = static_cast<float>(scale);
  dispatch_float_types(x.scalar_type(), "scale", [&](auto tag) {
    using T = decltype(tag);
    const T* in = x.const_data_ptr<T>();
    T* result = out.mutable_data_ptr<T>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float buf[kTile], scaled[kTile];
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t i0 = tile * kTile, len = std::min(kTile, n - i0);
        const float* values = as_float(in + i0, buf, len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) scaled[i] = s * values[i];
        write_streaming(result + i0, scaled, len);
      }
      store_fence();
    });
  });
  return out;
}

}  // namespace genfast::cpu
