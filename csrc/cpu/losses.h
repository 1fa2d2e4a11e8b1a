// The losses of VAEs and GANs on the CPU (losses.cpp): an elementwise term of x (and t) summed
// in the same pass, and its gradient in one more. The terms are genfast/reference/losses.py's.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <vector>

namespace genfast::cpu {

enum class LossKind { kMSE, kBCEWithLogits, kGaussianKL, kSoftplus, kHinge };

// The kind named "mse", "bce_with_logits", "gaussian_kl", "softplus" or "hinge".
LossKind loss_kind(std::string_view name);

// What the loss kernels take besides their tensors. x and t: contiguous, one shape and dtype
// (t absent for softplus and hinge).
struct LossParams {
  LossKind kind;
  double sign;   // s of softplus(s x) and max(0, 1 + s x)
  bool reduce;   // the scaled sum (a 0-dim tensor), else each element's term
  double scale;  // multiplies the sum: 1 / n for a mean
};

at::Tensor loss_forward(const at::Tensor& x, const std::optional<at::Tensor>& t, const LossParams& params);

// (dx, dt or an undefined tensor): grad (0-dim where params.reduce, else x's shape) times the
// terms' partial derivatives (and params.scale where reduced). dt only where with_target_grad.
std::vector<at::Tensor> loss_backward(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& t,
                                      const LossParams& params, bool with_target_grad);

// The VAE's sample z = mu + e^(logvar / 2) noise (a = mu), or with `gradient` its gradient for
// logvar, dz e^(logvar / 2) noise / 2 (a = dz). All contiguous, one shape and dtype.
at::Tensor reparameterize(const at::Tensor& a, const at::Tensor& logvar, const at::Tensor& noise, bool gradient);

}  // namespace genfast::cpu
