// Element types the CUDA kernels are instantiated for; the binding maps
// torch dtypes onto these so that csrc/cuda never includes torch.
#pragma once

namespace genfast::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

}  // namespace genfast::cuda
