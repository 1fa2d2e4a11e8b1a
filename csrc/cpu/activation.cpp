// Activations, plain or gated (GLU variants: SwiGLU, GeGLU), on the CPU: y = act(x) [* up] in one
// pass, and its backward in one more. x and up are (rows, width) with the last dimension
// contiguous and any row stride, so the two halves of a fused gate-and-up projection are read in
// place.

#include "activation.h"
#include "dispatch.h"
#include "elementwise.h"
#include "memory.h"

namespace genfast::cpu {

using at::Tensor;

Tensor activation_forward(const Tensor& x, const std::optional<Tensor>& up, ActivationKind kind) {
  const int64_t rows = x.size(0), width = x.size(1);
  Tensor y = empty_output({rows, width}, x.options());
  dispatch_float_types<true>(x.scalar_type(), "activation", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ups = up ? up->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ys = y.mutable_data_ptr<scalar_t>();
    const int64_t x_stride = x.stride(0), up_stride = up ? up->stride(0) : 0;
    dispatch_activation(kind, [&]<typename Act>() {
      for_each_tile(rows, width, [&](int64_t row, int64_t first, int64_t end) {
        const scalar_t* xr = xs + row * x_stride;
        scalar_t* yr = ys + row * width;
        if (ups == nullptr) {
#pragma omp simd
          for (int64_t i = first; i < end; ++i) yr[i] = static_cast<scalar_t>(Act::forward(static_cast<acc_t>(xr[i])));
        } else {
          const scalar_t* ur = ups + row * up_stride;
#pragma omp simd
          for (int64_t i = first; i < end; ++i)
            yr[i] = static_cast<scalar_t>(Act::forward(static_cast<acc_t>(xr[i])) * static_cast<acc_t>(ur[i]));
        }
      });
    });
  });
  return y;
}

std::vector<Tensor> activation_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& up,
                                        ActivationKind kind) {
  const int64_t rows = x.size(0), width = x.size(1);
  Tensor dx = empty_output({rows, width}, x.options());
  Tensor dup = up ? empty_output({rows, width}, x.options()) : Tensor();
  dispatch_float_types<true>(x.scalar_type(), "activation_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* dys = dy.const_data_ptr<scalar_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ups = up ? up->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxs = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dups = up ? dup.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t x_stride = x.stride(0), up_stride = up ? up->stride(0) : 0;
    dispatch_activation(kind, [&]<typename Act>() {
      for_each_tile(rows, width, [&](int64_t row, int64_t first, int64_t end) {
        const scalar_t* xr = xs + row * x_stride;
        const scalar_t* dyr = dys + row * width;
        scalar_t* dxr = dxs + row * width;
        if (ups == nullptr) {
#pragma omp simd
          for (int64_t i = first; i < end; ++i)
            dxr[i] = static_cast<scalar_t>(Act::backward(static_cast<acc_t>(xr[i]), static_cast<acc_t>(dyr[i])));
        } else {
          const scalar_t* ur = ups + row * up_stride;
          scalar_t* dupr = dups + row * width;
#pragma omp simd
          for (int64_t i = first; i < end; ++i) {
            const acc_t z = static_cast<acc_t>(xr[i]), g = static_cast<acc_t>(dyr[i]);
            dxr[i] = static_cast<scalar_t>(Act::backward(z, g * static_cast<acc_t>(ur[i])));
            dupr[i] = static_cast<scalar_t>(Act::forward(z) * g);
          }
        }
      });
    });
  });
  return {dx, dup};
}

}  // namespace genfast::cpu
