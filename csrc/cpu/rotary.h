// Rotary position embedding's CPU kernel (rotary.cpp); the formula: genfast/reference/rotary.py.
// Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace genfast::cpu {

// Writes into out (B, S, H, D) the rotation of x (B, S, H, D) by the angles whose cosines and
// sines are cos, sin (B or 1, S, R) in x's math type: over each head's first R dimensions
//   out1 = x1 cos1 - x2 sin1,  out2 = x2 cos2 + x1 sin2   (halves of R),
// or with transpose, the transposed map (the backward):
//   out1 = x1 cos1 + x2 sin2,  out2 = x2 cos2 - x1 sin1.
// Dimensions R..D are copied (nothing to do when out is x: the rotation may run in place).
// x and out have their last dimension contiguous and any other strides.
void rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                      bool transpose);

}  // namespace genfast::cpu
