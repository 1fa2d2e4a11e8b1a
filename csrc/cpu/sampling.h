// Token sampling's CPU kernel (sampling.cpp); the specification: genfast/reference/sampling.py.
// Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace genfast::cpu {

// Writes into tokens (rows,) int64 the draw of uniform[r] (float32, in [0, 1)) from
// softmax(logits[r] / temperature) restricted to the tokens top-k and then top-p keep;
// top_k 0 or at least V and top_p 1 keep every token. logits (rows, V) has a contiguous
// last dimension.
void sample(const at::Tensor& logits, const at::Tensor& uniform, double temperature, int64_t top_k, double top_p,
            const at::Tensor& tokens);

}  // namespace genfast::cpu
