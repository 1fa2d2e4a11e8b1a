// Cross-entropy on the CPU, one row per task. A row of logits (200 KB for GPT-2's vocabulary)
// is read from memory once and stays in cache for the other passes: its maximum, then its
// sum of exponentials and of logits, then, for the gradient, the write over the logits.
//
// The loss is kept as gaps from the row's maximum m, loss = (m - z_t) + log(sum exp(z - m)) (and
// smoothing's mean over the row likewise): the logsumexp itself would round at m's magnitude,
// and a row of logits near 1e30 would lose the whole loss to it.

#include "cross_entropy.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "dispatch.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

template <typename acc_t>
struct RowStatistics {
  acc_t max;
  acc_t log_sum;  // log(sum exp(z - max))
  acc_t gaps;     // sum (max - z)
};

template <typename acc_t>
RowStatistics<acc_t> row_statistics(const acc_t* z, int64_t V) {
  const acc_t row_max = lane_max(V, z);
  const acc_t exp_sum = lane_sum<acc_t>(V, [&](int64_t j) { return exp_fast(z[j] - row_max); });
  return {row_max, std::log(exp_sum), lane_sum<acc_t>(V, [&](int64_t j) { return row_max - z[j]; })};
}

}  // namespace

void cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double smoothing,
                        const std::optional<at::Tensor>& grad_scale, const at::Tensor& loss) {
  const int64_t rows = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  dispatch_float_types<true>(logits.scalar_type(), "cross_entropy_rows", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    scalar_t* zs = logits.data_ptr<scalar_t>();
    const int64_t* ts = target.const_data_ptr<int64_t>();
    const acc_t* scales = grad_scale ? grad_scale->const_data_ptr<acc_t>() : nullptr;
    acc_t* out = loss.data_ptr<acc_t>();
    const acc_t keep = static_cast<acc_t>(1 - smoothing), spread = static_cast<acc_t>(smoothing / V);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      // Low-precision rows are widened once into this buffer; float and double rows are read in place.
      std::vector<acc_t> widened(std::is_same_v<scalar_t, acc_t> ? 0 : V);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = zs + r * row_stride;
        const int64_t t = ts[r];
        if (t == ignore_index) {
          out[r] = 0;
          if (scales)
            for (int64_t j = 0; j < V; ++j) row[j] = scalar_t(0);
          continue;
        }
        const acc_t* z = reinterpret_cast<const acc_t*>(row);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          for (int64_t j = 0; j < V; ++j) widened[j] = static_cast<acc_t>(row[j]);
          z = widened.data();
        }
        const auto [row_max, log_sum, gaps] = row_statistics(z, V);
        const acc_t target_logit = z[t];
        // Without smoothing the gaps are not read: a -inf logit (a masked token) makes them inf.
        out[r] = keep * ((row_max - target_logit) + log_sum) +
                 (smoothing > 0 ? spread * (gaps + static_cast<acc_t>(V) * log_sum) : acc_t(0));
        if (!scales) continue;
        // (softmax - spread) - keep, the reference's order: a row of one token gets exactly 0 (1 - spread
        // rounds to keep), where g - g * spread - g * keep left a rounding that a huge input
        // multiplied into the weight's gradient.
        const acc_t g = scales[r];
#pragma omp simd
        for (int64_t j = 0; j < V; ++j)
          row[j] = static_cast<scalar_t>(g * (exp_fast((z[j] - row_max) - log_sum) - spread));
        row[t] = static_cast<scalar_t>(g * ((std::exp((target_logit - row_max) - log_sum) - spread) - keep));
      }
    });
  });
}

}  // namespace genfast::cpu
