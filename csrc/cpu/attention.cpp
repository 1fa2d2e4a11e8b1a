// Attention on the CPU, tiled as FlashAttention does on a GPU: 64 x 64 tiles of scores stay
// in cache, the softmax is online, and tiles that causality or the window mask out entirely
// are never computed (a causal forward does about half the work of a full one). The matrix
// products are tile_matmul's register tiles. fp16 and bf16 inputs are computed from fp32
// copies of q, k and v.
//
// Forward: a task is one block of 64 queries of one head; it streams the keys that block
// sees. Backward: a task is one key head of one batch element; per block of its keys it
// streams the queries of every query head that reads it, so the key and value gradients
// accumulate in cache and the query gradients in a buffer the task owns: no atomics and a
// result independent of the thread count.

#include "attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "philox.h"
#include "tile_matmul.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

constexpr int64_t kBlockQ = 64, kBlockK = 64;
static_assert(kBlockK <= kPhiloxMaxCount, "a tile row's dropout is one philox_row_bits call");

// Dropout compares 24 random bits with dropout_p in steps of 2^-24
// (genfast/reference/attention.py's dropout_threshold).
constexpr uint32_t kDropoutLevels = 1u << 24;

uint32_t dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(std::min<double>(std::nearbyint(dropout_p * kDropoutLevels), kDropoutLevels - 1));
}

// The rows of a (B, H, S, X) tensor whose last dimension is contiguous, or the blocks of a
// (B, H, blocks, X, kBlockK) one (blocked_transpose's).
template <typename Pointer>
struct Rows {
  Pointer data;
  int64_t batch, head, row;
  Pointer at(int64_t b, int64_t h, int64_t s) const { return data + b * batch + h * head + s * row; }
};

template <typename T>
Rows<const T*> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Rows<T*> mutable_rows_of(const at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct Problem {
  static constexpr T kMinusInf = -std::numeric_limits<T>::infinity();

  Rows<const T*> q, k, v;
  int64_t batch, heads, kv_heads, queries, keys, dim, value_dim;
  // Both directions score in base 2, so that the softmax takes exp2_fast (cheaper than
  // exp_fast) and the backward recomputes the forward's scores bit for bit: a score in base 2
  // is its natural value times units = log2(e), a factor the scale, the softcap, ALiBi's
  // slopes and an added mask take. scale and softcap include it; natural_scale does not.
  T units, scale, softcap, natural_scale;
  int64_t left, right;
  const bool* bool_mask = nullptr;
  const T* float_mask = nullptr;
  int64_t mask_stride[4] = {};
  const T* slopes = nullptr;
  int64_t slope_stride[2] = {};
  // Dropout keeps a weight when the top 24 bits of its Philox word reach drop_threshold, and
  // scales it by keep_scale; drop_threshold 0 keeps every weight.
  uint64_t seed;
  uint32_t drop_threshold;
  T keep_scale;

  Problem(const AttentionProblem& p, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_)
      : q(rows_of<T>(q_)),
        k(rows_of<T>(k_)),
        v(rows_of<T>(v_)),
        batch(q_.size(0)),
        heads(q_.size(1)),
        kv_heads(k_.size(1)),
        queries(q_.size(2)),
        keys(k_.size(2)),
        dim(q_.size(3)),
        value_dim(v_.size(3)),
        units(T(1.4426950408889634)),
        scale(static_cast<T>(p.scale) * units),
        softcap(static_cast<T>(p.softcap) * units),
        natural_scale(static_cast<T>(p.scale)),
        left(p.window_left),
        right(p.window_right),
        seed(p.dropout_seed),
        drop_threshold(dropout_threshold(p.dropout_p)),
        keep_scale(static_cast<T>(T(kDropoutLevels) / T(kDropoutLevels - drop_threshold))) {
    if (p.mask) {
      const at::Tensor& mask = *p.mask;
      if (mask.scalar_type() == at::kBool) {
        bool_mask = mask.const_data_ptr<bool>();
      } else {
        float_mask = mask.const_data_ptr<T>();
      }
      for (int d = 0; d < 4; ++d) mask_stride[d] = mask.stride(d);
    }
    if (p.alibi_slopes) {
      slopes = p.alibi_slopes->const_data_ptr<T>();
      slope_stride[0] = p.alibi_slopes->stride(0);
      slope_stride[1] = p.alibi_slopes->stride(1);
    }
  }

  int64_t group() const { return heads / kv_heads; }

  bool dropout() const { return drop_threshold > 0; }

  // factor[c]: keep_scale if dropout keeps the weight of query i and key j0 + c of head (b, h),
  // else 0; c < n <= kPhiloxMaxCount.
  void keep_factors(int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, T* factor) const {
    uint32_t words[kPhiloxMaxCount];
    philox_row_bits(seed, static_cast<uint32_t>(i), static_cast<uint32_t>(b * heads + h), j0, n, words);
    const uint32_t threshold = drop_threshold;
    const T scale = keep_scale;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) factor[c] = (words[c] >> 8) >= threshold ? scale : T(0);
  }

  // The keys [first, last) that some query of [i0, i1) sees; (0, 0) when none does (a window
  // past the last key), so that a loop from first's block start does not run.
  std::pair<int64_t, int64_t> key_range(int64_t i0, int64_t i1) const {
    const int64_t first = left >= 0 ? std::max<int64_t>(0, i0 - left) : 0;
    const int64_t last = right >= 0 ? std::min(keys, i1 + right) : keys;
    return first < last ? std::pair{first, last} : std::pair<int64_t, int64_t>{0, 0};
  }

  // The queries [first, last) that see some key of [j0, j1).
  std::pair<int64_t, int64_t> query_range(int64_t j0, int64_t j1) const {
    const int64_t first = right >= 0 ? std::max<int64_t>(0, j0 - right) : 0;
    const int64_t last = left >= 0 ? std::min(queries, j1 + left) : queries;
    return {first, std::max(first, last)};
  }

  // Turns the products s = (scale q_i) . k_j of queries [i0, i0 + m) and keys [j0, j0 + n) of
  // head (b, h), in place, into the scores of genfast/reference/attention.py in base 2. The
  // tile is query-major (s[r * lds + c], the backward's) or, with kKeyMajor, key-major
  // (s[c * lds + r], the forward's); each loop runs along the contiguous lines. squashed, where
  // given, receives tanh(s / softcap), for the backward's chain rule: recovered from the
  // capped score as (c tanh) / c, a saturated tanh of 1 comes back 1 - 1e-7 for some caps (30
  // among them), and its pair's gradient with it.
  template <bool kKeyMajor>
  void finish_scores(int64_t b, int64_t h, int64_t i0, int64_t m, int64_t j0, int64_t n, T* s, int64_t lds,
                     T* squashed) const {
    const T slope = slopes ? units * slopes[b * slope_stride[0] + h * slope_stride[1]] : T(0);
    const int64_t lines = kKeyMajor ? n : m, length = kKeyMajor ? m : n;
    // Along a line the distance i - j steps by +1 (key-major: the query grows) or -1.
    const int64_t step = kKeyMajor ? 1 : -1;
    const int64_t mask_step = kKeyMajor ? mask_stride[2] : mask_stride[3];
    // Key j is masked for query i when i - j > left or j - i > right (a negative bound: none).
    const int64_t most_behind = left >= 0 ? left : std::numeric_limits<int64_t>::max();
    const int64_t most_ahead = right >= 0 ? right : std::numeric_limits<int64_t>::max();
    for (int64_t l = 0; l < lines; ++l) {
      T* line = s + l * lds;
      const int64_t i = kKeyMajor ? i0 : i0 + l, j = kKeyMajor ? j0 + l : j0;
      const int64_t distance0 = i - j;
      if (softcap > 0) {
        const T inverse_cap = T(1) / softcap, cap = softcap;
        T* tanh_line = squashed ? squashed + l * lds : nullptr;
#pragma omp simd
        for (int64_t x = 0; x < length; ++x) {
          const T t = tanh_fast(line[x] * inverse_cap);
          if (tanh_line) tanh_line[x] = t;
          line[x] = cap * t;
        }
      }
      if (slopes) {
#pragma omp simd
        for (int64_t x = 0; x < length; ++x) {
          const T distance = static_cast<T>(distance0 + step * x);
          line[x] -= slope * (distance < 0 ? -distance : distance);
        }
      }
      const int64_t mask_offset = b * mask_stride[0] + h * mask_stride[1] + i * mask_stride[2] + j * mask_stride[3];
      if (bool_mask) {
        const bool* keep = bool_mask + mask_offset;
        for (int64_t x = 0; x < length; ++x) line[x] = keep[x * mask_step] ? line[x] : kMinusInf;
      } else if (float_mask) {
        // A finite term past the largest float / log2(e) (a Hugging Face mask's finfo.min) would
        // be -inf in base 2, a pair masked for good where the reference's score stays finite: a
        // row masked whole by it averages the values there. It takes the largest finite value.
        const T* add = float_mask + mask_offset;
        constexpr T kLargest = std::numeric_limits<T>::max();
        for (int64_t x = 0; x < length; ++x) {
          const T natural = add[x * mask_step], term = units * natural;
          line[x] += std::isinf(term) && std::isfinite(natural) ? std::copysign(kLargest, natural) : term;
        }
      }
      // The distance is monotonic along the line: a line inside the band at both ends skips this.
      const int64_t distance_last = distance0 + step * (length - 1);
      if (std::max(distance0, distance_last) > most_behind || -std::min(distance0, distance_last) > most_ahead) {
#pragma omp simd
        for (int64_t x = 0; x < length; ++x) {
          const int64_t distance = distance0 + step * x;
          line[x] = (distance > most_behind || -distance > most_ahead) ? kMinusInf : line[x];
        }
      }
    }
  }
};

// rows x cols of src (row stride ld) as a tile_matmul B operand: src itself where cols fills
// whole tile columns, else a copy in buffer with the row padded by zeros. Returns the
// pointer and its row stride.
template <typename T>
std::pair<const T*, int64_t> b_operand(const T* src, int64_t rows, int64_t cols, int64_t ld, T* buffer) {
  const int64_t width = padded_columns<T>(cols);
  if (width == cols) return {src, ld};
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(src + r * ld, src + r * ld + cols, buffer + r * width);
    std::fill(buffer + r * width + cols, buffer + (r + 1) * width, T(0));
  }
  return {buffer, width};
}

// scale times queries [i0, i0 + m) of head (b, h), into buffer (m x padded_columns(dim), zero
// padded): the A operand of the score products and, in the backward, the B operand of dk.
template <typename T>
void scaled_queries(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t m, T* buffer) {
  const int64_t width = padded_columns<T>(p.dim);
  for (int64_t r = 0; r < m; ++r) {
    const T* src = p.q.at(b, h, i0 + r);
    T* dst = buffer + r * width;
    const T scale = p.scale;
#pragma omp simd
    for (int64_t c = 0; c < p.dim; ++c) dst[c] = scale * src[c];
    std::fill(dst + p.dim, dst + width, T(0));
  }
}

// scale times queries [i0, i0 + m) of head (b, h), transposed into buffer (dim x width, zero
// padded): the B operand of the forward's key-major score products.
template <typename T>
void scaled_queries_transposed(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t m, int64_t width,
                               T* buffer) {
  for (int64_t c = 0; c < p.dim; ++c) std::fill(buffer + c * width + m, buffer + (c + 1) * width, T(0));
  for (int64_t r = 0; r < m; ++r) {
    const T* src = p.q.at(b, h, i0 + r);
    for (int64_t c = 0; c < p.dim; ++c) buffer[c * width + r] = p.scale * src[c];
  }
}

// One task of the forward: queries [i0, i0 + m) of head (b, h) into out and their rows of
// stats (attention_forward's).
//
// The scores are key-major: a tile holds a block of keys by rows and the queries by columns,
// so the online softmax's maxima and sums run down the columns in vector registers, with no
// reduction across a vector (those cost a fifth of the forward in the query-major layout).
// The keys are read in place as the A operand of the scores; the tile, read transposed, is
// the A operand of the values' product.
template <typename T>
struct ForwardBlock {
  static constexpr int64_t kLanes = kTileColumns<T>;
  const Problem<T>& p;
  std::vector<T> queries, scores, acc, values, row_max, row_sum, keep;

  explicit ForwardBlock(const Problem<T>& problem)
      : p(problem),
        queries(problem.dim * kBlockQ),
        scores(kBlockK * kBlockQ),
        acc(kBlockQ * padded_columns<T>(problem.value_dim)),
        values(kBlockK * padded_columns<T>(problem.value_dim)),
        row_max(kBlockQ),
        row_sum(kBlockQ),
        keep(problem.dropout() ? kBlockK : 0) {}

  void run(int64_t b, int64_t h, int64_t i0, Rows<T*> out, T* stats) {
    const int64_t m = std::min(kBlockQ, p.queries - i0), kv_head = h / p.group();
    // Whole strips of kLanes queries, the softmax's unit.
    const int64_t width = (m + kLanes - 1) / kLanes * kLanes, dv_width = padded_columns<T>(p.value_dim);
    scaled_queries_transposed(p, b, h, i0, m, width, queries.data());
    std::fill(acc.begin(), acc.begin() + m * dv_width, T(0));
    std::fill(row_max.begin(), row_max.end(), Problem<T>::kMinusInf);
    std::fill(row_sum.begin(), row_sum.end(), T(0));

    const auto [first, last] = p.key_range(i0, i0 + m);
    for (int64_t j0 = first; j0 < last; j0 += kBlockK) {
      const int64_t n = std::min(kBlockK, last - j0);
      tile_matmul<false>(n, width, p.dim, p.k.at(b, kv_head, j0), p.k.row, 1, queries.data(), width, scores.data(),
                         width);
      p.template finish_scores<true>(b, h, i0, m, j0, n, scores.data(), width, nullptr);
      for (int64_t x0 = 0; x0 < width; x0 += kLanes) softmax_columns(x0, n, width);
      if (p.dropout()) {
        // The sums are the softmax's; dropout zeroes weights only in the values' product.
        for (int64_t r = 0; r < m; ++r) {
          p.keep_factors(b, h, i0 + r, j0, n, keep.data());
          for (int64_t c = 0; c < n; ++c) scores[c * width + r] *= keep[c];
        }
      }
      const auto [v, ldv] = b_operand(p.v.at(b, kv_head, j0), n, p.value_dim, p.v.row, values.data());
      tile_matmul<true>(m, dv_width, n, scores.data(), 1, width, v, ldv, acc.data(), dv_width);
    }
    for (int64_t r = 0; r < m; ++r) {
      const T inverse = row_sum[r] > 0 ? T(1) / row_sum[r] : T(0);
      T* dst = out.at(b, h, i0 + r);
      const T* src = acc.data() + r * dv_width;
#pragma omp simd
      for (int64_t c = 0; c < p.value_dim; ++c) dst[c] = src[c] * inverse;
      stats[2 * r] = row_max[r];
      stats[2 * r + 1] = row_sum[r];
    }
  }

  // The online softmax of queries [x0, x0 + kLanes) over a tile of n keys (binary logits): the
  // scores become 2^(score - running max), the sums and maxima advance, and acc's rows are
  // rescaled.
  void softmax_columns(int64_t x0, int64_t n, int64_t width) {
    T* tile = scores.data() + x0;
    T new_max[kLanes], base[kLanes], rescale[kLanes], sum[kLanes] = {};
#pragma omp simd
    for (int64_t x = 0; x < kLanes; ++x) new_max[x] = row_max[x0 + x];
    for (int64_t c = 0; c < n; ++c) {
#pragma omp simd
      for (int64_t x = 0; x < kLanes; ++x) new_max[x] = std::max(new_max[x], tile[c * width + x]);
    }
#pragma omp simd
    for (int64_t x = 0; x < kLanes; ++x) {
      // Until a query sees a key its maximum is -inf: subtracting 0 keeps every exp at 0.
      base[x] = new_max[x] == Problem<T>::kMinusInf ? T(0) : new_max[x];
      rescale[x] = exp2_fast(row_max[x0 + x] - base[x]);
      row_max[x0 + x] = new_max[x];
    }
    for (int64_t c = 0; c < n; ++c) {
#pragma omp simd
      for (int64_t x = 0; x < kLanes; ++x) {
        const T weight = exp2_fast(tile[c * width + x] - base[x]);
        tile[c * width + x] = weight;
        sum[x] += weight;
      }
    }
    const int64_t dv_width = padded_columns<T>(p.value_dim);
    for (int64_t x = 0; x < kLanes; ++x) {
      row_sum[x0 + x] = row_sum[x0 + x] * rescale[x] + sum[x];
      if (rescale[x] == T(1)) continue;
      T* acc_row = acc.data() + (x0 + x) * dv_width;
#pragma omp simd
      for (int64_t c = 0; c < dv_width; ++c) acc_row[c] *= rescale[x];
    }
  }
};

// One task of the backward: every key block of key head (b, kv_head).
template <typename T>
struct BackwardHead {
  const Problem<T>& p;
  Rows<const T*> keys_t, values_t, out, dout;
  const T* stats;
  Rows<T*> dq, dk, dv, dmask;
  int64_t d_width, dv_width;
  std::vector<T> dq_acc, delta, queries, probs, dprobs, squashed, keep, dropped, dk_acc, dv_acc, dout_pack, k_pack;

  BackwardHead(const Problem<T>& problem, Rows<const T*> keys_transposed, Rows<const T*> values_transposed,
               Rows<const T*> out_, Rows<const T*> dout_, const T* stats_, Rows<T*> dq_, Rows<T*> dk_, Rows<T*> dv_,
               Rows<T*> dmask_)
      : p(problem),
        keys_t(keys_transposed),
        values_t(values_transposed),
        out(out_),
        dout(dout_),
        stats(stats_),
        dq(dq_),
        dk(dk_),
        dv(dv_),
        dmask(dmask_),
        d_width(padded_columns<T>(problem.dim)),
        dv_width(padded_columns<T>(problem.value_dim)),
        dq_acc(problem.group() * problem.queries * d_width),
        delta(problem.group() * problem.queries),
        queries(kBlockQ * d_width),
        probs(kBlockQ * padded_columns<T>(kBlockK)),
        dprobs(kBlockQ * padded_columns<T>(kBlockK)),
        squashed(problem.softcap > 0 ? kBlockQ * padded_columns<T>(kBlockK) : 0),
        keep(problem.dropout() ? kBlockQ * padded_columns<T>(kBlockK) : 0),
        dropped(keep.size()),
        dk_acc(kBlockK * d_width),
        dv_acc(kBlockK * dv_width),
        dout_pack(kBlockQ * dv_width),
        k_pack(kBlockK * d_width) {}

  void run(int64_t b, int64_t kv_head) {
    const int64_t group = p.group();
    std::fill(dq_acc.begin(), dq_acc.end(), T(0));
    // delta_i = dO_i . O_i, the softmax backward's row term.
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < p.queries; ++i) {
        const T* o = out.at(b, kv_head * group + g, i);
        const T* d = dout.at(b, kv_head * group + g, i);
        delta[g * p.queries + i] = lane_sum<T>(p.value_dim, [&](int64_t c) { return o[c] * d[c]; });
      }
    for (int64_t j0 = 0; j0 < p.keys; j0 += kBlockK) key_block(b, kv_head, j0);
    // The scores' scale, applied once to the accumulated dS k.
    const T scale = p.natural_scale;
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < p.queries; ++i) {
        const T* src = dq_acc.data() + (g * p.queries + i) * d_width;
        T* dst = dq.at(b, kv_head * group + g, i);
#pragma omp simd
        for (int64_t c = 0; c < p.dim; ++c) dst[c] = scale * src[c];
      }
  }

  void key_block(int64_t b, int64_t kv_head, int64_t j0) {
    const int64_t n = std::min(kBlockK, p.keys - j0), width = padded_columns<T>(n);
    const auto [k, ldk] = b_operand(p.k.at(b, kv_head, j0), n, p.dim, p.k.row, k_pack.data());
    std::fill(dk_acc.begin(), dk_acc.end(), T(0));
    std::fill(dv_acc.begin(), dv_acc.end(), T(0));
    const auto [first, last] = p.query_range(j0, j0 + n);
    for (int64_t g = 0; g < p.group(); ++g) {
      const int64_t h = kv_head * p.group() + g;
      for (int64_t i0 = first; i0 < last; i0 += kBlockQ) {
        const int64_t m = std::min(kBlockQ, last - i0);
        const T* d_o = dout.at(b, h, i0);
        T* P = probs.data();
        T* dS = dprobs.data();
        scaled_queries(p, b, h, i0, m, queries.data());
        tile_matmul<false>(m, width, p.dim, queries.data(), d_width, 1, keys_t.at(b, kv_head, j0 / kBlockK), kBlockK,
                           P, width);
        p.template finish_scores<false>(b, h, i0, m, j0, n, P, width, squashed.empty() ? nullptr : squashed.data());
        for (int64_t r = 0; r < m; ++r) {
          // The forward's weights from its own scores, maximum and sum: at scores near 1e30 a
          // log-sum-exp would round the sum away, and any other rounding of a score would be
          // 1e23 off. A row that saw no key has maximum -inf and sum 0: subtracting +inf keeps
          // its weights 0.
          const T* row_stats = stats + 2 * ((b * p.heads + h) * p.queries + i0 + r);
          const T base = row_stats[0] == Problem<T>::kMinusInf ? -row_stats[0] : row_stats[0];
          const T inverse_sum = row_stats[1] > 0 ? T(1) / row_stats[1] : T(0);
          T* row = P + r * width;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) row[c] = exp2_fast(row[c] - base) * inverse_sum;
        }
        // With dropout, the values were weighted by P's kept entries, scaled: dv reads those.
        const T* weights = P;
        if (p.dropout()) {
          for (int64_t r = 0; r < m; ++r) {
            T* factor = keep.data() + r * width;
            p.keep_factors(b, h, i0 + r, j0, n, factor);
            const T* prob = P + r * width;
            T* kept = dropped.data() + r * width;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) kept[c] = prob[c] * factor[c];
          }
          weights = dropped.data();
        }
        const auto [d_o_op, ld_do] = b_operand(d_o, m, p.value_dim, dout.row, dout_pack.data());
        tile_matmul<true>(n, dv_width, m, weights, 1, width, d_o_op, ld_do, dv_acc.data(), dv_width);
        tile_matmul<false>(m, width, p.value_dim, d_o, dout.row, 1, values_t.at(b, kv_head, j0 / kBlockK), kBlockK,
                           dS, width);
        for (int64_t r = 0; r < m; ++r) {
          const T row_delta = delta[g * p.queries + i0 + r];
          const T* prob = P + r * width;
          T* ds = dS + r * width;
          // dS is 0 where the weight is 0 (masked out), even where the row's dP or delta is NaN
          // (a bad value it never saw): the product would be 0 * NaN. It is 0 where the weight is
          // 1, too: the other weights sum below rounding there, and so does the true dS = P sum_k
          // P_k (dP - dP_k), where dP - delta would be two rounded dot products' difference, which
          // a huge query or key multiplies into dk or dq.
          if (p.dropout()) {
            // The gradient of a dropped weight is the kept one's, scaled, and 0 where dropped.
            const T* factor = keep.data() + r * width;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c)
              ds[c] = prob[c] == T(0) || prob[c] == T(1) ? T(0) : prob[c] * (ds[c] * factor[c] - row_delta);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c)
              ds[c] = prob[c] == T(0) || prob[c] == T(1) ? T(0) : prob[c] * (ds[c] - row_delta);
          }
          if (dmask.data) std::copy(ds, ds + n, dmask.at(b, h, i0 + r) + j0);
          if (!squashed.empty()) {
            // d/ds of c tanh(s / c) is 1 - tanh^2. A zero dS stays 0 where tanh is NaN (a masked
            // pair's, a zero times an infinite key): as the weight-0 rule above.
            const T* t = squashed.data() + r * width;
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) ds[c] = ds[c] == T(0) ? T(0) : ds[c] * (T(1) - t[c] * t[c]);
          }
        }
        // dk += dS^T (scale q), the scale the scores' (in base 2: dk's copy out takes 1 / units);
        // dq's is applied once, in run().
        tile_matmul<true>(n, d_width, m, dS, 1, width, queries.data(), d_width, dk_acc.data(), d_width);
        tile_matmul<true>(m, d_width, n, dS, width, 1, k, ldk, dq_acc.data() + (g * p.queries + i0) * d_width,
                          d_width);
      }
    }
    const T natural = T(1) / p.units;
    for (int64_t c = 0; c < n; ++c) {
      const T* src = dk_acc.data() + c * d_width;
      T* dst = dk.at(b, kv_head, j0 + c);
#pragma omp simd
      for (int64_t x = 0; x < p.dim; ++x) dst[x] = natural * src[x];
      std::copy(dv_acc.data() + c * dv_width, dv_acc.data() + c * dv_width + p.value_dim, dv.at(b, kv_head, j0 + c));
    }
  }
};

// t (B, H, S, X) as (B, H, blocks, X, kBlockK): each block of kBlockK rows transposed and
// contiguous, the last zero-padded: one block is the B operand of the products with the keys
// (or values) of that block. One pass, a block at a time: through ATen (zeros, a copy into them,
// a transposed copy) it took three, 3% of a BERT-base training step.
template <typename T>
at::Tensor blocked_transpose(const at::Tensor& t) {
  const int64_t B = t.size(0), H = t.size(1), S = t.size(2), X = t.size(3), blocks = (S + kBlockK - 1) / kBlockK;
  at::Tensor blocked = at::empty({B, H, blocks, X, kBlockK}, t.options());
  const Rows<const T*> rows = rows_of<T>(t);
  T* out = blocked.mutable_data_ptr<T>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, j0 = task % blocks * kBlockK, n = std::min(kBlockK, S - j0);
      T* block = out + task * X * kBlockK;
      for (int64_t c = 0; c < n; ++c) {
        const T* row = rows.at(bh / H, bh % H, j0 + c);
        for (int64_t x = 0; x < X; ++x) block[x * kBlockK + c] = row[x];
      }
      for (int64_t x = 0; x < X; ++x) std::fill(block + x * kBlockK + n, block + (x + 1) * kBlockK, T(0));
    }
  });
  return blocked;
}

// Calls run(T{}) with T the math type of a tensor of math type `type`.
template <typename Run>
void dispatch_math_type(at::ScalarType type, Run&& run) {
  if (type == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
}

at::ScalarType math_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_math(const at::Tensor& t) {
  return t.scalar_type() == math_type(t) ? t : t.to(math_type(t));
}

// The block of queries task t computes, in an order that interleaves cheap and costly blocks
// (first, last, second, ...): under causality the cost grows with the block index, and
// at::parallel_for hands each thread a contiguous range of tasks.
int64_t interleaved_block(int64_t t, int64_t blocks) {
  return t % 2 == 0 ? t / 2 : blocks - 1 - t / 2;
}

}  // namespace

std::vector<at::Tensor> attention_forward(const AttentionProblem& problem) {
  const at::Tensor q = as_math(problem.q), k = as_math(problem.k), v = as_math(problem.v);
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2);
  at::Tensor out = at::empty({B, H, S, v.size(3)}, q.options());
  at::Tensor stats = at::empty({B, H, S, 2}, q.options());
  const int64_t blocks = (S + kBlockQ - 1) / kBlockQ;
  dispatch_math_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p(problem, q, k, v);
    const Rows<T*> out_rows = mutable_rows_of<T>(out);
    T* stats_data = stats.mutable_data_ptr<T>();
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      ForwardBlock<T> block(p);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / blocks, i0 = interleaved_block(t % blocks, blocks) * kBlockQ;
        block.run(bh / H, bh % H, i0, out_rows, stats_data + 2 * (bh * S + i0));
      }
    });
  });
  return {out.to(problem.q.scalar_type()), stats};
}

std::vector<at::Tensor> attention_backward(const AttentionProblem& problem, const at::Tensor& out,
                                           const at::Tensor& stats, const at::Tensor& dout, bool mask_grad) {
  const at::Tensor q = as_math(problem.q), k = as_math(problem.k), v = as_math(problem.v);
  const at::Tensor out_math = as_math(out), dout_math = as_math(dout);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dmask;
  if (mask_grad) dmask = at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options());
  const int64_t B = q.size(0), kv_heads = k.size(1);
  dispatch_math_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p(problem, q, k, v);
    const at::Tensor keys_t = blocked_transpose<T>(k), values_t = blocked_transpose<T>(v);
    const Rows<T*> no_mask{nullptr, 0, 0, 0};
    at::parallel_for(0, B * kv_heads, 1, [&](int64_t begin, int64_t end) {
      BackwardHead<T> head(p, rows_of<T>(keys_t), rows_of<T>(values_t), rows_of<T>(out_math),
                           rows_of<T>(dout_math), stats.const_data_ptr<T>(), mutable_rows_of<T>(dq),
                           mutable_rows_of<T>(dk), mutable_rows_of<T>(dv),
                           mask_grad ? mutable_rows_of<T>(dmask) : no_mask);
      for (int64_t t = begin; t < end; ++t) head.run(t / kv_heads, t % kv_heads);
    });
  });
  const auto dtype = problem.q.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype), dmask};
}

}  // namespace genfast::cpu
