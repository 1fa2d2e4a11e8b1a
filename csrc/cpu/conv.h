// Convolution CPU kernels (conv.cpp). Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace genfast::cpu {

// The 3x3 filters weight (K, C, 3, 3), float32, transformed for conv2d_winograd: U (16, C, K'),
// K' = K rounded up to a vector's lanes, the columns past K zero; each of the 16 (C, K') matrices
// packed in panels of columns for the kernel's matrix products (conv.cpp).
at::Tensor conv2d_winograd_weight(const at::Tensor& weight);

// The 3x3, stride-1 convolution of x (N, C, H, W), float32, upsampled by nearest neighbours to
// (upsample H, upsample W) first, with K = out_channels filters transformed into U, plus bias
// (K) and residual: y (N, K, upsample H + 2 pad_h - 2, upsample W + 2 pad_w - 2), laid out like x
// (channels-last if x is, else contiguous). residual has y's sizes and any strides whose channel
// stride is 1 (a channels-last tensor, or a (N, K, 1, 1) one expanded).
at::Tensor conv2d_winograd(const at::Tensor& x, const at::Tensor& U, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t out_channels, int64_t pad_h,
                           int64_t pad_w, int64_t upsample);

}  // namespace genfast::cpu
