// StyleGAN's minibatch standard deviation layer on the CPU (minibatch_stddev.cpp). The formula is
// genfast/reference/minibatch_stddev.py's.
#pragma once

#include <ATen/core/Tensor.h>

namespace genfast::cpu {

// out (N, C + channels, H, W) = cat(x, the group statistics): x contiguous (N, C, H, W), group
// dividing N, channels dividing C. Each (group member m, channel set f) is one task: a pass over
// its G x C / channels x H x W elements.
at::Tensor minibatch_stddev_forward(const at::Tensor& x, int64_t group, int64_t channels);

// dx from dout (N, C + channels, H, W) contiguous: dout's first C channels plus each statistic's
// gradient spread over its elements, x's statistics computed again.
at::Tensor minibatch_stddev_backward(const at::Tensor& dout, const at::Tensor& x, int64_t group, int64_t channels);

}  // namespace genfast::cpu
