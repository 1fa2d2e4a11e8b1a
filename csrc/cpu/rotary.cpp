// Rotary position embedding on the CPU: one pass over q (or k), each head's row rotated by its
// position's (cos, sin) row, which stays in L1 across the heads of that position. In place when
// out is x: each pair (i, i + R/2) is read before it is written.

#include "rotary.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "dispatch.h"

namespace genfast::cpu {

void rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                      bool transpose) {
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t R = cos.size(2), half = R / 2;
  const int64_t table_batch_stride = cos.size(0) == 1 ? 0 : S * R;
  const bool in_place = x.data_ptr() == out.data_ptr();
  dispatch_float_types<true>(x.scalar_type(), "rotary_embedding", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const acc_t* cs = cos.const_data_ptr<acc_t>();
    const acc_t* ss = sin.const_data_ptr<acc_t>();
    const acc_t sign = transpose ? acc_t(-1) : acc_t(1);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / (H * D));
    at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / S, s = bs % S;
        const acc_t* c = cs + b * table_batch_stride + s * R;
        const acc_t* sn = ss + b * table_batch_stride + s * R;
        // The sine each half is multiplied by: sin1 and sin2 forward, -sin2 and -sin1 transposed.
        const acc_t* sin_first = transpose ? sn + half : sn;
        const acc_t* sin_second = transpose ? sn : sn + half;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* xr = xs + b * x.stride(0) + s * x.stride(1) + h * x.stride(2);
          scalar_t* orow = os + b * out.stride(0) + s * out.stride(1) + h * out.stride(2);
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const acc_t x1 = static_cast<acc_t>(xr[i]), x2 = static_cast<acc_t>(xr[i + half]);
            orow[i] = static_cast<scalar_t>(x1 * c[i] - sign * x2 * sin_first[i]);
            orow[i + half] = static_cast<scalar_t>(x2 * c[i + half] + sign * x1 * sin_second[i]);
          }
          if (!in_place) std::copy(xr + R, xr + D, orow + R);
        }
      }
    });
  });
}

}  // namespace genfast::cpu
