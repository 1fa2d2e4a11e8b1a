// Normalisation CPU kernels. Callers check the arguments (csrc/bindings.cpp);
// weight, bias and the statistics are in x's math type (float, or double for
// double x).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace genfast::cpu {

// GroupNorm + activation (group_norm.cpp): x dense channels-first or channels-last and not
// empty, weight and bias (C). Returns y (x's dtype and layout) and mean, rstd (N, groups).
std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           int64_t groups, double eps, bool silu);

// Returns dx (x's layout) and the weight and bias gradients.
std::vector<at::Tensor> group_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                            int64_t groups, bool silu);

// LayerNorm, or RMSNorm if rms, over the last dimension (layer_norm.cpp): x contiguous and not
// empty, residual like x, weight and bias (D). Returns y, h = x + residual (empty without a
// residual) and mean, rstd (rows); RMSNorm's mean is 0 and its bias is ignored.
std::vector<at::Tensor> layer_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                           const at::Tensor& weight, const at::Tensor& bias, double eps, bool rms);

// Returns dx (which is also the residual's gradient) and the weight and bias gradients; h is the
// normalised input, dh the gradient flowing into the h output (if it was used).
std::vector<at::Tensor> layer_norm_backward(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                            const at::Tensor& h, const at::Tensor& weight, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool rms);

}  // namespace genfast::cpu
