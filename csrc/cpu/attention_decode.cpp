// Decoding attention on the CPU: a few new queries of each head against a KV cache, contiguous
// or paged. Decoding is memory-bound, so each cached key and value row is read once per key
// head, for the queries of every head that shares it (GQA) at once. The cache is split along
// the sequence into chunks computed in parallel (one batch element's long cache keeps every
// core busy); each chunk leaves a partial softmax per query row (its maximum, its sum and its
// weighted values) and a combine step merges them in a fixed order.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "dispatch.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

constexpr int64_t kChunk = 256, kTile = 64;

// Queries and caches of element type S (any float type: fp16 and bf16 caches are read as they
// are); computes in T.
template <typename S, typename T = math_t<S>>
struct Decode {
  static constexpr T kMinusInf = -std::numeric_limits<T>::infinity();

  const DecodeProblem& problem;
  const S *q, *k, *v;
  const T* slopes;
  const int64_t *lengths, *table;
  int64_t heads, kv_heads, group, queries, dim, value_dim, block_size, splits;
  T scale, softcap;

  Decode(const DecodeProblem& p, int64_t splits_)
      : problem(p),
        q(p.q.const_data_ptr<S>()),
        k(p.k_cache.const_data_ptr<S>()),
        v(p.v_cache.const_data_ptr<S>()),
        slopes(p.alibi_slopes ? p.alibi_slopes->const_data_ptr<T>() : nullptr),
        lengths(p.lengths.const_data_ptr<int64_t>()),
        table(p.block_table ? p.block_table->const_data_ptr<int64_t>() : nullptr),
        heads(p.q.size(1)),
        kv_heads(p.k_cache.size(1)),
        group(heads / kv_heads),
        queries(p.q.size(2)),
        dim(p.q.size(3)),
        value_dim(p.v_cache.size(3)),
        block_size(p.k_cache.size(2)),
        splits(splits_),
        scale(static_cast<T>(p.scale)),
        softcap(static_cast<T>(p.softcap)) {}

  // Row j of key head kv of batch element b in a cache (contiguous, or paged through the table).
  const S* cache_row(const S* cache, const at::Tensor& t, int64_t b, int64_t kv, int64_t j) const {
    if (!table) return cache + b * t.stride(0) + kv * t.stride(1) + j * t.stride(2);
    const int64_t block = table[b * problem.block_table->stride(0) + j / block_size];
    return cache + block * t.stride(0) + kv * t.stride(1) + (j % block_size) * t.stride(2);
  }

  // The partial softmax of chunk `split` of (b, kv)'s cache for its group * queries rows.
  void chunk(int64_t b, int64_t kv, int64_t split, T* row_max, T* row_sum, T* acc, std::vector<T>& scaled,
             std::vector<T>& scores) const {
    const int64_t rows = group * queries, length = lengths[b];
    std::fill(row_max, row_max + rows, kMinusInf);
    std::fill(row_sum, row_sum + rows, T(0));
    std::fill(acc, acc + rows * value_dim, T(0));
    for (int64_t r = 0; r < rows; ++r) {
      const S* src = q + b * problem.q.stride(0) + (kv * group + r / queries) * problem.q.stride(1) +
                     (r % queries) * problem.q.stride(2);
      for (int64_t d = 0; d < dim; ++d) scaled[r * dim + d] = scale * static_cast<T>(src[d]);
    }
    const int64_t end = std::min(length, (split + 1) * kChunk);
    for (int64_t j0 = split * kChunk; j0 < end; j0 += kTile) {
      const int64_t n = std::min(kTile, end - j0);
      for (int64_t c = 0; c < n; ++c) {
        const S* key = cache_row(k, problem.k_cache, b, kv, j0 + c);
        for (int64_t r = 0; r < rows; ++r) {
          const T* query = scaled.data() + r * dim;
          scores[r * kTile + c] = lane_sum<T>(dim, [&](int64_t d) { return query[d] * static_cast<T>(key[d]); });
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* s = scores.data() + r * kTile;
        const int64_t h = kv * group + r / queries, position = length - queries + r % queries;
        const T slope = slopes ? slopes[b * problem.alibi_slopes->stride(0) + h * problem.alibi_slopes->stride(1)]
                               : T(0);
        const int64_t left = problem.window_left, right = problem.window_right;
        T block_max = kMinusInf;
        for (int64_t c = 0; c < n; ++c) {
          const int64_t j = j0 + c;
          T score = softcap > 0 ? softcap * tanh_fast(s[c] / softcap) : s[c];
          score -= slope * static_cast<T>(position > j ? position - j : j - position);
          const bool seen = (left < 0 || j >= position - left) && (right < 0 || j <= position + right);
          s[c] = seen ? score : kMinusInf;
          block_max = s[c] > block_max ? s[c] : block_max;
        }
        const T new_max = std::max(row_max[r], block_max);
        const T base = new_max == kMinusInf ? T(0) : new_max;
        const T rescale = exp_fast(row_max[r] - base);
        T sum = 0;
        for (int64_t c = 0; c < n; ++c) sum += (s[c] = exp_fast(s[c] - base));
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = new_max;
        T* acc_row = acc + r * value_dim;
        for (int64_t d = 0; d < value_dim; ++d) acc_row[d] *= rescale;
      }
      for (int64_t c = 0; c < n; ++c) {
        const S* value = cache_row(v, problem.v_cache, b, kv, j0 + c);
        for (int64_t r = 0; r < rows; ++r) {
          const T p = scores[r * kTile + c];
          T* acc_row = acc + r * value_dim;
#pragma omp simd
          for (int64_t d = 0; d < value_dim; ++d) acc_row[d] += p * static_cast<T>(value[d]);
        }
      }
    }
  }
};

}  // namespace

at::Tensor attention_decode(const DecodeProblem& problem) {
  const at::Tensor& q = problem.q;
  const int64_t B = q.size(0), H = q.size(1), queries = q.size(2), kv_heads = problem.k_cache.size(1);
  const int64_t group = H / kv_heads, rows = group * queries, value_dim = problem.v_cache.size(3);
  const int64_t longest = B ? problem.lengths.max().item<int64_t>() : 0;
  const int64_t splits = std::max<int64_t>(1, (longest + kChunk - 1) / kChunk);
  at::Tensor out = at::empty({B, H, queries, value_dim}, q.options());
  dispatch_float_types<true>(q.scalar_type(), "attention_decode", [&](auto tag) {
    using S = decltype(tag);
    using T = math_t<S>;
    const Decode<S> decode(problem, splits);
    const int64_t parts = B * kv_heads * splits;
    std::vector<T> partial_max(parts * rows), partial_sum(parts * rows), partial_acc(parts * rows * value_dim);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> scaled(rows * decode.dim), scores(rows * kTile);
      for (int64_t t = begin; t < end; ++t)
        decode.chunk(t / (kv_heads * splits), t / splits % kv_heads, t % splits, partial_max.data() + t * rows,
                     partial_sum.data() + t * rows, partial_acc.data() + t * rows * value_dim, scaled, scores);
    });
    // out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s per row, M the largest m_s.
    S* dst = out.mutable_data_ptr<S>();
    at::parallel_for(0, B * kv_heads * rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> merged(value_dim);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bk = t / rows, r = t % rows;
        const int64_t first = bk * splits * rows + r;  // split s of this row: first + s * rows
        T max = Decode<S>::kMinusInf, sum = 0;
        for (int64_t s = 0; s < splits; ++s) max = std::max(max, partial_max[first + s * rows]);
        std::fill(merged.begin(), merged.end(), T(0));
        for (int64_t s = 0; s < splits; ++s) {
          const T weight = max == Decode<S>::kMinusInf ? T(0) : exp_fast(partial_max[first + s * rows] - max);
          sum += weight * partial_sum[first + s * rows];
          const T* acc = partial_acc.data() + (first + s * rows) * value_dim;
          for (int64_t d = 0; d < value_dim; ++d) merged[d] += weight * acc[d];
        }
        const int64_t b = bk / kv_heads, h = bk % kv_heads * group + r / queries, i = r % queries;
        S* row = dst + ((b * H + h) * queries + i) * value_dim;
        // A row that sees no key gets 0 (sum == 0); a NaN score makes the sum NaN, and the row NaN.
        const bool empty = sum <= T(0);
        for (int64_t d = 0; d < value_dim; ++d) row[d] = static_cast<S>(empty ? T(0) : merged[d] / sum);
      }
    });
  });
  return out;
}

}  // namespace genfast::cpu
