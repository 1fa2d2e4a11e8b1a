// Token sampling on the CPU, one row per task: the row's logits and weights stay in a
// buffer in cache; top-k's threshold comes from a selection, top-p's from a selection by
// probability mass among the tokens top-k kept, and the draw from one scan in vocabulary
// order. Masses accumulate in double.

#include "sampling.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "dispatch.h"

namespace genfast::cpu {
namespace {

// The token drawn from one row; x holds its logits in acc_t, weights is scratch of x's size.
template <typename acc_t>
int64_t sample_row(const std::vector<acc_t>& x, std::vector<acc_t>& weights, std::vector<acc_t>& scratch,
                   acc_t inv_temperature, int64_t top_k, double top_p, double uniform) {
  const int64_t V = static_cast<int64_t>(x.size());
  const acc_t row_max = *std::max_element(x.begin(), x.end());
  for (int64_t i = 0; i < V; ++i) weights[i] = std::exp((x[i] - row_max) * inv_temperature);

  // Tokens at or above the threshold are kept; ties at it all stay.
  acc_t threshold = -std::numeric_limits<acc_t>::infinity();
  if (top_k > 0 && top_k < V) {
    scratch.assign(x.begin(), x.end());
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), std::greater<acc_t>());
    threshold = scratch[top_k - 1];
  }
  auto kept_mass = [&] {
    double mass = 0;
    for (int64_t i = 0; i < V; ++i)
      if (x[i] >= threshold) mass += weights[i];
    return mass;
  };
  double mass = kept_mass();
  if (top_p < 1) {
    // The logit p at which the descending cumulative mass first reaches top_p of the kept
    // mass, its whole tie group counted: mass(x > p) < target <= mass(x >= p). A quickselect
    // by mass finds it in a few passes where a sort of the row took most of the time.
    scratch.clear();
    for (int64_t i = 0; i < V; ++i)
      if (x[i] >= threshold) scratch.push_back(x[i]);
    auto weight_of = [&](auto first, auto last) {
      double sum = 0;
      for (auto it = first; it != last; ++it) sum += std::exp((*it - row_max) * inv_temperature);
      return sum;
    };
    double target = top_p * mass;
    auto first = scratch.begin(), last = scratch.end();
    while (true) {
      const acc_t pivot = *(first + (last - first) / 2);
      const auto greater = std::partition(first, last, [&](acc_t v) { return v > pivot; });
      const auto equal = std::partition(greater, last, [&](acc_t v) { return v == pivot; });
      const double above = weight_of(first, greater);
      if (above >= target) {
        last = greater;
        continue;
      }
      const double tied = weight_of(greater, equal);
      if (above + tied >= target || equal == last) {
        threshold = pivot;
        break;
      }
      target -= above + tied;
      first = equal;
    }
    mass = kept_mass();
  }

  const double target = uniform * mass;
  double cumulative = 0;
  int64_t last_kept = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (x[i] < threshold) continue;
    cumulative += weights[i];
    if (cumulative > target) return i;
    last_kept = i;
  }
  return last_kept;  // u * mass rounded up to the mass itself
}

}  // namespace

void sample(const at::Tensor& logits, const at::Tensor& uniform, double temperature, int64_t top_k, double top_p,
            const at::Tensor& tokens) {
  const int64_t rows = logits.size(0), V = logits.size(1);
  dispatch_float_types<true>(logits.scalar_type(), "sample", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* ls = logits.const_data_ptr<scalar_t>();
    const float* us = uniform.const_data_ptr<float>();
    int64_t* out = tokens.data_ptr<int64_t>();
    const acc_t inv_temperature = static_cast<acc_t>(1 / temperature);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(V), weights(V), scratch;
      scratch.reserve(V);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = ls + r * logits.stride(0);
        for (int64_t i = 0; i < V; ++i) x[i] = static_cast<acc_t>(row[i]);
        out[r] = sample_row(x, weights, scratch, inv_temperature, top_k, top_p, us[r]);
      }
    });
  });
}

}  // namespace genfast::cpu
