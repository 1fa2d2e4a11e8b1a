// Bias + activation (+ gain, + clamp) on the CPU, StyleGAN2's bias_act: the forward
// y = clamp(gain act(x + b)) in one pass over x; the backward g = dy gain act'(x + b) [mask] in
// one pass over dy and x that also sums g per channel into the bias's gradient; and the same pass
// with act'' for the second-order gradients a GAN's R1 penalty takes. Nothing is saved between
// them but x: the backward recomputes x + b.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <type_traits>
#include <vector>

#include "activation.h"
#include "bias_act.h"
#include "dispatch.h"
#include "elementwise.h"
#include "memory.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

// x's memory as a (rows, width) array and where each element's bias comes from: with the
// channels innermost (inner == 1) a row is one position's channels, bias[column]; otherwise a
// row is one channel's run of `inner` elements, bias[row % channels].
struct Layout {
  int64_t rows, width, channels;
  bool per_column;
};

Layout layout_of(const Tensor& x, const std::optional<Tensor>& bias, int64_t inner) {
  const int64_t n = x.numel();
  if (!bias) return {1, n, 1, false};
  const int64_t channels = bias->numel();
  if (inner == 1) return {n / channels, channels, channels, true};
  return {n / inner, inner, channels, false};
}

// kOrder 0: clamp(gain act(z)); 1 and 2: dy gain act' or act'' (z), zero where the clamp held y.
template <int kOrder, bool kClamp, typename Act, typename T>
GENFAST_VECTOR_INLINE T bias_act_element(const Act& act, T z, T dy, T gain, T clamp) {
  if constexpr (kOrder == 0) {
    const T y = act.forward(z) * gain;
    if constexpr (kClamp) return y < -clamp ? -clamp : (y > clamp ? clamp : y);
    return y;
  } else {
    if constexpr (kClamp) {
      const T y = act.forward(z) * gain;
      dy = y >= -clamp && y <= clamp ? dy : T(0);
    }
    if constexpr (kOrder == 1) return act.backward(z, dy * gain);
    return act.second(z, dy * gain);
  }
}

// out = element(x + bias, dy) over x's memory (dy null for kOrder 0). With `sums` (threads x
// channels, zeroed), each thread adds the elements it writes to its row of per-channel sums:
// summed unrounded, in acc_t.
template <int kOrder, bool kClamp, typename scalar_t, typename Act>
void bias_act_pass(const Act& act, const Layout& layout, const scalar_t* x, const scalar_t* bias, const scalar_t* dy,
                   scalar_t* out, math_t<scalar_t>* sums, double gain_value, double clamp_value) {
  using acc_t = math_t<scalar_t>;
  const acc_t gain = static_cast<acc_t>(gain_value), clamp = static_cast<acc_t>(clamp_value);
  const int64_t width = layout.width, channels = layout.channels;
  for_each_tile(layout.rows, width, [&](int64_t row, int64_t first, int64_t end) {
    const int64_t offset = row * width;
    const scalar_t* xr = x + offset;
    const scalar_t* dyr = dy + (dy ? offset : 0);
    scalar_t* outr = out + offset;
    acc_t* thread_sums = sums ? sums + at::get_thread_num() * channels : nullptr;
    // A copy the loops own: behind a reference, a store to out might change leaky_relu's slope,
    // and GCC kept the loops scalar (12x slower).
    const Act local_act = act;
    auto element = [&](int64_t i, acc_t b) {
      acc_t g = 0;
      if constexpr (kOrder > 0) g = static_cast<acc_t>(dyr[i]);
      const acc_t value = bias_act_element<kOrder, kClamp>(local_act, static_cast<acc_t>(xr[i]) + b, g, gain, clamp);
      outr[i] = static_cast<scalar_t>(value);
      return value;
    };
    if (layout.per_column) {
      // float and double sum the row just written, from L1, in a loop of its own: in the loop
      // that writes it, the backward at 128 x 1024 took 25 us against 17 (1024 x 1024: 257
      // against 230). Half types must sum the values before rounding.
      if (thread_sums && !std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
        for (int64_t i = first; i < end; ++i) thread_sums[i] += element(i, static_cast<acc_t>(bias[i]));
        return;
      }
#pragma omp simd
      for (int64_t i = first; i < end; ++i) element(i, static_cast<acc_t>(bias[i]));
      if (thread_sums) {
#pragma omp simd
        for (int64_t i = first; i < end; ++i) thread_sums[i] += static_cast<acc_t>(outr[i]);
      }
      return;
    }
    const acc_t b = bias ? static_cast<acc_t>(bias[row % channels]) : acc_t(0);
    if (thread_sums) {
      thread_sums[row % channels] += lane_sum<acc_t>(end - first, [&](int64_t i) { return element(first + i, b); });
    } else {
#pragma omp simd
      for (int64_t i = first; i < end; ++i) element(i, b);
    }
  });
}

// Calls body(act) with the activation named `name`, as an instance (leaky_relu holds its slope)
// computing in acc_t.
template <typename acc_t, typename Body>
void dispatch_bias_activation(const std::string& name, double alpha, Body&& body) {
  if (name == "linear") return body(Identity{});
  if (name == "relu") return body(ReLU{});
  if (name == "leaky_relu") return body(LeakyReLU<acc_t>{static_cast<acc_t>(alpha)});
  if (name == "gelu") return body(GELU{});
  if (name == "silu") return body(SiLU{});
  if (name == "tanh") return body(Tanh{});
  if (name == "sigmoid") return body(Sigmoid{});
  TORCH_CHECK(false, "bias_act: activation must be one of linear, relu, leaky_relu, gelu, silu, tanh, sigmoid; got '",
              name, "'");
}

// Runs bias_act_pass with the order, the clamp and the activation of the call as template arguments.
template <typename scalar_t>
void run_pass(int64_t order, const BiasActParams& params, const Layout& layout, const scalar_t* x,
              const scalar_t* bias, const scalar_t* dy, scalar_t* out, math_t<scalar_t>* sums) {
  const double clamp = params.clamp.value_or(0.0);
  dispatch_bias_activation<math_t<scalar_t>>(params.activation, params.alpha, [&](auto act) {
    auto with_clamp = [&]<bool kClamp>() {
      switch (order) {
        case 0: return bias_act_pass<0, kClamp>(act, layout, x, bias, dy, out, sums, params.gain, clamp);
        case 1: return bias_act_pass<1, kClamp>(act, layout, x, bias, dy, out, sums, params.gain, clamp);
        case 2: return bias_act_pass<2, kClamp>(act, layout, x, bias, dy, out, sums, params.gain, clamp);
      }
      TORCH_CHECK(false, "bias_act: order must be 0, 1 or 2, got ", order);
    };
    params.clamp ? with_clamp.template operator()<true>() : with_clamp.template operator()<false>();
  });
}

}  // namespace

Tensor bias_act_forward(const Tensor& x, const std::optional<Tensor>& bias, const BiasActParams& params) {
  Tensor y = empty_output_like(x);
  const Layout layout = layout_of(x, bias, params.inner);
  dispatch_float_types<true>(x.scalar_type(), "bias_act", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_pass<scalar_t>(0, params, layout, x.const_data_ptr<scalar_t>(),
                       bias ? bias->const_data_ptr<scalar_t>() : nullptr, nullptr, y.mutable_data_ptr<scalar_t>(),
                       nullptr);
  });
  return y;
}

std::vector<Tensor> bias_act_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& bias,
                                      const BiasActParams& params, int64_t order) {
  Tensor g = empty_output_like(x);
  Tensor dbias;
  const Layout layout = layout_of(x, bias, params.inner);
  dispatch_float_types<true>(x.scalar_type(), "bias_act_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const int64_t threads = at::get_num_threads();
    std::vector<acc_t> sums(bias ? threads * layout.channels : 0, acc_t(0));
    run_pass<scalar_t>(order, params, layout, x.const_data_ptr<scalar_t>(),
                       bias ? bias->const_data_ptr<scalar_t>() : nullptr, dy.const_data_ptr<scalar_t>(),
                       g.mutable_data_ptr<scalar_t>(), bias ? sums.data() : nullptr);
    if (!bias) return;
    dbias = at::empty({layout.channels}, bias->options());
    scalar_t* db = dbias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < layout.channels; ++c) {
      acc_t total = 0;
      for (int64_t t = 0; t < threads; ++t) total += sums[t * layout.channels + c];
      db[c] = static_cast<scalar_t>(total);
    }
  });
  return {g, dbias};
}

}  // namespace genfast::cpu
