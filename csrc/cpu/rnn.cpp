// LSTM and GRU time loops on the CPU. Each step is one matrix product, h W_hh^T (ATen's, on
// MKL or oneDNN threads), and one pass of fused gate math over (B, H), parallel over the
// batch's rows. The backward runs the steps in reverse with one product each (the gradient
// of the state) and leaves the weights' gradients to products over all steps at the end.

#include "rnn.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

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
  bool reverse;

  explicit Shape(const Recurrence& r)
      : T(r.x_proj.size(0)),
        B(r.x_proj.size(1)),
        H(r.cell == Cell::kLSTM ? r.x_proj.size(2) / 4 : r.x_proj.size(2) / 3),
        P(r.h0.size(1)),
        G(r.cell == Cell::kLSTM ? 4 : 3),
        lengths(r.lengths ? r.lengths->const_data_ptr<int64_t>() : nullptr),
        reverse(r.reverse) {}

  bool live(int64_t b, int64_t t) const { return !lengths || t < lengths[b]; }
  // The time index of the s-th step the forward takes.
  int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
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
  for (int64_t s = 0; s < n.T; ++s) {
    const int64_t t = n.time(s);
    h_prev[t].copy_(h);
    at::mm_out(h_gates, h, r.weight_hh.t());
    const T* xp_t = r.x_proj.const_data_ptr<T>() + t * B * n.G * H;
    const T* hg = h_gates.const_data_ptr<T>();
    T* gates_t = gates.mutable_data_ptr<T>() + t * B * 4 * H;
    T* out_t = output.mutable_data_ptr<T>() + t * B * P;
    T* cell_t = projected ? cell_out.mutable_data_ptr<T>() : out_t;
    for_each_row(B, n.G * H, [&](int64_t b) {
      const T *xp = xp_t + b * n.G * H, *hp = hg + b * n.G * H;
      T* g4 = gates_t + b * 4 * H;
      const int64_t row = t * B * H + b * H;
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
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T i = sigmoid(xp[j] + hp[j]), f = sigmoid(xp[H + j] + hp[H + j]);
          const T g = tanh_fast(xp[2 * H + j] + hp[2 * H + j]), o = sigmoid(xp[3 * H + j] + hp[3 * H + j]);
          const T previous = c_data[b * H + j], cell = f * previous + i * g, tc = tanh_fast(cell);
          g4[j] = i, g4[H + j] = f, g4[2 * H + j] = g, g4[3 * H + j] = o;
          c_prev[row + j] = previous, tanh_c[row + j] = tc, c_data[b * H + j] = cell;
          cell_t[b * H + j] = o * tc;
          if (!projected) h_data[b * H + j] = o * tc;
        }
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
    });
    if (projected) {  // h = (o tanh c) W_hr^T for the rows that stepped
      at::mm_out(projection, cell_out, r.weight_hr->t());
      const T* projected_h = projection.const_data_ptr<T>();
      for (int64_t b = 0; b < B; ++b) {
        if (!n.live(b, t)) continue;
        std::copy(projected_h + b * P, projected_h + (b + 1) * P, h_data + b * P);
        std::copy(projected_h + b * P, projected_h + (b + 1) * P, out_t + b * P);
      }
    }
  }
}

template <typename T>
void backward_loop(const Recurrence& r, const Shape& n, const at::Tensor& d_output, const std::vector<at::Tensor>& saved,
                   const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& d_x_proj, const at::Tensor& d_h_gates,
                   const at::Tensor& dh_steps) {
  const bool lstm = r.cell == Cell::kLSTM, projected = r.weight_hr.has_value();
  const int64_t H = n.H, P = n.P, B = n.B, G = n.G;
  at::Tensor dh_next = at::empty({B, P}, dh.options());
  at::Tensor d_cell_out = projected ? at::empty({B, H}, dh.options()) : at::Tensor();
  T *dh_data = dh.mutable_data_ptr<T>(), *dc_data = lstm ? dc.mutable_data_ptr<T>() : nullptr;
  const T* gates = saved[0].const_data_ptr<T>();
  const T* h_prev = saved[1].const_data_ptr<T>();
  const T* c_prev = lstm ? saved[2].const_data_ptr<T>() : nullptr;
  const T* tanh_c = lstm ? saved[3].const_data_ptr<T>() : nullptr;
  for (int64_t s = n.T - 1; s >= 0; --s) {
    const int64_t t = n.time(s);
    const T* dy = d_output.const_data_ptr<T>() + t * B * P;
    for (int64_t b = 0; b < B; ++b)
      if (n.live(b, t))
        for (int64_t j = 0; j < P; ++j) dh_data[b * P + j] += dy[b * P + j];
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
        if (!lstm) std::fill(dhg, dhg + G * H, T(0));
        return;
      }
      const T* g4 = gates + (t * B + b) * 4 * H;
      const int64_t row = t * B * H + b * H;
      if (lstm) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T i = g4[j], f = g4[H + j], g = g4[2 * H + j], o = g4[3 * H + j], tc = tanh_c[row + j];
          const T d_out = d_cell[b * H + j], d_c = dc_data[b * H + j] + d_out * o * (T(1) - tc * tc);
          dxp[j] = d_c * g * i * (T(1) - i);
          dxp[H + j] = d_c * c_prev[row + j] * f * (T(1) - f);
          dxp[2 * H + j] = d_c * i * (T(1) - g * g);
          dxp[3 * H + j] = d_out * tc * o * (T(1) - o);
          dc_data[b * H + j] = d_c * f;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T rg = g4[j], z = g4[H + j], ng = g4[2 * H + j], h_n = g4[3 * H + j], d = dh_data[b * H + j];
          const T d_n = d * (T(1) - z) * (T(1) - ng * ng), d_r = d_n * h_n * rg * (T(1) - rg);
          const T d_z = d * (h_prev[row + j] - ng) * z * (T(1) - z);
          dxp[j] = d_r, dxp[H + j] = d_z, dxp[2 * H + j] = d_n;
          dhg[j] = d_r, dhg[H + j] = d_z, dhg[2 * H + j] = d_n * rg;
        }
      }
    });
    // The state's gradient through h W_hh^T, plus a GRU's direct z h term; rows that did not
    // step pass theirs on unchanged.
    at::mm_out(dh_next, d_h_gates[t], r.weight_hh);
    const T* through = dh_next.const_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      if (!n.live(b, t)) continue;
      const T* g4 = gates + (t * B + b) * 4 * H;
      for (int64_t j = 0; j < P; ++j)
        dh_data[b * P + j] = through[b * P + j] + (lstm ? T(0) : dh_data[b * P + j] * g4[H + j]);
    }
  }
}

}  // namespace

std::vector<at::Tensor> recurrence_forward(const Recurrence& r) {
  const Shape n(r);
  const auto options = r.x_proj.options();
  const bool lstm = r.cell == Cell::kLSTM;
  std::vector<at::Tensor> out = {
      at::empty({n.T, n.B, n.P}, options),
      r.h0.clone(),
      lstm ? r.c0->clone() : at::Tensor(),
      at::empty({n.T, n.B, 4 * n.H}, options),
      at::empty({n.T, n.B, n.P}, options),
      lstm ? at::empty({n.T, n.B, n.H}, options) : at::Tensor(),
      lstm ? at::empty({n.T, n.B, n.H}, options) : at::Tensor(),
  };
  if (r.x_proj.scalar_type() == at::kDouble) {
    forward_loop<double>(r, n, out);
  } else {
    forward_loop<float>(r, n, out);
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
  // An LSTM's gates take the same gradient from x_proj and from h W_hh^T; a GRU's n gate does not.
  at::Tensor d_h_gates = lstm ? d_x_proj : at::empty(r.x_proj.sizes(), options);
  at::Tensor dh_steps = projected ? at::empty({n.T, n.B, n.P}, options) : at::Tensor();
  if (r.x_proj.scalar_type() == at::kDouble) {
    backward_loop<double>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates, dh_steps);
  } else {
    backward_loop<float>(r, n, d_output, saved, dh, dc, d_x_proj, d_h_gates, dh_steps);
  }
  const at::Tensor gates_2d = d_h_gates.view({n.T * n.B, -1});
  at::Tensor d_weight_hh = at::mm(gates_2d.t(), saved[1].view({n.T * n.B, n.P}));
  at::Tensor d_bias_hh = r.bias_hh ? gates_2d.sum(0) : at::Tensor();
  at::Tensor d_weight_hr;
  if (projected) {
    const at::Tensor cell_out = saved[0].narrow(2, 3 * n.H, n.H).mul(saved[3]);  // o tanh c
    d_weight_hr = at::mm(dh_steps.view({n.T * n.B, n.P}).t(), cell_out.view({n.T * n.B, n.H}));
  }
  return {d_x_proj, d_weight_hh, d_bias_hh, dh, dc, d_weight_hr};
}

}  // namespace genfast::cpu
