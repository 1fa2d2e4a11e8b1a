// Cross-entropy over rows of logits, the CPU kernel (cross_entropy.cpp) behind
// genfast.ops.linear_cross_entropy; the specification: genfast/reference/cross_entropy.py.
// Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace genfast::cpu {

// Writes into loss (rows,) float32 (float64 for float64 logits) each row's
// logsumexp(z) - (1 - smoothing) z[target] - smoothing mean(z), 0 where target is ignore_index.
// With grad_scale (rows,) in loss's type, also overwrites each row of logits with its gradient
// grad_scale[r] * (softmax(z) - (1 - smoothing) onehot(target) - smoothing / V), zero where
// target is ignore_index. logits (rows, V) has a contiguous last dimension; targets are in
// [0, V) or ignore_index.
void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                        const std::optional<at::Tensor>& grad_scale, const at::Tensor& loss);

}  // namespace genfast::cpu
