// Bias + activation (+ gain, + clamp), StyleGAN2's bias_act, on the CPU (bias_act.cpp). The
// formulas are genfast/reference/bias_act.py's.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace genfast::cpu {

// What every bias_act kernel takes besides its tensors. x is dense in any order of its
// dimensions, so its memory reads as (outer, channels, inner) with `inner` the stride of the
// bias's dimension: element k's channel is (k / inner) % channels.
struct BiasActParams {
  std::string activation;  // "linear", "relu", "leaky_relu", "gelu", "silu", "tanh" or "sigmoid"
  double alpha;  // leaky_relu's slope
  double gain;
  std::optional<double> clamp;  // none: no clamp
  int64_t inner;
};

// y = clamp(gain act(x + bias)), laid out like x.
at::Tensor bias_act_forward(const at::Tensor& x, const std::optional<at::Tensor>& bias, const BiasActParams& params);

// g = dy gain act^(order)(x + bias) [-clamp <= gain act(x + bias) <= clamp] for order 1 (the
// gradient) or 2 (what a second-order gradient multiplies), laid out like x, and with a bias
// the sum of g per channel (else an undefined tensor). dy is laid out like x.
std::vector<at::Tensor> bias_act_backward(const at::Tensor& dy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& bias, const BiasActParams& params,
                                          int64_t order);

// gain act(input weight^T + bias) as one autograd node (linear_bias_act.cpp): genfast.nn.Linear's
// CPU path, its backward writing the weight's gradient into genfast's output memory.
at::Tensor linear_bias_act(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const BiasActParams& params);

}  // namespace genfast::cpu
