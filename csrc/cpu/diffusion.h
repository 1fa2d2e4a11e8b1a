// The diffusion ops' CPU kernels (the formulas: genfast/reference/diffusion.py).
// Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace genfast::cpu {

// The step's scalars, in the order genfast.ops.diffusion passes them.
struct StepCoefficients {
  float sample_noise, x0_sample, x0_model, prev_x0, prev_sample, prev_model, prev_history, prev_noise, out_x0, out_sample;
  float clip, min_log, max_log, guidance;
  bool clipped, learned_variance, guided;
  // With fused noise, the noise is philox_normal(noise_seed) (philox.h), not a tensor.
  bool fused_noise;
  uint64_t noise_seed;
};

// sample (B, ...) contiguous, float32, float16 or bfloat16; model_output of
// sample's dtype, contiguous, (B or 2B when guided, C or 2C with a learned
// variance, ...); noise and history like sample; threshold (B,) contiguous
// float32, dynamic thresholding's per-sample bound. Returns prev and, if
// want_denoised, denoised (else an undefined tensor), both like sample.
std::vector<at::Tensor> denoise_step(const at::Tensor& sample, const at::Tensor& model_output,
                                     const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& history,
                                     const std::optional<at::Tensor>& threshold, const StepCoefficients& c,
                                     bool want_denoised);

// diffusers' sinusoidal timestep embedding (genfast/reference/diffusion.py): timesteps (N,)
// contiguous, of any real dtype; frequencies (embedding_dim / 2,) contiguous float32. Returns
// (N, embedding_dim) float32.
at::Tensor timestep_embedding(const at::Tensor& timesteps, const at::Tensor& frequencies, int64_t embedding_dim,
                              bool flip_sin_to_cos, double scale);

// Training: the noisy batch and optionally the velocity target (genfast/reference/diffusion.py's
// add_noise). x0 and noise (B, ...) contiguous, float32, float16 or bfloat16; timesteps (B,) int64
// within alphas_cumprod, a contiguous float32 table. Returns noisy and velocity (or undefined).
std::vector<at::Tensor> add_noise(const at::Tensor& x0, const at::Tensor& noise, const at::Tensor& timesteps,
                                  const at::Tensor& alphas_cumprod, bool velocity);

// The denoising loss: model_output and target (B, ...) contiguous, of one dtype; weights (B,)
// float32 or undefined. Returns the float32 loss (0-d), each sample's mean squared error (B,)
// and, if want_gradient, the loss's gradient in model_output, 2 weights[b] / (B N) (model_output
// - target), in its dtype (else an undefined tensor).
std::vector<at::Tensor> denoising_loss(const at::Tensor& model_output, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weights, bool want_gradient);

// scale * x for a contiguous float32, float16 or bfloat16 x, into the output cache (memory.h).
at::Tensor scale(const at::Tensor& x, double scale);

}  // namespace genfast::cpu
