// Scaled dot-product attention's CPU kernels (attention.cpp), flash-attention style; the
// formula: genfast/reference/attention.py. Callers check the arguments (csrc/bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace genfast::cpu {

// One attention problem. q (B, H, S_q, D), k (B, H_k, S_k, D) and v (B, H_k, S_k, D_v) of
// one float type, any strides but a contiguous last dimension; query head h reads key head
// h / (H / H_k). mask, expanded to (B, H, S_q, S_k): bool (keep where true) or q's math type
// (added). alibi_slopes, expanded to (B, H), in the math type. softcap 0 is none. Query i
// sees keys i - window_left ..= i + window_right, -1 for no bound: causal is window_right 0.
// dropout_p > 0 drops the weights genfast/reference/attention.py's dropout_keep drops for
// dropout_seed.
struct AttentionProblem {
  at::Tensor q, k, v;
  std::optional<at::Tensor> mask, alibi_slopes;
  double scale = 1.0, softcap = 0.0;
  int64_t window_left = -1, window_right = -1;
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
};

// Returns the output (B, H, S_q, D_v) in q's dtype and the softmax's statistics (B, H, S_q, 2)
// in the math type: each row's largest score, in base 2, and the sum of 2^(score - largest);
// -inf and 0 for a row with no key left (its output is zero).
std::vector<at::Tensor> attention_forward(const AttentionProblem& problem);

// Returns dq, dk, dv (contiguous, in q's dtype) and, with mask_grad, the gradient of an
// additive mask, (B, H, S_q, S_k) in the math type: the caller sums it over broadcast axes.
std::vector<at::Tensor> attention_backward(const AttentionProblem& problem, const at::Tensor& out,
                                           const at::Tensor& stats, const at::Tensor& dout, bool mask_grad);

// Decoding over a KV cache. q (B, H, S_q, D) of one float type, rows contiguous; the caches
// (B, H_k, S_max, D) and (B, H_k, S_max, D_v), or with block_table (B, max_blocks) int64 paged
// (blocks, H_k, block_size, D), the same type with contiguous rows. Batch element b attends
// its cache's first lengths[b] (int64) rows, its queries the last S_q positions of them.
// alibi_slopes, softcap and the window as AttentionProblem's.
struct DecodeProblem {
  at::Tensor q, k_cache, v_cache, lengths;
  std::optional<at::Tensor> block_table, alibi_slopes;
  double scale = 1.0, softcap = 0.0;
  int64_t window_left = -1, window_right = -1;
};

// Returns the output (B, H, S_q, D_v), contiguous, in q's dtype.
at::Tensor attention_decode(const DecodeProblem& problem);

}  // namespace genfast::cpu
