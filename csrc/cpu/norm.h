// GroupNorm (+ activation) CPU kernels. Callers check the arguments
// (csrc/bindings.cpp): x dense channels-first or channels-last and not empty,
// weight and bias (C) in x's math type (float, or double for double x).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace genfast::cpu {

// Returns y (x's dtype and layout) and mean, rstd (N, groups).
std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                           int64_t groups, double eps, bool silu);

// Returns dx (x's layout) and the weight and bias gradients.
std::vector<at::Tensor> group_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                            int64_t groups, bool silu);

}  // namespace genfast::cpu
