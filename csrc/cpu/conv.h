// Convolution CPU kernels (conv.cpp). Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace genfast::cpu {

// The 3x3 filters weight (K, C, 3, 3), float32, transformed for conv2d_winograd: U (16, C, K'),
// K' = K rounded up to a vector's lanes, the columns past K zero; each of the 16 (C, K') matrices
// packed in panels of columns for the kernel's matrix products (conv.cpp). flipped: the filters
// of the input's gradient instead, weight.flip(2, 3).transpose(0, 1) (C filters of K channels).
at::Tensor conv2d_winograd_weight(const at::Tensor& weight, bool flipped);

// The 3x3, stride-1 convolution of x (N, C, H, W), float32, upsampled by nearest neighbours to
// (upsample H, upsample W) first, with K = out_channels filters transformed into U, plus bias
// (K) and residual: y (N, K, upsample H + 2 pad_h - 2, upsample W + 2 pad_w - 2), laid out like x
// (channels-last if x is, else contiguous). residual has y's sizes and any strides whose channel
// stride is 1 (a channels-last tensor, or a (N, K, 1, 1) one expanded).
at::Tensor conv2d_winograd(const at::Tensor& x, const at::Tensor& U, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& residual, int64_t out_channels, int64_t pad_h,
                           int64_t pad_w, int64_t upsample);

// The gradients of that convolution's filters, (K, C, 3, 3), and, where bias, of its bias (K; else
// undefined), from the convolution's input x (N, C, H, W) and its output's gradient dy (N, K, out_h,
// out_w), each channels-last or contiguous, by the same F(2x2, 3x3) transforms. The filters'
// gradient is laid out channels-last where filters_channels_last, as a channels-last model's
// weights are: autograd would copy it there otherwise.
std::tuple<at::Tensor, at::Tensor> conv2d_winograd_filters_backward(const at::Tensor& x, const at::Tensor& dy,
                                                                    int64_t pad_h, int64_t pad_w, int64_t upsample,
                                                                    bool bias, bool filters_channels_last);

}  // namespace genfast::cpu
