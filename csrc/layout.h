// Memory layouts the channel-wise kernels read.
#pragma once

#include <ATen/core/Tensor.h>

namespace genfast {

// Dense with channels innermost: (N, *spatial, C) in memory. Tensors that are
// both (C == 1 or no spatial extent) count as channels-first.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() > 2 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

}  // namespace genfast
