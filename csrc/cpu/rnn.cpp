// LSTM and GRU time loops on the CPU. Each step is one matrix product, h W_hh^T, and fused gate
// math over (B, H): up to batch 64 in one team of threads for the whole sequence, each thread
// owning a slice of units (persistent_forward); else one ATen product per step (with W_hh
// packed once for MKL where that pays: StepProduct) and one pass of gate math, parallel over
// the batch's rows (forward_loop). The backward runs the steps in reverse with one product each
// (the gradient of the state): for a plain cell over a few rows or a W_hh that stays in cache,
// in one team (persistent_backward), else as forward_loop does. It leaves the weights'
// gradients to products over all steps at the end.

#include "rnn.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <utility>

#include "dispatch.h"
#include "tile_matmul.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

template <typename T>
GENFAST_VECTOR_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

// Elements per task of a pointwise pass: a smaller step runs on one thread.
constexpr int64_t kGrain = 1 << 14;

template <typename Body>
void for_each_row(int64_t rows, int64_t row_elements, Body&& body) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_elements)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) body(b);
                   });
}

// The sizes of a recurrence and whether row b takes part in step t (its sequence is longer).
struct Shape {
  int64_t T, B, H, P, G;
  const int64_t* lengths;
  bool reverse, save;

  bool sorted = false;  // lengths never increase along the batch, as in a PackedSequence

  explicit Shape(const Recurrence& r)
      : T(r.x_proj.size(0)),
        B(r.x_proj.size(1)),
        H(r.cell == Cell::kLSTM ? r.x_proj.size(2) / 4 : r.x_proj.size(2) / 3),
        P(r.h0.size(1)),
        G(r.cell == Cell::kLSTM ? 4 : 3),
        lengths(r.lengths ? r.lengths->const_data_ptr<int64_t>() : nullptr),
        reverse(r.reverse),
        save(r.save) {
    sorted = lengths && std::is_sorted(lengths, lengths + B, std::greater<int64_t>());
  }

  bool live(int64_t b, int64_t t) const { return !lengths || t < lengths[b]; }
  // The rows that need step t's products: with sorted lengths only the first ones, those
  // still running (a packed batch's products shrink as its sequences end).
  int64_t product_rows(int64_t t) const {
    if (!sorted) return B;
    return std::partition_point(lengths, lengths + B, [t](int64_t length) { return t < length; }) - lengths;
  }
  // The time index of the s-th step the forward takes.
  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  // Where step t's tensors for the backward go: their own place, or one scratch step.
  int64_t slot(int64_t t) const { return save ? t : 0; }
  int64_t saved_steps() const { return save ? T : 1; }
};

// Zoneout of one row: state[j] = m[j] previous[j] + (1 - m[j]) state[j], copied to out if given.
template <typename T>
void keep_share(const T* m, const T* previous, T* state, T* out, int64_t size) {
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) state[j] += m[j] * (previous[j] - state[j]);
  if (out) std::copy(state, state + size, out);
}

// LayerNorm of one row: normalized = (x - mean) rstd, y = normalized weight + bias (y may be
// x); returns rstd.
template <typename T>
T normalize_row(const T* x, int64_t size, const T* weight, const T* bias, T eps, T* normalized, T* y) {
  const T mean = lane_sum<T>(size, [&](int64_t j) { return x[j]; }) / T(size);
  const T var = lane_sum<T>(size, [&](int64_t j) { return (x[j] - mean) * (x[j] - mean); }) / T(size);
  const T rstd = T(1) / std::sqrt(var + eps);
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    normalized[j] = (x[j] - mean) * rstd;
    y[j] = normalized[j] * weight[j] + bias[j];
  }
  return rstd;
}

// LayerNorm's backward of one row: dx = rstd (g - mean(g) - normalized mean(g normalized)),
// g = dy weight.
template <typename T>
void normalize_row_backward(const T* dy, const T* normalized, const T* weight, T rstd, T* dx, int64_t size) {
  const T mean_g = lane_sum<T>(size, [&](int64_t j) { return dy[j] * weight[j]; }) / T(size);
  const T mean_gx = lane_sum<T>(size, [&](int64_t j) { return dy[j] * weight[j] * normalized[j]; }) / T(size);
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) dx[j] = rstd * (dy[j] * weight[j] - mean_g - normalized[j] * mean_gx);
}

// x W^T for each step of a loop over one W. MKL's sgemm repacks W on every call; packed once,
// through the operators ATen registers for inductor's frozen linear layers, the steps skip that.
// It pays where sgemm reads W^T across its rows, from a few rows of x on, and where it reads W in
// place only from a few dozen (Xeon, hidden 512, 100 steps, ms unpacked -> packed):
//   h W_hh^T:  batch 1  7.7 -> 10.3, 4  9.1 -> 7.8, 16  37 -> 21, 64  64 -> 54;
//   dG W_hh:   batch 1  6.9 -> 10.0, 16  19.3 -> 20.5, 32  35.6 -> 32.9, 64  56.6 -> 53.6.
// Unpacked (float64, torch without MKL, `pack` false, a step over fewer rows than packed for),
// it is at::mm (at::addmm with a bias).
class StepProduct {
 public:
  StepProduct(const at::Tensor& weight, int64_t rows, bool pack, std::optional<at::Tensor> bias = std::nullopt)
      : weight_(weight), bias_(std::move(bias)), rows_(rows) {
    if (!pack || !packs(weight.scalar_type())) return;
    linear_ = mkl_ops()->linear;
    packed_ = mkl_ops()->reorder.call(weight.contiguous(), rows);
  }

  // Whether weights of this dtype get packed (when asked to).
  static bool packs(at::ScalarType dtype) { return dtype == at::kFloat && mkl_ops().has_value(); }

  // x (rows, K) W^T (+ bias): a new tensor, or written into out.
  at::Tensor operator()(const at::Tensor& x, at::Tensor out) const {
    if (linear_ && x.size(0) == rows_) return linear_->call(x, packed_, weight_, bias_, rows_);
    return bias_ ? at::addmm_out(out, *bias_, x, weight_.t()) : at::mm_out(out, x, weight_.t());
  }

 private:
  using Reorder = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, int64_t)>;
  using Linear = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, int64_t)>;
  struct MklOps {
    Reorder reorder;
    Linear linear;
  };

  static const std::optional<MklOps>& mkl_ops() {
    static const std::optional<MklOps> ops = find_mkl_ops();
    return ops;
  }

  static std::optional<MklOps> find_mkl_ops() {
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto reorder = dispatcher.findSchema({"mkl::_mkl_reorder_linear_weight", ""});
    const auto linear = dispatcher.findSchema({"mkl::_mkl_linear", ""});
    if (!reorder || !linear || !reorder->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
        !linear->hasKernelForDispatchKey(c10::DispatchKey::CPU))
      return std::nullopt;
    return MklOps{reorder->typed<at::Tensor(const at::Tensor&, int64_t)>(),
                  linear->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, int64_t)>()};
  }

  at::Tensor weight_, packed_;
  std::optional<at::Tensor> bias_;
  int64_t rows_;
  std::optional<Linear> linear_;
};

template <typename T>
void forward_loop(const Recurrence& r, const Shape& n, std::vector<at::Tensor>& out) {
  const at::Tensor &output = out[0], &h = out[1], &c = out[2], &gates = out[3], &h_prev = out[4];
  const bool lstm = r.cell == Cell::kLSTM, projected = r.weight_hr.has_value();
  const int64_t H = n.H, P = n.P, B = n.B;
  at::Tensor h_gates = at::empty({B, n.G * H}, h.options());
  at::Tensor cell_out = projected ? at::empty({B, H}, h.options()) : at::Tensor();
  at::Tensor projection = projected ? at::empty({B, P}, h.options()) : at::Tensor();
  const T* bias = r.bias_hh ? r.bias_hh->const_data_ptr<T>() : nullptr;
  T *h_data = h.mutable_data_ptr<T>(), *c_data = lstm ? c.mutable_data_ptr<T>() : nullptr;
  T* c_prev = lstm ? out[5].mutable_data_ptr<T>() : nullptr;
  T* tanh_c = lstm ? out[6].mutable_data_ptr<T>() : nullptr;
  const T* zoneout_h = r.zoneout_h ? r.zoneout_h->const_data_ptr<T>() : nullptr;
  const T* zoneout_c = r.zoneout_c ? r.zoneout_c->const_data_ptr<T>() : nullptr;
  const T* norm_hh = r.norm_hh ? r.norm_hh->const_data_ptr<T>() : nullptr;
  const T* norm_c = r.norm_c ? r.norm_c->const_data_ptr<T>() : nullptr;
  T* hh_norm = norm_hh ? out[7].mutable_data_ptr<T>() : nullptr;
  T* c_norm = norm_c ? out[8].mutable_data_ptr<T>() : nullptr;
  T* rstd = norm_hh || norm_c ? out[9].mutable_data_ptr<T>() : nullptr;
  // LN_c of the new cell, what tanh reads, per row.
  at::Tensor normed_cell = norm_c ? at::empty({B, H}, h.options()) : at::Tensor();
  const T eps = static_cast<T>(r.eps);
  const StepProduct hh_product(r.weight_hh, B, n.T >= 2 && B >= 4);
  for (int64_t s = 0; s < n.T; ++s) {
    const int64_t t = n.time(s);
    h_prev[n.slot(t)].copy_(h);
    const T* h_prev_t = h_prev.const_data_ptr<T>() + n.slot(t) * B * P;
    const int64_t rows = n.product_rows(t);
    // Rows past `rows` did not step and are never read.
    const at::Tensor h_products = hh_product(h.narrow(0, 0, rows), h_gates.narrow(0, 0, rows));
    T* hg = h_products.mutable_data_ptr<T>();
    const T* xp_t = r.x_proj.const_data_ptr<T>() + t * B * n.G * H;
    T* gates_t = gates.mutable_data_ptr<T>() + n.slot(t) * B * 4 * H;
    T* out_t = output.mutable_data_ptr<T>() + t * B * P;
    T* cell_t = projected ? cell_out.mutable_data_ptr<T>() : out_t;
    for_each_row(B, n.G * H, [&](int64_t b) {
      const T* xp = xp_t + b * n.G * H;
      T* hp = hg + b * n.G * H;
      T* g4 = gates_t + b * 4 * H;
      const int64_t row = n.slot(t) * B * H + b * H;
      if (!n.live(b, t)) {
        std::fill(g4, g4 + 4 * H, T(0));
        std::fill(out_t + b * P, out_t + (b + 1) * P, T(0));
        if (lstm) {
          std::copy(c_data + b * H, c_data + (b + 1) * H, c_prev + row);
          std::fill(tanh_c + row, tanh_c + row + H, T(0));
        }
        return;
      }
      if (lstm) {
        const int64_t at_row = n.slot(t) * B + b;
        if (norm_hh)
          rstd[2 * at_row] = normalize_row(hp, 4 * H, norm_hh, norm_hh + 4 * H, eps, hh_norm + at_row * 4 * H, hp);
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T i = sigmoid(xp[j] + hp[j]), f = sigmoid(xp[H + j] + hp[H + j]);
          const T g = tanh_fast(xp[2 * H + j] + hp[2 * H + j]), o = sigmoid(xp[3 * H + j] + hp[3 * H + j]);
          const T previous = c_data[b * H + j];
          g4[j] = i, g4[H + j] = f, g4[2 * H + j] = g, g4[3 * H + j] = o;
          c_prev[row + j] = previous, c_data[b * H + j] = f * previous + i * g;
        }
        const T* squashed = c_data + b * H;
        if (norm_c) {
          T* normed = normed_cell.mutable_data_ptr<T>() + b * H;
          rstd[2 * at_row + 1] = normalize_row(squashed, H, norm_c, norm_c + H, eps, c_norm + at_row * H, normed);
          squashed = normed;
        }
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T tc = tanh_fast(squashed[j]);
          tanh_c[row + j] = tc, cell_t[b * H + j] = g4[3 * H + j] * tc;
        }
        // Outside the loop: a conditional store inside kept GCC from vectorising it (10x slower).
        if (!projected) std::copy(cell_t + b * H, cell_t + (b + 1) * H, h_data + b * H);
        if (zoneout_c) keep_share<T>(zoneout_c + (t * B + b) * H, c_prev + row, c_data + b * H, nullptr, H);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T h_r = hp[j] + bias[j], h_z = hp[H + j] + bias[H + j], h_n = hp[2 * H + j] + bias[2 * H + j];
          const T rg = sigmoid(xp[j] + h_r), z = sigmoid(xp[H + j] + h_z), ng = tanh_fast(xp[2 * H + j] + rg * h_n);
          const T next = (T(1) - z) * ng + z * h_data[b * H + j];
          g4[j] = rg, g4[H + j] = z, g4[2 * H + j] = ng, g4[3 * H + j] = h_n;
          h_data[b * H + j] = next, out_t[b * P + j] = next;
        }
      }
      if (zoneout_h && !projected)
        keep_share(zoneout_h + (t * B + b) * P, h_prev_t + b * P, h_data + b * P, out_t + b * P, P);
    });
    if (projected) {  // h = (o tanh c) W_hr^T for the rows that stepped
      at::Tensor stepping = projection.narrow(0, 0, rows);
      at::mm_out(stepping, cell_out.narrow(0, 0, rows), r.weight_hr->t());
      const T* projected_h = projection.const_data_ptr<T>();
      for (int64_t b = 0; b < B; ++b) {
        if (!n.live(b, t)) continue;
        std::copy(projected_h + b * P, projected_h + (b + 1) * P, h_data + b * P);
        std::copy(projected_h + b * P, projected_h + (b + 1) * P, out_t + b * P);
        if (zoneout_h) keep_share(zoneout_h + (t * B + b) * P, h_prev_t + b * P, h_data + b * P, out_t + b * P, P);
      }
    }
  }
}

// y[b][c] = sum_k h[b][k] wt[k][c] for c < kBlock = kVectors vectors of columns and b < kRows:
// each loaded vector of wt meets every row, and kRows * kVectors independent accumulators hide
// the latency of the fused multiply-adds.
template <typename T, int kRows, int kVectors>
inline __attribute__((always_inline)) void column_block(const T* wt, int64_t ldw, const T* h, int64_t ldh, int64_t P,
                                                        T* y, int64_t ldy) {
  constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  // Unrolled by hand: GCC left these loops rolled, with the accumulators on the stack (8x slower).
  Vector<T> acc[kRows][kVectors] = {};
  for (int64_t k = 0; k < P; ++k) {
    Vector<T> w[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) std::memcpy(&w[v], wt + k * ldw + v * kLanes, sizeof(Vector<T>));
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const T hk = h[r * ldh + k];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) acc[r][v] += hk * w[v];
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) std::memcpy(y + r * ldy + v * kLanes, &acc[r][v], sizeof(Vector<T>));
}

// Columns of wt (P rows, row stride ldw) a block computes: one row of h takes eight vectors
// of columns at once, two or four rows four each.
template <typename T>
constexpr int64_t kColumnBlock = 8 * kVectorBytes / sizeof(T);

// y (B, kColumnBlock, row stride ldy) = h (B, P, row stride ldh) times w (P, kColumnBlock, row
// stride ldw). From six rows on, tile_matmul's tiles take it (a strip's 2 loads feed 12
// multiply-adds); fewer rows take half the block at a time, four rows together where AVX-512's
// 32 registers hold the 16 accumulators (an LSTM's forward at batch 4, hidden 512: 28.8 ms
// against 32.9 two rows at a time, W read half as often), then two; a last row takes the whole
// block.
template <typename T>
void block_product(const T* h, int64_t B, int64_t P, int64_t ldh, const T* w, int64_t ldw, T* y, int64_t ldy) {
  constexpr int64_t kHalf = kColumnBlock<T> / 2;
  if (B >= 6) {
    tile_matmul<false>(B, kColumnBlock<T>, P, h, ldh, 1, w, ldw, y, ldy);
    return;
  }
  int64_t b = 0;
  if constexpr (kVectorBytes == 64)
    for (; b + 4 <= B; b += 4) {
      column_block<T, 4, 4>(w, ldw, h + b * ldh, ldh, P, y + b * ldy, ldy);
      column_block<T, 4, 4>(w + kHalf, ldw, h + b * ldh, ldh, P, y + b * ldy + kHalf, ldy);
    }
  for (; b + 2 <= B; b += 2) {
    column_block<T, 2, 4>(w, ldw, h + b * ldh, ldh, P, y + b * ldy, ldy);
    column_block<T, 2, 4>(w + kHalf, ldw, h + b * ldh, ldh, P, y + b * ldy + kHalf, ldy);
  }
  if (b < B) column_block<T, 1, 8>(w, ldw, h + b * ldh, ldh, P, y + b * ldy, ldy);
}

// y (B, blocks * kColumnBlock, row stride ldy) = h (B, P) times the panels: each panel a
// contiguous (P, kColumnBlock) block of columns, read front to back.
template <typename T>
void row_products(const T* h, int64_t B, int64_t P, const T* panels, int64_t blocks, T* y, int64_t ldy) {
  constexpr int64_t kBlock = kColumnBlock<T>;
  for (int64_t i = 0; i < blocks; ++i) block_product(h, B, P, P, panels + i * P * kBlock, kBlock, y + i * kBlock, ldy);
}

// How a product lands in the persistent loop's slots [slot][b][u] (gate, batch row, the
// thread's u-th unit): written (h W_hh^T), or added to what the slot holds (x W_ih^T, where the
// loop projects the input), except a GRU's n gate, whose input part goes to slot 3 of its own:
// r multiplies only h W_hn^T.
enum class Store { kWrite, kAdd, kAddGRUInput };

template <typename T>
struct GateProducts {
  T* data;
  int64_t gate_stride, row_stride;
  Store mode = Store::kWrite;

  void store(int64_t g, int64_t b, int64_t u, T value) const {
    const bool apart = mode == Store::kAddGRUInput && g == 2;
    T& slot = data[(apart ? 3 : g) * gate_stride + b * row_stride + u];
    slot = mode == Store::kWrite || apart ? value : slot + value;
  }
};

// The lane indices of one level of sum_lanes_of_each at span kSpan (each unit's sum spread over
// kSpan lanes): output lane l takes, from the vectors a and b (b's lanes numbered from kLanes),
// lane l mod (kLanes / 2) of the first halves of the units (kSecond: the second halves) of a for
// l < kLanes / 2, of b after.
template <typename T, int kSpan, bool kSecond>
constexpr std::array<int, kVectorBytes / sizeof(T)> fold_indices() {
  constexpr int kLanes = kVectorBytes / sizeof(T);
  std::array<int, kLanes> index{};
  for (int lane = 0; lane < kLanes; ++lane) {
    const int side = lane / (kLanes / 2), within = lane % (kLanes / 2);
    index[lane] = side * kLanes + within / (kSpan / 2) * kSpan + within % (kSpan / 2) + (kSecond ? kSpan / 2 : 0);
  }
  return index;
}

template <typename T, int kSpan, size_t... kLane>
GENFAST_VECTOR_INLINE Vector<T> fold_pair(Vector<T> a, Vector<T> b, std::index_sequence<kLane...>) {
  static constexpr auto kFirst = fold_indices<T, kSpan, false>(), kSecond = fold_indices<T, kSpan, true>();
  return __builtin_shufflevector(a, b, kFirst[kLane]...) + __builtin_shufflevector(a, b, kSecond[kLane]...);
}

// The lanes of each of kLanes vectors summed, v[u]'s sum in lane u of the result: each level
// folds pairs of vectors into one whose units span half as many lanes, kLanes - 1 folds in all,
// where summing each vector on its own takes log2(kLanes) per vector; the same additions in the
// same order as sum_lanes. Overwrites v.
template <typename T, int kSpan = kVectorBytes / sizeof(T)>
Vector<T> sum_lanes_of_each(Vector<T>* v) {
  if constexpr (kSpan == 1) {
    return v[0];
  } else {
    for (int p = 0; p < kSpan / 2; ++p)
      v[p] = fold_pair<T, kSpan>(v[2 * p], v[2 * p + 1], std::make_index_sequence<kVectorBytes / sizeof(T)>());
    return sum_lanes_of_each<T, kSpan / 2>(v);
  }
}

// The G dot products W[g H + j] . x over P terms, as vectors of partial sums (two accumulators
// each: 2G chains of fused multiply-adds in flight) and the scalar sums of the last P mod
// 2 kLanes terms.
template <int G, typename T>
GENFAST_VECTOR_INLINE void unit_accumulators(const T* w, int64_t H, int64_t P, const T* x, int64_t j,
                                             Vector<T> (&partial)[G], T (&rest)[G]) {
  constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  Vector<T> acc[G][2] = {};
  int64_t k = 0;
  for (; k + 2 * kLanes <= P; k += 2 * kLanes) {
    Vector<T> x0, x1;
    std::memcpy(&x0, x + k, sizeof(x0));
    std::memcpy(&x1, x + k + kLanes, sizeof(x1));
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      Vector<T> w0, w1;
      std::memcpy(&w0, w + (g * H + j) * P + k, sizeof(w0));
      std::memcpy(&w1, w + (g * H + j) * P + k + kLanes, sizeof(w1));
      acc[g][0] += w0 * x0;
      acc[g][1] += w1 * x1;
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    partial[g] = acc[g][0] + acc[g][1];
    rest[g] = 0;
    for (int64_t tail = k; tail < P; ++tail) rest[g] += w[(g * H + j) * P + tail] * x[tail];
  }
}

// into(g, b, j - j0) = W[g H + j] . h[b] for the units j in [j0, j1) and the first rows of h,
// from the rows of W (G H, P) as they are: for a few steps, where packing W^T would cost more
// than it saves. A unit's G rows meet each batch row together, from L1 after the first. With one
// row, a vector's worth of units' sums come out of their accumulators together
// (sum_lanes_of_each: the forward over 100 steps at hidden 256 took 777 us against 802 one sum
// at a time for an LSTM, 587 against 607 for a GRU); with more, the units taken that way would
// not keep their rows in L1 (an LSTM cell's two steps at batch 8: 170 us against 130).
template <int G, typename T>
void unit_dots(const T* w, int64_t H, int64_t P, const T* h, int64_t rows, int64_t j0, int64_t j1,
               const GateProducts<T>& into) {
  constexpr int64_t kLanes = kVectorBytes / sizeof(T);
  Vector<T> partial[G];
  T rest[G];
  if (rows > 1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t b = 0; b < rows; ++b) {
        unit_accumulators<G>(w, H, P, h + b * P, j, partial, rest);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) into.store(g, b, j - j0, sum_lanes<T>(partial[g]) + rest[g]);
      }
    return;
  }
  Vector<T> units_partial[G][kLanes];
  T units_rest[G][kLanes];
  for (int64_t first = j0; first < j1; first += kLanes) {
    const int64_t units = std::min(kLanes, j1 - first);
    for (int64_t u = 0; u < kLanes; ++u) {
      if (u < units) unit_accumulators<G>(w, H, P, h, first + u, partial, rest);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g)
        units_partial[g][u] = u < units ? partial[g] : Vector<T>{}, units_rest[g][u] = u < units ? rest[g] : T(0);
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const Vector<T> sums = sum_lanes_of_each<T>(units_partial[g]);
      for (int64_t u = 0; u < units; ++u) into.store(g, 0, first + u - j0, sums[u] + units_rest[g][u]);
    }
  }
}

// ht (P x padded_columns(rows)) = the first rows of h (rows x P), transposed, zero-padded: the
// B operand of tiled_unit_products.
template <typename T>
void transpose_rows(const T* h, int64_t rows, int64_t P, T* ht) {
  const int64_t columns = padded_columns<T>(rows);
  for (int64_t k = 0; k < P; ++k) {
    for (int64_t b = 0; b < rows; ++b) ht[k * columns + b] = h[b * P + k];
    std::fill(ht + k * columns + rows, ht + (k + 1) * columns, T(0));
  }
}

// What unit_dots computes, by register tiles: W's rows, in place, are tile_matmul's A operand
// and h^T (ht, transpose_rows's) its B, so six rows of W meet a strip of batch rows at once;
// yt receives each gate's (units x padded rows). Given a second weight w2 (G H, K2) and x^T
// (x2t), a cell's input projection, its products land as into's mode says, those that add
// summed in the tile before it is stored.
template <typename T>
void tiled_unit_products(const T* w, int64_t H, int64_t P, int64_t G, const T* ht, int64_t rows, int64_t j0,
                         int64_t j1, const GateProducts<T>& into, T* yt, const T* w2 = nullptr, int64_t K2 = 0,
                         const T* x2t = nullptr) {
  const int64_t columns = padded_columns<T>(rows), units = j1 - j0;
  auto store = [&](int64_t slot) {
    T* products = into.data + slot * into.gate_stride;
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t u = 0; u < units; ++u) products[b * into.row_stride + u] = yt[u * columns + b];
  };
  for (int64_t g = 0; g < G; ++g) {
    const T* w2_rows = w2 ? w2 + (g * H + j0) * K2 : nullptr;
    tile_matmul<false>(units, columns, P, w + (g * H + j0) * P, P, 1, ht, columns, yt, columns);
    const bool apart = into.mode == Store::kAddGRUInput && g == 2;
    if (w2 && !apart) tile_matmul<true>(units, columns, K2, w2_rows, K2, 1, x2t, columns, yt, columns);
    store(g);
    if (w2 && apart) {
      tile_matmul<false>(units, columns, K2, w2_rows, K2, 1, x2t, columns, yt, columns);
      store(3);
    }
  }
}

// A sequence this short reads W_hh's rows in place rather than packing W_hh^T (the cells), and
// so does a batch of one: each weight meets one row per step either way, and the packing cost
// more than it saved (a streaming LSTM at hidden 256: 2.00 ms packed, 1.83 ms in place).
constexpr int64_t kPackFromSteps = 4;

// Batches up to this size take the persistent loop: an ATen product per step cost about 40 us
// there (threads woken, and before StepProduct the weights repacked), where the whole step
// takes a few.
constexpr int64_t kPersistentBatch = 64;

// From this batch on, the persistent loop's products come from MKL where it can. In one
// process, the loop over 100 steps with the loop's tiles and with MKL taking turns (ms, LSTM):
// hidden 512, batch 4: 11.8 against 13.7, 16: 23.9 against 24.3, 32: 38.2 against 36.4, 64:
// 65.2 against 60.5; hidden 256, batch 64: 18.3 against 18.5; hidden 384, batch 32: 27.4 against
// 21.4 (its three blocks of 128 units split 1:2 over two threads).
constexpr int64_t kMklFromBatch = 32;

// Whether the persistent loop's products come from MKL: not for a packed batch, whose steps
// shrink to the rows still running, fewer than W is packed for, so that at::mm would repack it
// step after step.
bool products_by_mkl(const Shape& n, at::ScalarType dtype) {
  return n.T >= kPackFromSteps && n.B >= kMklFromBatch && !n.sorted && StepProduct::packs(dtype);
}

// Steps of input the persistent loop projects at a time when it projects the input with MKL: a
// (kProjectedSteps B, G H) block, where projecting all steps at once would fill a fresh
// (T, B, G H) tensor, its page faults alone 12 ms of the fastrnns forward's 120. That forward
// took 92-96 ms with blocks of 2 or 4 steps, 94-99 with 8 and 98-100 with 16 (torch's 96-101).
constexpr int64_t kProjectedSteps = 4;

// From this batch on, in-place products go through tiled_unit_products rather than unit_dots:
// at hidden 256 a step of batch 16 took 98 us against 130 (LSTM) and 88 against 145 (GRU); at
// batch 8, where a strip of 16 batch rows is half padding, unit_dots was faster.
constexpr int64_t kTiledFromBatch = 12;

// Units per share of a short sequence's step, ShareDealer's unit of work.
constexpr int64_t kUnitsPerShare = 32;

// Shares of each step's units for a team of threads. Thread i owns the i-th contiguous range of
// shares and runs them in order, so that it meets the same units' weights step after step (on
// a core with a 2 MB L2, the 1 MB half of an LSTM cell's weights at hidden 256 can stay there;
// cell loops ran 2-5% faster than with shares taken as threads came free); a thread done with
// its own range takes what remains of the others', so that one slowed by other work on the
// machine does not hold up the step.
class ShareDealer {
 public:
  ShareDealer(int64_t shares, int64_t ranges) : shares_(shares), ranges_(ranges), next_(2 * ranges) {
    for (int64_t i = 0; i < 2 * ranges; ++i) next_[i].store(first(i % ranges), std::memory_order_relaxed);
  }

  // Runs body(share) for the shares thread id takes in step s. The team meets at a barrier
  // after each step: it orders thread 0's reset of the counters step s + 1 uses (idle since
  // step s - 1) before their use.
  template <typename Body>
  void deal(int64_t s, int64_t id, Body&& body) {
    std::atomic<int64_t>* next = next_.data() + s % 2 * ranges_;
    for (int64_t k = 0; k < ranges_; ++k) {
      const int64_t range = (id + k) % ranges_, end = first(range + 1);
      for (int64_t share; (share = next[range].fetch_add(1, std::memory_order_relaxed)) < end;) body(share);
    }
    if (id == 0)
      for (int64_t range = 0; range < ranges_; ++range)
        next_[(s + 1) % 2 * ranges_ + range].store(first(range), std::memory_order_relaxed);
  }

 private:
  int64_t first(int64_t range) const { return shares_ * range / ranges_; }

  int64_t shares_, ranges_;
  std::vector<std::atomic<int64_t>> next_;  // per step parity, the next share of each range
};

// W_hh (G H, H) as the panels (G, blocks, H, block) of persistent_forward, units past H zero.
// A direct loop, parallel over panels: packing through ATen (a zero-padded copy, then a
// permuted one) cost a quarter of a streaming LSTM's forward at batch 1.
template <typename T>
void pack_panels(const T* w, int64_t G, int64_t H, int64_t block, T* panels) {
  const int64_t blocks = (H + block - 1) / block;
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / blocks, j0 = i % blocks * block;
      T* panel = panels + i * H * block;
      for (int64_t c = 0; c < block; ++c) {
        if (j0 + c >= H) {
          for (int64_t k = 0; k < H; ++k) panel[k * block + c] = T(0);
          continue;
        }
        const T* row = w + (g * H + j0 + c) * H;
        for (int64_t k = 0; k < H; ++k) panel[k * block + c] = row[k];
      }
    }
  });
}

// The forward of a small batch without projection, in one OpenMP team for the whole sequence.
// Each thread owns a slice of hidden units, and the columns of W_hh^T of their G gates, packed,
// stay in its core's cache from step to step. It computes those gates for every batch row, then
// their gate math a vector of units at a time, and writes the new state into the other of two
// buffers; one barrier per step publishes it. Writes what forward_loop writes, what the backward
// reads only with kSave (r.save).
//
// The products come from MKL where StepProduct packs (float32, from kMklFromBatch rows and
// kPackFromSteps steps), each thread packing its own slice of W_hh (MKL runs on the calling
// thread inside a team); else from the tiles of row_products over panels packed here; a short
// sequence reads W_hh in place. With MKL's products the loop projects an input it is given a
// block of kProjectedSteps at a time, each thread its own units' gates.
template <typename T, bool kSave>
void persistent_forward(const Recurrence& r, const Shape& n, std::vector<at::Tensor>& out) {
  const bool lstm = r.cell == Cell::kLSTM;
  const int64_t H = n.H, B = n.B, G = n.G, block = kColumnBlock<T>;
  // W_hh^T packed as panels (G, blocks, P, block) of whole column blocks, units past H zero:
  // a panel is read front to back, where columns of W_hh^T itself lie a long stride apart.
  const int64_t blocks = (H + block - 1) / block;
  const bool packed = n.T >= kPackFromSteps && B > 1;
  const bool by_mkl = products_by_mkl(n, r.weight_hh.scalar_type());
  const T* w = r.weight_hh.const_data_ptr<T>();
  at::Tensor panels;
  if (packed && !by_mkl) {
    panels = at::empty({G, blocks, H, block}, r.weight_hh.options());
    pack_panels(w, G, H, block, panels.mutable_data_ptr<T>());
  }
  const at::Tensor states[2] = {out[1], at::empty({B, H}, out[1].options())};
  T* buffers[2] = {states[0].mutable_data_ptr<T>(), states[1].mutable_data_ptr<T>()};
  const T* panel_data = packed && !by_mkl ? panels.const_data_ptr<T>() : nullptr;
  // x_proj's rows; where the loop projects the input, the bias, expanded (Recurrence's comment).
  const T* xp_all = r.x_proj.const_data_ptr<T>();
  const int64_t xp_step = r.x_proj.stride(0), xp_row = r.x_proj.stride(1);
  const int64_t I = r.input ? r.input->size(2) : 0;
  const T* input = r.input ? r.input->const_data_ptr<T>() : nullptr;
  const T* w_ih = r.input ? r.weight_ih->const_data_ptr<T>() : nullptr;
  const T* bias = r.bias_hh ? r.bias_hh->const_data_ptr<T>() : nullptr;
  T *output = out[0].mutable_data_ptr<T>(), *gates = out[3].mutable_data_ptr<T>(), *h_prev = out[4].mutable_data_ptr<T>();
  T* c = lstm ? out[2].mutable_data_ptr<T>() : nullptr;
  T* c_prev = lstm ? out[5].mutable_data_ptr<T>() : nullptr;
  T* tanh_c = lstm ? out[6].mutable_data_ptr<T>() : nullptr;
  // Slices of whole column blocks (for MKL's products, of a cache line's worth of units), so
  // that threads write apart. A short sequence instead deals its units out in shares
  // (ShareDealer): there a thread slowed by other work on the machine would otherwise hold up
  // the step (an LSTM cell at hidden 256, batch 16: the other thread had waited 6 to 21 us of
  // 140).
  const bool shared_out = !packed && n.T < kPackFromSteps;
  const int64_t shares = (H + kUnitsPerShare - 1) / kUnitsPerShare;
  const int64_t slice = by_mkl ? 64 / static_cast<int64_t>(sizeof(T)) : block, slices = (H + slice - 1) / slice;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), shared_out ? shares : slices)));
  ShareDealer dealer(shares, threads);
  // The caller's thread-local state (autograd's among it) for ATen's calls in the team, as
  // at::parallel_for passes it on. Those calls may throw (out of memory): the first exception is
  // kept, the team skips the remaining steps' work but still meets at every barrier, and the
  // exception is rethrown after it.
  const at::ThreadLocalState caller_state;
  std::atomic<bool> failed{false};
  std::exception_ptr failure;
  auto guarded = [&](auto&& work) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
      if (!failed.exchange(true)) failure = std::current_exception();
    }
  };
#pragma omp parallel num_threads(threads)
  {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t j0 = std::min(H, slices * id / team * slice), j1 = std::min(H, slices * (id + 1) / team * slice);
    const int64_t width = shared_out ? kUnitsPerShare : (j1 - j0 + slice - 1) / slice * slice;
    // Four slots of products: an LSTM's gates, or a GRU's and its n gate's input part (zero
    // unless the tiles or unit_dots project the input). With MKL's products only the GRU's
    // zero slot is read.
    std::vector<T> products(4 * B * width);
    const GateProducts<T> own{products.data(), B * width, width};
    const GateProducts<T> own_input{products.data(), B * width, width, lstm ? Store::kAdd : Store::kAddGRUInput};
    const bool tiled = !packed && B >= kTiledFromBatch;
    // Where the gate products of row b lie: gate g's for unit j at base + b row + g gate + j - u0.
    struct {
      const T* base;
      int64_t row, gate;
    } gate_products = {products.data(), width, B * width};
    // MKL's products land in (rows, G (j1 - j0)) tensors; a step over fewer rows than B goes
    // through at::mm into mkl_fallback.
    std::optional<StepProduct> mkl_products;
    at::Tensor mkl_fallback, mkl_out;
    // Where the loop projects the input with MKL: this thread's units' part of a block of steps,
    // (k B, G (j1 - j0)) from time projected_from on.
    std::optional<StepProduct> input_products;
    at::Tensor input_fallback, projected;
    int64_t projected_from = 0;
    if (by_mkl && j1 > j0) guarded([&] {
      std::vector<at::Tensor> own_rows, own_input_rows, own_bias;
      const at::Tensor input_bias = r.x_proj.select(0, 0).select(0, 0);
      for (int64_t g = 0; g < G; ++g) {
        own_rows.push_back(r.weight_hh.narrow(0, g * H + j0, j1 - j0));
        if (!input) continue;
        own_input_rows.push_back(r.weight_ih->narrow(0, g * H + j0, j1 - j0));
        own_bias.push_back(input_bias.narrow(0, g * H + j0, j1 - j0));
      }
      mkl_products.emplace(at::cat(own_rows), B, true);
      mkl_fallback = at::empty({B, G * (j1 - j0)}, out[1].options());
      if (!input) return;
      input_products.emplace(at::cat(own_input_rows), kProjectedSteps * B, true, at::cat(own_bias));
      input_fallback = at::empty({kProjectedSteps * B, G * (j1 - j0)}, out[1].options());
    });
    const int64_t columns = padded_columns<T>(B);
    std::vector<T> ht(tiled ? H * columns : 0), xt(tiled && input ? I * columns : 0), yt(tiled ? width * columns : 0);
    // unit_dots for the units [u0, u1) of weight (G H, K) and the first rows of x, G as a
    // template argument.
    auto in_place_products = [&](const T* weight, int64_t K, const T* x, int64_t rows, int64_t u0, int64_t u1,
                                 const GateProducts<T>& into) {
      if (lstm) {
        unit_dots<4>(weight, H, K, x, rows, u0, u1, into);
      } else {
        unit_dots<3>(weight, H, K, x, rows, u0, u1, into);
      }
    };
    // Step t for the units [u0, u1): their gate products, then their gate math.
    auto step_units = [&](int64_t t, int64_t rows, const T* h, T* h_next, int64_t u0, int64_t u1) {
      const T* x = input ? input + t * B * I : nullptr;
      if (by_mkl) {
        gate_products = {mkl_out.const_data_ptr<T>(), G * (j1 - j0), j1 - j0};
      } else if (packed) {
        for (int64_t g = 0; g < G; ++g)
          row_products(h, rows, H, panel_data + (g * blocks + u0 / block) * H * block, width / block,
                       products.data() + g * B * width, width);
      } else if (tiled) {
        tiled_unit_products(w, H, H, G, ht.data(), rows, u0, u1, input ? own_input : own, yt.data(), w_ih, I,
                            xt.data());
      } else {
        in_place_products(w, H, h, rows, u0, u1, own);
        if (x) in_place_products(w_ih, I, x, rows, u0, u1, own_input);
      }
      for (int64_t b = 0; b < B; ++b) {
        // Gate g's input part for unit j at x_g[j].
        const int64_t block_row = (t - projected_from) * B + b;
        const T* x0 = input_products ? projected.const_data_ptr<T>() + block_row * G * (j1 - j0) - u0
                                     : xp_all + t * xp_step + b * xp_row;
        const int64_t x_gate = input_products ? j1 - j0 : H;
        const T *x1 = x0 + x_gate, *x2 = x1 + x_gate, *x3 = lstm ? x2 + x_gate : nullptr;
        T* g4 = gates + (n.slot(t) * B + b) * 4 * H;
        T* out = output + (t * B + b) * H;
        const int64_t row = (n.slot(t) * B + b) * H;
        const T* p0 = gate_products.base + b * gate_products.row - u0;
        const T *p1 = p0 + gate_products.gate, *p2 = p1 + gate_products.gate;
        // An LSTM's o gate, or a GRU's slot 3: its n gate's input part where the tiles or
        // unit_dots project the input, else zero.
        const T* p3 = lstm ? p2 + gate_products.gate : products.data() + 3 * B * width + b * width - u0;
        if constexpr (kSave) std::copy(h + b * H + u0, h + b * H + u1, h_prev + row + u0);
        if (!n.live(b, t)) {
          std::copy(h + b * H + u0, h + b * H + u1, h_next + b * H + u0);
          std::fill(out + u0, out + u1, T(0));
          if constexpr (kSave) {
            for (int64_t g = 0; g < 4; ++g) std::fill(g4 + g * H + u0, g4 + g * H + u1, T(0));
            if (lstm) {
              std::copy(c + b * H + u0, c + b * H + u1, c_prev + row + u0);
              std::fill(tanh_c + row + u0, tanh_c + row + u1, T(0));
            }
          }
          continue;
        }
        if (lstm) {
#pragma omp simd
          for (int64_t j = u0; j < u1; ++j) {
            const T i = sigmoid(x0[j] + p0[j]), f = sigmoid(x1[j] + p1[j]);
            const T gg = tanh_fast(x2[j] + p2[j]), o = sigmoid(x3[j] + p3[j]);
            // Explicit fused multiply-adds: the compiler's own choice differed with kSave, and
            // inference gave other last bits than training.
            const T previous = c[b * H + j], cell = std::fma(f, previous, i * gg), tc = tanh_fast(cell);
            if constexpr (kSave) {
              g4[j] = i, g4[H + j] = f, g4[2 * H + j] = gg, g4[3 * H + j] = o;
              c_prev[row + j] = previous, tanh_c[row + j] = tc;
            }
            c[b * H + j] = cell, h_next[b * H + j] = o * tc, out[j] = o * tc;
          }
        } else {
#pragma omp simd
          for (int64_t j = u0; j < u1; ++j) {
            const T h_n = p2[j] + bias[2 * H + j];
            const T rg = sigmoid(x0[j] + p0[j] + bias[j]), z = sigmoid(x1[j] + p1[j] + bias[H + j]);
            const T ng = tanh_fast(std::fma(rg, h_n, x2[j] + p3[j]));
            const T next = std::fma(z, h[b * H + j] - ng, ng);
            if constexpr (kSave) g4[j] = rg, g4[H + j] = z, g4[2 * H + j] = ng, g4[3 * H + j] = h_n;
            h_next[b * H + j] = next, out[j] = next;
          }
        }
      }
    };
    for (int64_t s = 0; s < n.T; ++s) {
      const int64_t t = n.time(s), rows = n.product_rows(t);
      const T* h = buffers[s % 2];
      T* h_next = buffers[(s + 1) % 2];
      if (tiled) {
        transpose_rows(h, rows, H, ht.data());
        if (input) transpose_rows(input + t * B * I, rows, I, xt.data());
      }
      if (shared_out) {
        dealer.deal(s, id, [&](int64_t share) {
          step_units(t, rows, h, h_next, share * kUnitsPerShare, std::min(H, (share + 1) * kUnitsPerShare));
        });
      } else if (j1 > j0) {
        guarded([&] {
          if (input_products && s % kProjectedSteps == 0) {
            const int64_t k = std::min(kProjectedSteps, n.T - s);
            projected_from = n.reverse ? n.T - s - k : s;
            projected = (*input_products)(r.input->narrow(0, projected_from, k).view({k * B, I}),
                                          input_fallback.narrow(0, 0, k * B));
          }
          if (by_mkl) mkl_out = (*mkl_products)(states[s % 2].narrow(0, 0, rows), mkl_fallback.narrow(0, 0, rows));
          step_units(t, rows, h, h_next, j0, j1);
        });
      }
#pragma omp barrier
    }
  }
  if (failure) std::rethrow_exception(failure);
  if (n.T % 2) out[1] = states[1];  // the last state was written into the spare buffer
}

// Zoneout's backward of one row: kept = m grad and grad = (1 - m) grad, the parts of a state's
// gradient that reach the state before directly and through the step.
template <typename T>
void split_share(const T* m, T* grad, T* kept, int64_t size) {
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) kept[j] = m[j] * grad[j], grad[j] -= kept[j];
}

template <typename T>
void add_row(const T* from, T* to, int64_t size) {
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) to[j] += from[j];
}

// The gradients of an LSTM step's gates for row b's units [u0, u1): dxp (4H) from the gradient
// of the step's output d_out and of its new cell dc, which becomes the gradient of the cell
// entering the step. d_new_cell is the output's path into the new cell where LN_c lies
// between; without it, d_out o tanh'(c).
template <typename T>
void lstm_gate_gradients(const T* g4, const T* c_prev, const T* tanh_c, const T* d_out, const T* d_new_cell, T* dc,
                         T* dxp, int64_t H, int64_t u0, int64_t u1) {
#pragma omp simd
  for (int64_t j = u0; j < u1; ++j) {
    const T i = g4[j], f = g4[H + j], g = g4[2 * H + j], o = g4[3 * H + j], tc = tanh_c[j];
    const T d_c = dc[j] + (d_new_cell ? d_new_cell[j] : d_out[j] * o * (T(1) - tc * tc));
    dxp[j] = d_c * g * i * (T(1) - i);
    dxp[H + j] = d_c * c_prev[j] * f * (T(1) - f);
    dxp[2 * H + j] = d_c * i * (T(1) - g * g);
    dxp[3 * H + j] = d_out[j] * tc * o * (T(1) - o);
    dc[j] = d_c * f;
  }
}

// A GRU step's: dxp (3H) for x_proj and dhg (3H) for h W_hh^T + b_hh (r multiplies only the
// latter's n part), from the gradient d of the step's output.
template <typename T>
void gru_gate_gradients(const T* g4, const T* h_prev, const T* d, T* dxp, T* dhg, int64_t H, int64_t u0, int64_t u1) {
#pragma omp simd
  for (int64_t j = u0; j < u1; ++j) {
    const T rg = g4[j], z = g4[H + j], ng = g4[2 * H + j], h_n = g4[3 * H + j];
    const T d_n = d[j] * (T(1) - z) * (T(1) - ng * ng), d_r = d_n * h_n * rg * (T(1) - rg);
    const T d_z = d[j] * (h_prev[j] - ng) * z * (T(1) - z);
    dxp[j] = d_r, dxp[H + j] = d_z, dxp[2 * H + j] = d_n;
    dhg[j] = d_r, dhg[H + j] = d_z, dhg[2 * H + j] = d_n * rg;
  }
}

template <typename T>
void backward_loop(const Recurrence& r, const Shape& n, const at::Tensor& d_output, const std::vector<at::Tensor>& saved,
                   const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& d_x_proj, const at::Tensor& d_h_gates,
                   const at::Tensor& dh_steps, const at::Tensor& d_squashed_steps) {
  const bool lstm = r.cell == Cell::kLSTM, projected = r.weight_hr.has_value();
  const int64_t H = n.H, P = n.P, B = n.B, G = n.G;
  at::Tensor dh_next = at::empty({B, P}, dh.options());
  at::Tensor d_cell_out = projected ? at::empty({B, H}, dh.options()) : at::Tensor();
  T *dh_data = dh.mutable_data_ptr<T>(), *dc_data = lstm ? dc.mutable_data_ptr<T>() : nullptr;
  const T* gates = saved[0].const_data_ptr<T>();
  const T* h_prev = saved[1].const_data_ptr<T>();
  const T* c_prev = lstm ? saved[2].const_data_ptr<T>() : nullptr;
  const T* tanh_c = lstm ? saved[3].const_data_ptr<T>() : nullptr;
  const T* zoneout_h = r.zoneout_h ? r.zoneout_h->const_data_ptr<T>() : nullptr;
  const T* zoneout_c = r.zoneout_c ? r.zoneout_c->const_data_ptr<T>() : nullptr;
  const T* norm_hh = r.norm_hh ? r.norm_hh->const_data_ptr<T>() : nullptr;
  const T* norm_c = r.norm_c ? r.norm_c->const_data_ptr<T>() : nullptr;
  const T* hh_norm = norm_hh ? saved[4].const_data_ptr<T>() : nullptr;
  const T* c_norm = norm_c ? saved[5].const_data_ptr<T>() : nullptr;
  const T* rstd = norm_hh || norm_c ? saved[6].const_data_ptr<T>() : nullptr;
  // With LN_c, the gradient of tanh's argument in h = o tanh(.) is kept for every step (for the
  // norm's weight and bias), then taken through the norm into the new cell.
  at::Tensor d_cell_from_norm = norm_c ? at::empty({B, H}, dh.options()) : at::Tensor();
  // Zoneout's direct paths to the states entering the step: m dh and m dc.
  at::Tensor dh_kept = zoneout_h ? at::empty({B, P}, dh.options()) : at::Tensor();
  at::Tensor dc_kept = zoneout_c ? at::empty({B, H}, dh.options()) : at::Tensor();
  const StepProduct through_hh(r.weight_hh.t(), B, n.T >= 2 && B >= 32);
  for (int64_t s = n.T - 1; s >= 0; --s) {
    const int64_t t = n.time(s);
    const T* dy = d_output.const_data_ptr<T>() + t * B * P;
    for (int64_t b = 0; b < B; ++b)
      if (n.live(b, t))
        for (int64_t j = 0; j < P; ++j) dh_data[b * P + j] += dy[b * P + j];
    for (int64_t b = 0; b < B; ++b) {
      if (!n.live(b, t)) continue;
      if (zoneout_h) split_share(zoneout_h + (t * B + b) * P, dh_data + b * P, dh_kept.mutable_data_ptr<T>() + b * P, P);
      if (zoneout_c) split_share(zoneout_c + (t * B + b) * H, dc_data + b * H, dc_kept.mutable_data_ptr<T>() + b * H, H);
    }
    if (projected) {  // the gradient of o tanh c, and dh kept for weight_hr's
      T* kept = dh_steps.mutable_data_ptr<T>() + t * B * P;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < P; ++j) kept[b * P + j] = n.live(b, t) ? dh_data[b * P + j] : T(0);
      at::mm_out(d_cell_out, dh, *r.weight_hr);
    }
    const T* d_cell = projected ? d_cell_out.const_data_ptr<T>() : dh_data;
    T* dxp_t = d_x_proj.mutable_data_ptr<T>() + t * B * G * H;
    T* dhg_t = d_h_gates.mutable_data_ptr<T>() + t * B * G * H;
    for_each_row(B, G * H, [&](int64_t b) {
      T *dxp = dxp_t + b * G * H, *dhg = dhg_t + b * G * H;
      if (!n.live(b, t)) {
        std::fill(dxp, dxp + G * H, T(0));
        if (dhg != dxp) std::fill(dhg, dhg + G * H, T(0));
        return;
      }
      const T* g4 = gates + (t * B + b) * 4 * H;
      const int64_t row = t * B * H + b * H;
      if (lstm) {
        const T* d_new_cell = nullptr;
        if (norm_c) {
          T* d_tanh_arg = d_squashed_steps.mutable_data_ptr<T>() + row;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const T tc = tanh_c[row + j];
            d_tanh_arg[j] = d_cell[b * H + j] * g4[3 * H + j] * (T(1) - tc * tc);
          }
          T* through = d_cell_from_norm.mutable_data_ptr<T>() + b * H;
          normalize_row_backward(d_tanh_arg, c_norm + row, norm_c, rstd[2 * (t * B + b) + 1], through, H);
          d_new_cell = through;
        }
        lstm_gate_gradients(g4, c_prev + row, tanh_c + row, d_cell + b * H, d_new_cell, dc_data + b * H, dxp, H, 0, H);
        if (norm_hh)
          normalize_row_backward(dxp, hh_norm + (t * B + b) * 4 * H, norm_hh, rstd[2 * (t * B + b)], dhg, 4 * H);
      } else {
        gru_gate_gradients(g4, h_prev + row, dh_data + b * H, dxp, dhg, H, 0, H);
      }
    });
    // The state's gradient through h W_hh^T, plus a GRU's direct z h term; rows that did not
    // step pass theirs on unchanged.
    const int64_t rows = n.product_rows(t);
    const at::Tensor dh_through = through_hh(d_h_gates[t].narrow(0, 0, rows), dh_next.narrow(0, 0, rows));
    const T* through = dh_through.const_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      if (!n.live(b, t)) continue;
      const T* g4 = gates + (t * B + b) * 4 * H;
      for (int64_t j = 0; j < P; ++j)
        dh_data[b * P + j] = through[b * P + j] + (lstm ? T(0) : dh_data[b * P + j] * g4[H + j]);
      if (zoneout_h) add_row(dh_kept.const_data_ptr<T>() + b * P, dh_data + b * P, P);
      if (zoneout_c) add_row(dc_kept.const_data_ptr<T>() + b * H, dc_data + b * H, H);
    }
  }
}

// Whether persistent_backward runs a plain cell's backward: over kPackFromSteps steps or more
// (it packs W_hh once per call), for a few rows, or for a W_hh within one core's L2 (2 MB on
// the Xeon). Otherwise each thread's slice of W_hh comes from L3 at every step, once per four or
// six rows of the tiles, where MKL's product reads it once. Against the loop of an ATen product
// per step (one layer, 100 steps, ms): LSTM hidden 256, batch 1 2.2 against 2.6, 8 8.9 against
// 10.1, 16 16.5 against 18.0; hidden 512, batch 4 (128 steps) 25 against 29, 8 35.5 against
// 34.0, 16 65 against 62; GRU hidden 512, batch 4 17.3 against 21.7, 12 38.9 against 36.5.
constexpr int64_t kFewRows = 4;
constexpr int64_t kCachedWeightBytes = int64_t{2} << 20;

bool backward_in_one_team(const Shape& n, const at::Tensor& weight_hh) {
  return n.T >= kPackFromSteps &&
         (n.B <= kFewRows || (n.B < kMklFromBatch && weight_hh.nbytes() <= kCachedWeightBytes));
}

// The backward of a plain LSTM or GRU (no projection, zoneout or norms) where
// backward_in_one_team says, in one OpenMP team for the whole sequence, as persistent_forward
// runs the forward. Each thread owns a slice of units, whole blocks of kColumnBlock, and packs
// those columns of W_hh as contiguous panels. In a step it computes their gates' gradients for
// every row and, after the step's one barrier, their part of the state's gradient: d_h_gates
// times its panels, which stay in its core's cache from step to step. The loop of an ATen product
// per step instead woke MKL's threads each step and read all of W_hh (4 MB for an LSTM at hidden
// 512) through both cores. Two layers of an LSTM at hidden 512, batch 4, 128 steps: 50 ms, the
// loop of ATen's products 58, torch's 59-68; with W_hh read in place (rows 2 KB apart), not
// packed, and two rows at a time, not four, 86 ms.
template <typename T>
void persistent_backward(const Recurrence& r, const Shape& n, const at::Tensor& d_output,
                         const std::vector<at::Tensor>& saved, const at::Tensor& dh, const at::Tensor& dc,
                         const at::Tensor& d_x_proj, const at::Tensor& d_h_gates) {
  const bool lstm = r.cell == Cell::kLSTM;
  const int64_t H = n.H, B = n.B, G = n.G, block = kColumnBlock<T>;
  const int64_t blocks = (H + block - 1) / block;
  const T* w = r.weight_hh.const_data_ptr<T>();
  T *dh_data = dh.mutable_data_ptr<T>(), *dc_data = lstm ? dc.mutable_data_ptr<T>() : nullptr;
  const T* gates = saved[0].const_data_ptr<T>();
  const T* h_prev = saved[1].const_data_ptr<T>();
  const T* c_prev = lstm ? saved[2].const_data_ptr<T>() : nullptr;
  const T* tanh_c = lstm ? saved[3].const_data_ptr<T>() : nullptr;
  const T* d_out_all = d_output.const_data_ptr<T>();
  T* dxp_all = d_x_proj.mutable_data_ptr<T>();
  T* dhg_all = d_h_gates.mutable_data_ptr<T>();
  // W_hh's blocks of columns as contiguous (G H, block) panels, zero-padded past H, each packed
  // by the thread that reads it; and the products of a step, (B, blocks block). Allocated here:
  // an exception must not leave the team.
  const int64_t ld = blocks * block;
  const at::Tensor panel_storage = at::empty({ld * G * H}, r.weight_hh.options());
  const at::Tensor product_storage = at::empty({B * ld}, r.weight_hh.options());
  T *panels = panel_storage.mutable_data_ptr<T>(), *through = product_storage.mutable_data_ptr<T>();
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
#pragma omp parallel num_threads(threads)
  {
    const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t first = blocks * id / team, last = blocks * (id + 1) / team;
    const int64_t j0 = std::min(H, first * block), j1 = std::min(H, last * block);
    for (int64_t i = first; i < last; ++i) {
      const int64_t columns = std::min(block, H - i * block);
      T* panel = panels + i * G * H * block;
      for (int64_t m = 0; m < G * H; ++m) {
        std::copy(w + m * H + i * block, w + m * H + i * block + columns, panel + m * block);
        std::fill(panel + m * block + columns, panel + (m + 1) * block, T(0));
      }
    }
    for (int64_t s = n.T - 1; s >= 0; --s) {
      const int64_t t = n.time(s);
      T* dxp_t = dxp_all + t * B * G * H;
      T* dhg_t = dhg_all + t * B * G * H;
      for (int64_t b = 0; b < B; ++b) {
        T *dxp = dxp_t + b * G * H, *dhg = dhg_t + b * G * H;
        if (!n.live(b, t)) {
          for (int64_t g = 0; g < G; ++g) {
            std::fill(dxp + g * H + j0, dxp + g * H + j1, T(0));
            std::fill(dhg + g * H + j0, dhg + g * H + j1, T(0));
          }
          continue;
        }
        T* d = dh_data + b * H;
        const T* dy = d_out_all + (t * B + b) * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) d[j] += dy[j];
        const T* g4 = gates + (t * B + b) * 4 * H;
        const int64_t row = (t * B + b) * H;
        if (lstm) {
          lstm_gate_gradients(g4, c_prev + row, tanh_c + row, d, static_cast<const T*>(nullptr), dc_data + b * H, dxp,
                              H, j0, j1);
        } else {
          gru_gate_gradients(g4, h_prev + row, d, dxp, dhg, H, j0, j1);
        }
      }
#pragma omp barrier
      // The state's gradient through h W_hh^T for this thread's units, plus a GRU's direct z h
      // term; rows that did not step pass theirs on unchanged.
      const int64_t rows = n.product_rows(t);
      for (int64_t i = first; i < last; ++i)
        block_product(dhg_t, rows, G * H, G * H, panels + i * G * H * block, block, through + i * block, ld);
      for (int64_t b = 0; b < B; ++b) {
        if (!n.live(b, t)) continue;
        T* d = dh_data + b * H;
        const T* products = through + b * ld;
        const T* z = gates + (t * B + b) * 4 * H + H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) d[j] = products[j] + (lstm ? T(0) : d[j] * z[j]);
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> recurrence_forward(const Recurrence& r) {
  const Shape n(r);
  const bool persistent =
      n.B <= kPersistentBatch && !r.weight_hr && !r.zoneout_h && !r.zoneout_c && !r.norm_hh && !r.norm_c;
  if (r.input && !(persistent && (n.T < kPackFromSteps || products_by_mkl(n, r.x_proj.scalar_type())))) {
    // One product over every step pays, unless the persistent loop projects with MKL's blocks:
    // the projection comes first, as the Python op's does.
    Recurrence projected = r;
    const at::Tensor bias = r.x_proj.select(0, 0).select(0, 0);
    projected.x_proj = at::addmm(bias, r.input->view({n.T * n.B, -1}), r.weight_ih->t()).view(r.x_proj.sizes());
    projected.input.reset();
    return recurrence_forward(projected);
  }
  const auto options = r.x_proj.options();
  const bool lstm = r.cell == Cell::kLSTM;
  std::vector<at::Tensor> out = {
      at::empty({n.T, n.B, n.P}, options),
      r.h0.clone(),
      lstm ? r.c0->clone() : at::Tensor(),
      at::empty({n.saved_steps(), n.B, 4 * n.H}, options),
      at::empty({n.saved_steps(), n.B, n.P}, options),
      lstm ? at::empty({n.saved_steps(), n.B, n.H}, options) : at::Tensor(),
      lstm ? at::empty({n.saved_steps(), n.B, n.H}, options) : at::Tensor(),
      // Zeros: a finished row's entries stay 0 and add nothing to the norms' gradients.
      r.norm_hh ? at::zeros({n.saved_steps(), n.B, 4 * n.H}, options) : at::Tensor(),
      r.norm_c ? at::zeros({n.saved_steps(), n.B, n.H}, options) : at::Tensor(),
      r.norm_hh || r.norm_c ? at::zeros({n.saved_steps(), n.B, 2}, options) : at::Tensor(),
  };
  if (r.x_proj.scalar_type() == at::kDouble) {
    if (!persistent) forward_loop<double>(r, n, out);
    else if (r.save) persistent_forward<double, true>(r, n, out);
    else persistent_forward<double, false>(r, n, out);
  } else {
    if (!persistent) forward_loop<float>(r, n, out);
    else if (r.save) persistent_forward<float, true>(r, n, out);
    else persistent_forward<float, false>(r, n, out);
  }
  return out;
}

std::vector<at::Tensor> recurrence_backward(const Recurrence& r, const at::Tensor& d_output,
                                            const std::optional<at::Tensor>& d_h_n,
                                            const std::optional<at::Tensor>& d_c_n,
                                            const std::vector<at::Tensor>& saved) {
  const Shape n(r);
  const auto options = r.x_proj.options();
  const bool lstm = r.cell == Cell::kLSTM, projected = r.weight_hr.has_value();
  at::Tensor dh = d_h_n ? d_h_n->clone() : at::zeros({n.B, n.P}, options);
  at::Tensor dc = !lstm ? at::Tensor() : d_c_n ? d_c_n->clone() : at::zeros({n.B, n.H}, options);
  at::Tensor d_x_proj = at::empty(r.x_proj.sizes(), options);
  // An LSTM's gates take the same gradient from x_proj and from h W_hh^T, unless LN_hh lies
  // between; a GRU's n gate does not.
  at::Tensor d_h_gates = lstm && !r.norm_hh ? d_x_proj : at::empty(r.x_proj.sizes(), options);
  at::Tensor dh_steps = projected ? at::empty({n.T, n.B, n.P}, options) : at::Tensor();
  // Zeros: a finished row's entries stay 0.
  at::Tensor d_squashed_steps = r.norm_c ? at::zeros({n.T, n.B, n.H}, options) : at::Tensor();
  const bool persistent = backward_in_one_team(n, r.weight_hh) && !projected && !r.zoneout_h && !r.zoneout_c &&
                          !r.norm_hh && !r.norm_c;
  if (r.x_proj.scalar_type() == at::kDouble) {
    if (persistent) persistent_backward<double>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates);
    else backward_loop<double>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates, dh_steps, d_squashed_steps);
  } else {
    if (persistent) persistent_backward<float>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates);
    else backward_loop<float>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates, dh_steps, d_squashed_steps);
  }
  const at::Tensor gates_2d = d_h_gates.view({n.T * n.B, -1});
  at::Tensor d_weight_hh = at::mm(gates_2d.t(), saved[1].view({n.T * n.B, n.P}));
  at::Tensor d_bias_hh = r.bias_hh ? gates_2d.sum(0) : at::Tensor();
  at::Tensor d_weight_hr;
  if (projected) {
    const at::Tensor cell_out = saved[0].narrow(2, 3 * n.H, n.H).mul(saved[3]);  // o tanh c
    d_weight_hr = at::mm(dh_steps.view({n.T * n.B, n.P}).t(), cell_out.view({n.T * n.B, n.H}));
  }
  // A norm's weight takes sum dy * normalized, its bias sum dy, over every step and row.
  auto norm_grad = [&](const at::Tensor& dy, const at::Tensor& normalized) {
    return at::stack({dy.mul(normalized).sum(at::IntArrayRef{0, 1}), dy.sum(at::IntArrayRef{0, 1})});
  };
  at::Tensor d_norm_hh = r.norm_hh ? norm_grad(d_x_proj, saved[4]) : at::Tensor();
  at::Tensor d_norm_c = r.norm_c ? norm_grad(d_squashed_steps, saved[5]) : at::Tensor();
  return {d_x_proj, d_weight_hh, d_bias_hh, dh, dc, d_weight_hr, d_norm_hh, d_norm_c};
}

}  // namespace genfast::cpu
