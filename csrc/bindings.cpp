// The one place where the C++ and CUDA kernels meet Python. Every entry point
// checks its tensors again (the Python ops already did), so calling genfast._C
// directly is safe too, then runs the CPU or CUDA kernel for x's device.

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/activation.h"
#include "cpu/attention.h"
#include "cpu/bias_act.h"
#include "cpu/conv.h"
#include "cpu/cross_entropy.h"
#include "cpu/diffusion.h"
#include "cpu/losses.h"
#include "cpu/memory.h"
#include "cpu/minibatch_stddev.h"
#include "cpu/norm.h"
#include "cpu/rnn.h"
#include "cpu/rotary.h"
#include "cpu/sampling.h"
#include "cpu/tile_matmul.h"
#include "layout.h"

#ifdef GENFAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/norm.h"
#include "cuda/rnn.h"
#endif

namespace {

using at::Tensor;
using genfast::is_channels_last;

// Accumulation and parameter type for x's dtype: double for double, else float.
at::ScalarType math_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether a and b have one shape and lay it out alike: strides equal where a dimension has more
// than one element (a size-1 dimension's stride is arbitrary, and views keep odd ones).
bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

void check_channel_tensor(const Tensor& x, const Tensor& t, const char* name) {
  const int64_t channels = x.size(1);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == math_type(x), name, " must be ", math_type(x), " for ", x.scalar_type(),
              " x, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_group_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "x must have at least 2 dimensions (N, C, ...), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "x must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.numel() > 0, "x must not be empty, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || is_channels_last(x), "x must be contiguous or channels-last, got strides ",
              x.strides());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "groups must divide the ", x.size(1), " channels of x, got ",
              groups);
  check_channel_tensor(x, weight, "weight");
  check_channel_tensor(x, bias, "bias");
}

void check_stats(const Tensor& x, const Tensor& t, int64_t groups, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == groups, name, " must have shape (",
              x.size(0), ", ", groups, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == math_type(x) && t.device() == x.device() && t.is_contiguous(), name,
              " must be a contiguous ", math_type(x), " tensor on ", x.device());
}

#ifdef GENFAST_WITH_CUDA
genfast::cuda::DType cuda_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return genfast::cuda::DType::kFloat32;
    case at::kHalf: return genfast::cuda::DType::kFloat16;
    case at::kBFloat16: return genfast::cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "the cuda backend takes float32, float16 or bfloat16 x, got ", x.scalar_type());
  }
}

genfast::cuda::GroupNormShape cuda_shape(const Tensor& x, int64_t groups) {
  return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), groups, is_channels_last(x)};
}
#endif

std::vector<Tensor> group_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t groups,
                                       double eps, bool silu) {
  check_group_norm(x, weight, bias, groups);
  if (x.is_cpu()) return genfast::cpu::group_norm_forward(x, weight, bias, groups, eps, silu);
#ifdef GENFAST_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor y = at::empty_like(x);
    Tensor mean = at::empty({x.size(0), groups}, weight.options());
    Tensor rstd = at::empty({x.size(0), groups}, weight.options());
    C10_CUDA_CHECK(genfast::cuda::group_norm_forward(
        x.const_data_ptr(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(), y.mutable_data_ptr(),
        mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), cuda_shape(x, groups),
        static_cast<float>(eps), silu, cuda_dtype(x), c10::cuda::getCurrentCUDAStream()));
    return {y, mean, rstd};
  }
#endif
  TORCH_CHECK(false, "group_norm_forward: no kernel for ", x.device(), " tensors in this build");
}

std::vector<Tensor> group_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& bias,
                                        const Tensor& mean, const Tensor& rstd, int64_t groups, bool silu) {
  check_group_norm(x, weight, bias, groups);
  TORCH_CHECK(same_layout(dy, x) && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              "dy must match x in shape, strides, dtype and device; got ", dy.sizes(), " ", dy.strides(), " ",
              dy.scalar_type(), " for x ", x.sizes(), " ", x.strides(), " ", x.scalar_type());
  check_stats(x, mean, groups, "mean");
  check_stats(x, rstd, groups, "rstd");
  if (x.is_cpu()) return genfast::cpu::group_norm_backward(dy, x, weight, bias, mean, rstd, groups, silu);
#ifdef GENFAST_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor dx = at::empty_like(x);
    Tensor sum_dz = at::empty({x.size(0), x.size(1)}, weight.options());
    Tensor sum_dz_xhat = at::empty({x.size(0), x.size(1)}, weight.options());
    C10_CUDA_CHECK(genfast::cuda::group_norm_backward(
        dy.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
        mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), dx.mutable_data_ptr(),
        sum_dz.mutable_data_ptr<float>(), sum_dz_xhat.mutable_data_ptr<float>(), cuda_shape(x, groups), silu,
        cuda_dtype(x), c10::cuda::getCurrentCUDAStream()));
    return {dx, sum_dz_xhat.sum(0), sum_dz.sum(0)};
  }
#endif
  TORCH_CHECK(false, "group_norm_backward: no kernel for ", x.device(), " tensors in this build");
}

// Checks x (rows, D) of a float type, contiguous and not empty, and that the (D) parameters and
// the tensors shaped like x match it.
void check_layer_norm(const Tensor& x, std::initializer_list<std::pair<const Tensor*, const char*>> like_x,
                      std::initializer_list<std::pair<const Tensor*, const char*>> params) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "x must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0 && x.is_contiguous(), "x must be a contiguous, non-empty tensor, got ",
              x.sizes());
  TORCH_CHECK(x.is_cpu(), "layer_norm: no C++ kernel for ", x.device(), " tensors (use triton)");
  for (const auto& [t, name] : like_x)
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == dtype && t->is_contiguous() && t->is_cpu(), name,
                " must be a contiguous CPU tensor of x's shape ", x.sizes(), " and dtype ", dtype, ", got ",
                t->sizes(), " ", t->scalar_type());
  const int64_t D = x.size(-1);
  for (const auto& [t, name] : params)
    TORCH_CHECK(t->dim() == 1 && t->size(0) == D && t->scalar_type() == math_type(x) && t->is_contiguous() &&
                    t->is_cpu(),
                name, " must be a contiguous ", math_type(x), " CPU tensor of shape (", D, "), got ", t->sizes(), " ",
                t->scalar_type());
}

std::vector<Tensor> layer_norm_forward(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight,
                                       const Tensor& bias, double eps, bool rms) {
  check_layer_norm(x, {}, {{&weight, "weight"}, {&bias, "bias"}});
  if (residual) check_layer_norm(x, {{&*residual, "residual"}}, {});
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  return genfast::cpu::layer_norm_forward(x, residual, weight, bias, eps, rms);
}

std::vector<Tensor> layer_norm_backward(const Tensor& dy, const std::optional<Tensor>& dh, const Tensor& h,
                                        const Tensor& weight, const Tensor& mean, const Tensor& rstd, bool rms) {
  check_layer_norm(h, {{&dy, "dy"}}, {{&weight, "weight"}});
  if (dh) check_layer_norm(h, {{&*dh, "dh"}}, {});
  const int64_t rows = h.numel() / h.size(-1);
  for (const auto& [t, name] : {std::pair{&mean, "mean"}, std::pair{&rstd, "rstd"}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == math_type(h) && t->is_contiguous(), name,
                " must be a contiguous ", math_type(h), " tensor of shape (", rows, "), got ", t->sizes());
  return genfast::cpu::layer_norm_backward(dy, dh, h, weight, mean, rstd, rms);
}

// x and up: (rows, width) CPU tensors of one float type, the last dimension contiguous.
void check_activation_input(const Tensor& x, const std::optional<Tensor>& up) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "x must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.is_cpu(), "activation: no C++ kernel for ", x.device(), " tensors (use triton)");
  for (const auto& [t, name] : {std::pair{&x, "x"}, std::pair{up ? &*up : &x, "up"}}) {
    TORCH_CHECK(t->dim() == 2 && t->sizes() == x.sizes() && t->scalar_type() == dtype && t->is_cpu(), name,
                " must be a (rows, width) CPU tensor of x's shape ", x.sizes(), " and dtype ", dtype, ", got ",
                t->sizes(), " ", t->scalar_type());
    TORCH_CHECK((t->stride(1) == 1 || t->size(1) <= 1) && (t->size(0) <= 1 || t->stride(0) >= t->size(1)), name,
                " must have a contiguous last dimension and non-overlapping rows, got strides ", t->strides());
  }
}

Tensor activation_forward(const Tensor& x, const std::optional<Tensor>& up, const std::string& activation) {
  check_activation_input(x, up);
  return genfast::cpu::activation_forward(x, up, genfast::cpu::activation_kind(activation));
}

std::vector<Tensor> activation_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& up,
                                        const std::string& activation) {
  check_activation_input(x, up);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous() && dy.is_cpu(),
              "dy must be a contiguous CPU tensor of x's shape ", x.sizes(), " and dtype ", x.scalar_type());
  return genfast::cpu::activation_backward(dy, x, up, genfast::cpu::activation_kind(activation));
}

// x: a dense CPU tensor of a float type in any dimension order; bias: (channels,) of x's dtype,
// contiguous, with `inner` elements of x per channel per run (see BiasActParams).
genfast::cpu::BiasActParams bias_act_params(const Tensor& x, const std::optional<Tensor>& bias,
                                            const std::string& activation, double alpha, double gain,
                                            std::optional<double> clamp, int64_t inner) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "x must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.is_cpu(), "bias_act: no C++ kernel for ", x.device(), " tensors (use triton)");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "x must be dense (some order of its dimensions contiguous), got sizes ",
              x.sizes(), " strides ", x.strides());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->scalar_type() == dtype && bias->is_cpu() && bias->is_contiguous(),
                "bias must be a contiguous 1-D CPU tensor of x's dtype ", dtype, ", got ", bias->scalar_type(), " ",
                bias->sizes());
    TORCH_CHECK(inner >= 1 && bias->numel() >= 1 && x.numel() % (inner * bias->numel()) == 0, "inner (", inner,
                ") times the ", bias->numel(), " channels of bias must divide x's ", x.numel(), " elements");
  }
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(gain), "alpha and gain must be finite, got ", alpha, " and ", gain);
  TORCH_CHECK(!clamp || *clamp >= 0, "clamp must be >= 0, got ", clamp.value_or(0));
  return {activation, alpha, gain, clamp, inner};
}

Tensor bias_act_forward(const Tensor& x, const std::optional<Tensor>& bias, const std::string& activation,
                        double alpha, double gain, std::optional<double> clamp, int64_t inner) {
  return genfast::cpu::bias_act_forward(x, bias, bias_act_params(x, bias, activation, alpha, gain, clamp, inner));
}

std::vector<Tensor> bias_act_backward(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& bias,
                                      const std::string& activation, double alpha, double gain,
                                      std::optional<double> clamp, int64_t inner, int64_t order) {
  const auto params = bias_act_params(x, bias, activation, alpha, gain, clamp, inner);
  TORCH_CHECK(same_layout(dy, x) && dy.scalar_type() == x.scalar_type() &&
                  dy.is_cpu(),
              "dy must be a CPU tensor of x's shape ", x.sizes(), ", strides ", x.strides(), " and dtype ",
              x.scalar_type(), ", got ", dy.sizes(), " ", dy.strides(), " ", dy.scalar_type());
  TORCH_CHECK(order == 1 || order == 2, "order must be 1 or 2, got ", order);
  return genfast::cpu::bias_act_backward(dy, x, bias, params, order);
}

Tensor linear_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::string& activation, double alpha, double gain) {
  TORCH_CHECK(input.is_cpu() && weight.is_cpu() && weight.dim() == 2 && input.dim() >= 1 &&
                  input.size(-1) == weight.size(1) && input.scalar_type() == weight.scalar_type() &&
                  at::isFloatingType(input.scalar_type()),
              "linear_bias_act: input (*, in) and weight (out, in) must be CPU tensors of one float dtype, got ",
              input.sizes(), " ", input.scalar_type(), " and ", weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "linear_bias_act: bias must have weight's ", weight.size(0), " rows");
  const Tensor output_like = at::empty({0, weight.size(0)}, input.options());  // what the product makes
  return genfast::cpu::linear_bias_act(input, weight, bias,
                                       bias_act_params(output_like, bias, activation, alpha, gain, std::nullopt, 1));
}

// Tensors of one shape and float dtype on the CPU, contiguous; `names` name them in messages.
void check_elementwise(std::initializer_list<std::pair<const Tensor*, const char*>> tensors) {
  const Tensor& first = *tensors.begin()->first;
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              tensors.begin()->second, " must be float32, float16, bfloat16 or float64, got ", dtype);
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->is_cpu() && t->scalar_type() == dtype && t->sizes() == first.sizes() && t->is_contiguous(), name,
                " must be a contiguous CPU ", dtype, " tensor of shape ", first.sizes(), ", got ", t->scalar_type(),
                " ", t->sizes(), " on ", t->device());
  }
}

genfast::cpu::LossParams loss_params(const Tensor& x, const std::optional<Tensor>& t, const std::string& kind,
                                     double sign, bool reduce, double scale) {
  const auto params = genfast::cpu::LossParams{genfast::cpu::loss_kind(kind), sign, reduce, scale};
  const bool takes_target = params.kind == genfast::cpu::LossKind::kMSE ||
                            params.kind == genfast::cpu::LossKind::kBCEWithLogits ||
                            params.kind == genfast::cpu::LossKind::kGaussianKL;
  TORCH_CHECK(t.has_value() == takes_target, "loss ", kind, takes_target ? " takes" : " takes no", " target");
  if (t) check_elementwise({{&x, "x"}, {&*t, "t"}});
  else check_elementwise({{&x, "x"}});
  return params;
}

Tensor loss_forward(const Tensor& x, const std::optional<Tensor>& t, const std::string& kind, double sign, bool reduce,
                    double scale) {
  return genfast::cpu::loss_forward(x, t, loss_params(x, t, kind, sign, reduce, scale));
}

std::vector<Tensor> loss_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& t,
                                  const std::string& kind, double sign, bool reduce, double scale,
                                  bool with_target_grad) {
  const auto params = loss_params(x, t, kind, sign, reduce, scale);
  if (reduce) {
    TORCH_CHECK(grad.numel() == 1 && grad.is_cpu(), "grad must be a CPU tensor of one element, got ", grad.sizes());
  } else {
    check_elementwise({{&x, "x"}, {&grad, "grad"}});
  }
  TORCH_CHECK(!with_target_grad || t, "with_target_grad needs a target");
  return genfast::cpu::loss_backward(grad, x, t, params, with_target_grad);
}

Tensor reparameterize_forward(const Tensor& mu, const Tensor& logvar, const Tensor& noise) {
  check_elementwise({{&mu, "mu"}, {&logvar, "logvar"}, {&noise, "noise"}});
  return genfast::cpu::reparameterize(mu, logvar, noise, false);
}

Tensor reparameterize_backward(const Tensor& dz, const Tensor& logvar, const Tensor& noise) {
  check_elementwise({{&dz, "dz"}, {&logvar, "logvar"}, {&noise, "noise"}});
  return genfast::cpu::reparameterize(dz, logvar, noise, true);
}

// x: contiguous (N, C, H, W) CPU float tensor; group divides N, channels divides C.
void check_minibatch_stddev(const Tensor& x, int64_t group, int64_t channels) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.is_cpu() && x.numel() > 0,
              "x must be a contiguous non-empty (N, C, H, W) CPU tensor, got ", x.sizes(), " strides ", x.strides());
  check_elementwise({{&x, "x"}});
  TORCH_CHECK(group >= 1 && x.size(0) % group == 0, "group (", group, ") must divide the batch size ", x.size(0));
  TORCH_CHECK(channels >= 1 && x.size(1) % channels == 0, "channels (", channels, ") must divide x's ", x.size(1),
              " channels");
}

Tensor minibatch_stddev_forward(const Tensor& x, int64_t group, int64_t channels) {
  check_minibatch_stddev(x, group, channels);
  return genfast::cpu::minibatch_stddev_forward(x, group, channels);
}

Tensor minibatch_stddev_backward(const Tensor& dout, const Tensor& x, int64_t group, int64_t channels) {
  check_minibatch_stddev(x, group, channels);
  const std::vector<int64_t> sizes{x.size(0), x.size(1) + channels, x.size(2), x.size(3)};
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(sizes) && dout.is_contiguous() && dout.is_cpu() &&
                  dout.scalar_type() == x.scalar_type(),
              "dout must be a contiguous CPU tensor of shape ", at::IntArrayRef(sizes), " and x's dtype, got ",
              dout.sizes(), " ", dout.scalar_type());
  return genfast::cpu::minibatch_stddev_backward(dout, x, group, channels);
}

// cell "lstm" or "gru"; x_proj (T, B, G*H), weight_hh (G*H, P), h0 (B, P), c0 (B, H) (LSTM),
// bias_hh (G*H) (GRU), weight_hr (P, H) (LSTM with a projection), lengths (B,) int64 in
// [0, T], zoneout_h (T, B, P) and zoneout_c (T, B, H) (LSTM): contiguous tensors on one device
// of one float or double type (lengths aside). Without save, the forward keeps one step of
// what the backward reads (inference).
genfast::cpu::Recurrence recurrence(const std::string& cell, const Tensor& x_proj, const Tensor& weight_hh,
                                    const Tensor& h0, const std::optional<Tensor>& c0,
                                    const std::optional<Tensor>& bias_hh, const std::optional<Tensor>& weight_hr,
                                    const std::optional<Tensor>& lengths, const std::optional<Tensor>& zoneout_h,
                                    const std::optional<Tensor>& zoneout_c, const std::optional<Tensor>& norm_hh,
                                    const std::optional<Tensor>& norm_c, double eps, bool reverse, bool save) {
  TORCH_CHECK(cell == "lstm" || cell == "gru", "cell must be \"lstm\" or \"gru\", got ", cell);
  const bool lstm = cell == "lstm";
  const auto dtype = x_proj.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "x_proj must be float32 or float64, got ", dtype);
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(2) % (lstm ? 4 : 3) == 0, "x_proj must be (T, B, ",
              lstm ? 4 : 3, " * H), got ", x_proj.sizes());
  const int64_t T = x_proj.size(0), B = x_proj.size(1), H = x_proj.size(2) / (lstm ? 4 : 3);
  const int64_t P = weight_hr ? weight_hr->size(0) : H;
  auto check = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dtype && t.is_contiguous() &&
                    t.device() == x_proj.device(),
                name, " must be a contiguous ", dtype, " tensor on ", x_proj.device(), " of shape ",
                at::IntArrayRef(shape), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  check(x_proj, "x_proj", {T, B, x_proj.size(2)});
  check(weight_hh, "weight_hh", {x_proj.size(2), P});
  check(h0, "h0", {B, P});
  TORCH_CHECK(lstm == c0.has_value() && (lstm || !weight_hr) && lstm != bias_hh.has_value(),
              "an LSTM takes c0 and no bias_hh (it is in x_proj), a GRU bias_hh and neither c0 nor weight_hr");
  if (c0) check(*c0, "c0", {B, H});
  if (bias_hh) check(*bias_hh, "bias_hh", {x_proj.size(2)});
  if (weight_hr) check(*weight_hr, "weight_hr", {P, H});
  TORCH_CHECK(lstm || !zoneout_c, "a GRU has no cell state to zone out");
  if (zoneout_h) check(*zoneout_h, "zoneout_h", {T, B, P});
  if (zoneout_c) check(*zoneout_c, "zoneout_c", {T, B, H});
  TORCH_CHECK(norm_hh.has_value() == norm_c.has_value() && (lstm || !norm_hh),
              "norm_hh and norm_c come together, for an LSTM");
  if (norm_hh) {
    check(*norm_hh, "norm_hh", {2, 4 * H});
    check(*norm_c, "norm_c", {2, H});
    TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  }
  if (lengths) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && lengths->scalar_type() == at::kLong &&
                    lengths->is_contiguous() && lengths->device() == x_proj.device(),
                "lengths must be a contiguous int64 tensor of shape (", B, ",) on ", x_proj.device());
    // On a GPU, reading them would wait for it: the Python op checks them.
    if (lengths->is_cpu()) {
      const int64_t* ls = lengths->const_data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(ls[b] >= 0 && ls[b] <= T, "lengths[", b, "] = ", ls[b], " is not in [0, ", T, "]");
    }
  }
  return {lstm ? genfast::cpu::Cell::kLSTM : genfast::cpu::Cell::kGRU,
          x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c, norm_hh, norm_c, eps,
          reverse, save};
}

#ifdef GENFAST_WITH_CUDA

// Whether csrc/cuda/rnn.cu's persistent kernel runs a cell ("lstm" or "gru") of this batch and
// hidden size on CUDA device `device`.
bool persistent_recurrence_fits(const std::string& cell, int64_t batch, int64_t hidden, int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  bool fits = false;
  C10_CUDA_CHECK(genfast::cuda::persistent_recurrence_fits(cell == "lstm", batch, hidden, &fits));
  return fits;
}

// The persistent kernel's forward of a checked float32 recurrence without a projection.
std::vector<Tensor> persistent_recurrence_forward(const genfast::cpu::Recurrence& r) {
  TORCH_CHECK(r.x_proj.scalar_type() == at::kFloat && !r.weight_hr && !r.zoneout_h && !r.zoneout_c && !r.norm_hh,
              "the CUDA recurrence takes float32, no projection, zoneout or norms; the Triton kernels take the rest");
  const c10::cuda::CUDAGuard guard(r.x_proj.device());
  const bool lstm = r.cell == genfast::cpu::Cell::kLSTM;
  const int64_t T = r.x_proj.size(0), B = r.x_proj.size(1), H = r.h0.size(1), steps = r.save ? T : 1;
  const auto options = r.x_proj.options();
  Tensor h_state = at::empty({2, B, H}, options);
  h_state[0].copy_(r.h0);
  Tensor c_state = lstm ? r.c0->clone() : Tensor();
  Tensor output = at::empty({T, B, H}, options);
  Tensor gates = at::empty({steps, B, 4 * H}, options), h_prev = at::empty({steps, B, H}, options);
  Tensor c_prev = lstm ? at::empty({steps, B, H}, options) : Tensor();
  Tensor tanh_c = lstm ? at::empty({steps, B, H}, options) : Tensor();
  const genfast::cuda::PersistentRecurrence problem{
      lstm, T, B, H, r.x_proj.const_data_ptr<float>(), r.weight_hh.const_data_ptr<float>(),
      r.bias_hh ? r.bias_hh->const_data_ptr<float>() : nullptr,
      r.lengths ? r.lengths->const_data_ptr<int64_t>() : nullptr, r.reverse, h_state.mutable_data_ptr<float>(),
      lstm ? c_state.mutable_data_ptr<float>() : nullptr, output.mutable_data_ptr<float>(),
      r.save ? gates.mutable_data_ptr<float>() : nullptr, r.save ? h_prev.mutable_data_ptr<float>() : nullptr,
      r.save && lstm ? c_prev.mutable_data_ptr<float>() : nullptr,
      r.save && lstm ? tanh_c.mutable_data_ptr<float>() : nullptr};
  const cudaError_t status =
      genfast::cuda::persistent_recurrence_forward(problem, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status != cudaErrorInvalidValue, "the persistent recurrence does not fit batch ", B, " and hidden size ",
              H, " on this GPU (persistent_recurrence_fits says which do)");
  C10_CUDA_CHECK(status);
  return {output, h_state[T % 2].clone(), c_state, gates, h_prev, c_prev, tanh_c, Tensor(), Tensor(), Tensor()};
}

#endif

std::vector<Tensor> recurrence_forward(const std::string& cell, const Tensor& x_proj, const Tensor& weight_hh,
                                       const Tensor& h0, const std::optional<Tensor>& c0,
                                       const std::optional<Tensor>& bias_hh, const std::optional<Tensor>& weight_hr,
                                       const std::optional<Tensor>& lengths, const std::optional<Tensor>& zoneout_h,
                                       const std::optional<Tensor>& zoneout_c, const std::optional<Tensor>& norm_hh,
                                       const std::optional<Tensor>& norm_c, double eps, bool reverse, bool save) {
  const auto r = recurrence(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c,
                            norm_hh, norm_c, eps, reverse, save);
  if (x_proj.is_cpu()) return genfast::cpu::recurrence_forward(r);
#ifdef GENFAST_WITH_CUDA
  if (x_proj.is_cuda()) return persistent_recurrence_forward(r);
#endif
  TORCH_CHECK(false, "recurrence_forward: no kernel for ", x_proj.device(), " tensors in this build");
}

// An LSTM or GRU over input (T, B, I) on the CPU for inference, the loop projecting its input
// itself (genfast::cpu::Recurrence's comment): h (B, H), an LSTM's c (B, H), weight_ih (G*H, I),
// weight_hh (G*H, H), bias_ih and bias_hh (G*H) or neither, all of one float or double type.
genfast::cpu::Recurrence recurrence_from_input(const std::string& cell, const Tensor& input, const Tensor& h,
                                               const std::optional<Tensor>& c, const Tensor& weight_ih,
                                               const Tensor& weight_hh, const std::optional<Tensor>& bias_ih,
                                               const std::optional<Tensor>& bias_hh, bool reverse) {
  TORCH_CHECK_VALUE(cell == "lstm" || cell == "gru", "cell must be \"lstm\" or \"gru\", got ", cell);
  const bool lstm = cell == "lstm";
  const int64_t G = lstm ? 4 : 3;
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "input must have dtype float32 or float64, got ",
                   dtype);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK_VALUE(weight_ih.dim() == 2 && weight_ih.size(0) % G == 0 && weight_ih.size(1) == I,
                    "weight_ih must be (", G, " * hidden_size, ", I, "), got ", weight_ih.sizes());
  const int64_t H = weight_ih.size(0) / G;
  auto check = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have input's dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape) && t.is_cpu(), name, " must be a CPU tensor of shape ",
                      at::IntArrayRef(shape), ", got ", t.sizes(), " on ", t.device());
  };
  check(weight_ih, "weight_ih", {G * H, I});
  check(weight_hh, "weight_hh", {G * H, H});
  check(h, "h", {B, H});
  TORCH_CHECK_VALUE(lstm == c.has_value(), "an LSTM takes c, a GRU does not");
  if (c) check(*c, "c", {B, H});
  TORCH_CHECK_VALUE(bias_ih.has_value() == bias_hh.has_value(), "bias_ih and bias_hh must be given together");
  if (bias_ih) {
    check(*bias_ih, "bias_ih", {G * H});
    check(*bias_hh, "bias_hh", {G * H});
  }
  const auto options = input.options();
  std::optional<Tensor> gru_bias_hh;  // the n gate reads b_hn inside r * (.), zero without biases
  if (!lstm) gru_bias_hh = bias_hh ? bias_hh->contiguous() : at::zeros({G * H}, options);
  const Tensor input_bias = !bias_ih ? at::zeros({G * H}, options)
                           : lstm   ? at::add(*bias_ih, *bias_hh)
                                    : bias_ih->contiguous();
  genfast::cpu::Recurrence r{lstm ? genfast::cpu::Cell::kLSTM : genfast::cpu::Cell::kGRU,
                             input_bias.expand({T, B, G * H}),
                             weight_hh.contiguous(),
                             h.contiguous(),
                             lstm ? std::optional<Tensor>(c->contiguous()) : std::nullopt,
                             gru_bias_hh};
  r.reverse = reverse;
  r.save = false;
  r.input = input.contiguous();
  r.weight_ih = weight_ih.contiguous();
  return r;
}

// One LSTM or GRU step on the CPU for inference, its input projection computed by the same
// team of threads as the step: input (B, I), the rest as recurrence_from_input's. Returns h' and
// an LSTM's c'.
std::vector<Tensor> cell_forward(const std::string& cell, const Tensor& input, const Tensor& h,
                                 const std::optional<Tensor>& c, const Tensor& weight_ih, const Tensor& weight_hh,
                                 const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh) {
  TORCH_CHECK_VALUE(input.dim() == 2 && input.is_cpu(), "input must be a CPU tensor (batch, input_size), got ",
                    input.sizes(), " on ", input.device());
  const std::vector<Tensor> out = genfast::cpu::recurrence_forward(
      recurrence_from_input(cell, input.unsqueeze(0), h, c, weight_ih, weight_hh, bias_ih, bias_hh, false));
  return {out[1], out[2]};
}

// A layer's forward on the CPU for inference, the loop projecting the input a block of steps at
// a time: input (T, B, I), the rest as recurrence_from_input's. Returns output (T, B, H), h_n and
// an LSTM's c_n.
std::vector<Tensor> layer_inference(const std::string& cell, const Tensor& input, const Tensor& h,
                                    const std::optional<Tensor>& c, const Tensor& weight_ih, const Tensor& weight_hh,
                                    const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh,
                                    bool reverse) {
  TORCH_CHECK_VALUE(input.dim() == 3 && input.is_cpu(), "input must be a CPU tensor (T, batch, input_size), got ",
                    input.sizes(), " on ", input.device());
  const std::vector<Tensor> out = genfast::cpu::recurrence_forward(
      recurrence_from_input(cell, input, h, c, weight_ih, weight_hh, bias_ih, bias_hh, reverse));
  return {out[0], out[1], out[2]};
}

// saved: the forward's gates, h_prev and, for an LSTM, c_prev and tanh_c.
std::vector<Tensor> recurrence_backward(const std::string& cell, const Tensor& x_proj, const Tensor& weight_hh,
                                        const Tensor& h0, const std::optional<Tensor>& c0,
                                        const std::optional<Tensor>& bias_hh, const std::optional<Tensor>& weight_hr,
                                        const std::optional<Tensor>& lengths, const std::optional<Tensor>& zoneout_h,
                                        const std::optional<Tensor>& zoneout_c, const std::optional<Tensor>& norm_hh,
                                        const std::optional<Tensor>& norm_c, double eps, bool reverse,
                                        const Tensor& d_output, const std::optional<Tensor>& d_h_n,
                                        const std::optional<Tensor>& d_c_n, const std::vector<Tensor>& saved) {
  const auto r = recurrence(cell, x_proj, weight_hh, h0, c0, bias_hh, weight_hr, lengths, zoneout_h, zoneout_c,
                            norm_hh, norm_c, eps, reverse, true);
  TORCH_CHECK(x_proj.is_cpu(), "recurrence_backward runs CPU tensors; on a GPU the Triton kernels run it");
  const int64_t T = x_proj.size(0), B = x_proj.size(1), P = h0.size(1), H = x_proj.size(2) / (r.cell == genfast::cpu::Cell::kLSTM ? 4 : 3);
  auto check = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == x_proj.scalar_type() && t.is_contiguous(),
                name, " must be contiguous, of x_proj's dtype and of shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  };
  check(d_output, "d_output", {T, B, P});
  if (d_h_n) check(*d_h_n, "d_h_n", {B, P});
  if (d_c_n) check(*d_c_n, "d_c_n", {B, H});
  const size_t count = r.cell == genfast::cpu::Cell::kGRU ? 2u : r.norm_hh ? 7u : 4u;
  TORCH_CHECK(saved.size() == count, "saved must hold the forward's gates, h_prev and, for an LSTM, c_prev and "
              "tanh_c, and with the norms hh_norm, c_norm and rstd");
  check(saved[0], "gates", {T, B, 4 * H});
  check(saved[1], "h_prev", {T, B, P});
  if (count > 2) {
    check(saved[2], "c_prev", {T, B, H});
    check(saved[3], "tanh_c", {T, B, H});
  }
  if (count > 4) {
    check(saved[4], "hh_norm", {T, B, 4 * H});
    check(saved[5], "c_norm", {T, B, H});
    check(saved[6], "rstd", {T, B, 2});
  }
  return genfast::cpu::recurrence_backward(r, d_output, d_h_n, d_c_n, saved);
}

// logits (rows, V > 0) of a float type on the CPU with a contiguous last dimension, target
// (rows,) int64 of class indices in [0, V) or ignore_index, grad_scale (rows,) in logits' math type;
// smoothing in [0, 1]. Returns the losses (rows,) in logits' math type; with grad_scale, the
// logits are overwritten with their gradient.
Tensor cross_entropy_rows(const Tensor& logits, const Tensor& target, int64_t ignore_index, double smoothing,
                          const std::optional<Tensor>& grad_scale) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.is_cpu() &&
                  (logits.stride(1) == 1 || logits.size(1) == 1),
              "logits must be a (rows, V > 0) CPU tensor with a contiguous last dimension, got ", logits.sizes(),
              " with strides ", logits.strides());
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                  target.is_contiguous() && target.is_cpu(),
              "target must be a contiguous int64 CPU tensor of shape (", rows, ",), got ", target.sizes(), " ",
              target.scalar_type());
  const int64_t* ts = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(ts[r] == ignore_index || (ts[r] >= 0 && ts[r] < V), "target ", ts[r], " at row ", r,
                " is not a class index in [0, ", V, ") nor ignore_index ", ignore_index);
  TORCH_CHECK(smoothing >= 0 && smoothing <= 1, "smoothing must lie in [0, 1], got ", smoothing);
  if (grad_scale)
    TORCH_CHECK(grad_scale->dim() == 1 && grad_scale->size(0) == rows && grad_scale->scalar_type() == math_type(logits) &&
                    grad_scale->is_contiguous() && grad_scale->is_cpu(),
                "grad_scale must be a contiguous ", math_type(logits), " CPU tensor of shape (", rows, ",), got ",
                grad_scale->sizes(), " ", grad_scale->scalar_type());
  Tensor loss = at::empty({rows}, logits.options().dtype(math_type(logits)));
  genfast::cpu::cross_entropy_rows(logits, target, ignore_index, smoothing, grad_scale, loss);
  return loss;
}

// logits (rows, V) of a float type on the CPU with a contiguous last dimension, uniform
// (rows,) contiguous float32; temperature positive, top_p in (0, 1].
Tensor sample(const Tensor& logits, const Tensor& uniform, double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.is_cpu() &&
                  (logits.stride(1) == 1 || logits.size(1) == 1),
              "logits must be a (rows, V > 0) CPU tensor with a contiguous last dimension, got ", logits.sizes(),
              " with strides ", logits.strides());
  TORCH_CHECK(uniform.dim() == 1 && uniform.size(0) == logits.size(0) && uniform.scalar_type() == at::kFloat &&
                  uniform.is_contiguous() && uniform.is_cpu(),
              "uniform must be a contiguous float32 CPU tensor of shape (", logits.size(0), ",), got ", uniform.sizes(),
              " ", uniform.scalar_type());
  TORCH_CHECK(temperature > 0 && top_k >= 0 && top_p > 0 && top_p <= 1, "need temperature > 0, top_k >= 0 and "
              "0 < top_p <= 1, got ", temperature, ", ", top_k, ", ", top_p);
  Tensor tokens = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  genfast::cpu::sample(logits, uniform, temperature, top_k, top_p, tokens);
  return tokens;
}

// x and out (B, S, H, D) of one float type on the CPU, last dimension contiguous; cos and sin
// contiguous (1 or B, S, R) tables in x's math type, R even and at most D.
Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin, const std::optional<Tensor>& out_arg,
                        bool transpose) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "x must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.dim() == 4 && x.is_cpu() && x.stride(3) == 1, "x must be a (B, S, H, D) CPU tensor with a contiguous last "
              "dimension, got ", x.sizes(), " with strides ", x.strides());
  // A new output is laid out as x where x is dense (a transposed q stays transposed), else contiguous.
  const Tensor out = out_arg                            ? *out_arg
                     : x.is_non_overlapping_and_dense() ? genfast::cpu::empty_output(x.sizes(), x.strides(), x.options())
                                                        : genfast::cpu::empty_output(x.sizes(), x.options());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == dtype && out.is_cpu() && out.stride(3) == 1,
              "out must be a CPU tensor of x's shape ", x.sizes(), " and dtype with a contiguous last dimension");
  TORCH_CHECK(out.data_ptr() == x.data_ptr() ? out.strides() == x.strides() : at::has_internal_overlap(out) == at::MemOverlap::No,
              "out must be x itself or a tensor whose elements do not overlap");
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == x.size(0)) && t->size(1) == x.size(1) &&
                    t->size(2) % 2 == 0 && t->size(2) <= x.size(3) && t->sizes() == cos.sizes() &&
                    t->scalar_type() == math_type(x) && t->is_contiguous() && t->is_cpu(),
                name, " must be a contiguous ", math_type(x), " CPU tensor of shape (1 or ", x.size(0), ", ", x.size(1),
                ", R) with R even and at most ", x.size(3), ", got ", t->sizes(), " ", t->scalar_type());
  }
  genfast::cpu::rotary_embedding(x, cos, sin, out, transpose);
  return out;
}

// coefficients: sample_noise, x0_sample, x0_model, prev_x0, prev_sample, prev_model, prev_history, prev_noise,
// out_x0, out_sample, clip, min_log, max_log, guidance (genfast/ops/diffusion.py).
std::vector<Tensor> denoise_step(const Tensor& sample, const Tensor& model_output, const std::optional<Tensor>& noise,
                                 const std::optional<Tensor>& history, const std::optional<Tensor>& threshold,
                                 const std::vector<double>& coefficients,
                                 bool clipped, bool learned_variance, bool guided, bool want_denoised,
                                 std::optional<int64_t> noise_seed) {
  TORCH_CHECK(coefficients.size() == 14, "coefficients must hold 14 values, got ", coefficients.size());
  TORCH_CHECK(sample.dim() >= 2 && sample.numel() > 0, "sample must be a non-empty (B, C, ...) tensor, got ",
              sample.sizes());
  const auto dtype = sample.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "sample must be float32, float16 or bfloat16, got ", dtype);
  auto check_like = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == sample.device() && t.is_contiguous(), name,
                " must be contiguous, of sample's dtype and device; got ", t.scalar_type(), " on ", t.device());
  };
  check_like(sample, "sample");
  check_like(model_output, "model_output");
  const int64_t batch = sample.size(0);
  TORCH_CHECK(model_output.dim() == sample.dim() && model_output.size(0) == batch * (guided ? 2 : 1) &&
                  model_output.numel() == sample.numel() * (guided ? 2 : 1) * (learned_variance ? 2 : 1),
              "model_output has shape ", model_output.sizes(), ", which does not fit sample ", sample.sizes());
  for (const auto& [t, name] : {std::pair{&noise, "noise"}, std::pair{&history, "history"}}) {
    if (!*t) continue;
    check_like(**t, name);
    TORCH_CHECK((*t)->sizes() == sample.sizes(), name, " must have sample's shape ", sample.sizes(), ", got ",
                (*t)->sizes());
  }
  if (threshold)
    TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == batch && threshold->scalar_type() == at::kFloat &&
                    threshold->is_contiguous() && threshold->device() == sample.device(),
                "threshold must be a contiguous float32 (", batch, ",) tensor on sample's device");
  if (threshold && threshold->is_cpu())  // on a GPU, checking would wait for it
    TORCH_CHECK((*threshold > 0).all().item<bool>(), "threshold must be positive");
  TORCH_CHECK(sample.is_cpu(), "denoise_step: no C++ kernel for ", sample.device(), " tensors (use triton)");
  auto f = [&](int i) { return static_cast<float>(coefficients[i]); };
  TORCH_CHECK(!(noise && noise_seed), "give noise or noise_seed, not both");
  TORCH_CHECK(!noise_seed || *noise_seed >= 0, "noise_seed must be >= 0, got ", noise_seed.value_or(0));
  const genfast::cpu::StepCoefficients c{f(0), f(1), f(2),  f(3),  f(4),  f(5),    f(6),    f(7),
                                         f(8), f(9), f(10), f(11), f(12), f(13), clipped, learned_variance,
                                         guided, noise_seed.has_value(),
                                         static_cast<uint64_t>(noise_seed.value_or(0))};
  return genfast::cpu::denoise_step(sample, model_output, noise, history, threshold, c, want_denoised);
}

Tensor timestep_embedding(const Tensor& timesteps, const Tensor& frequencies, int64_t embedding_dim,
                          bool flip_sin_to_cos, double scale) {
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.is_contiguous(), "timesteps must be a contiguous 1-D tensor, got ",
              timesteps.sizes());
  TORCH_CHECK(!timesteps.is_complex() && timesteps.scalar_type() != at::kBool, "timesteps must be real, got ",
              timesteps.scalar_type());
  TORCH_CHECK(embedding_dim >= 0, "embedding_dim must be >= 0, got ", embedding_dim);
  TORCH_CHECK(frequencies.dim() == 1 && frequencies.size(0) == embedding_dim / 2 && frequencies.is_contiguous() &&
                  frequencies.scalar_type() == at::kFloat && frequencies.device() == timesteps.device(),
              "frequencies must be a contiguous float32 (", embedding_dim / 2, ",) tensor on timesteps' device");
  TORCH_CHECK(timesteps.is_cpu(), "timestep_embedding: no C++ kernel for ", timesteps.device(),
              " tensors (use triton)");
  return genfast::cpu::timestep_embedding(timesteps, frequencies, embedding_dim, flip_sin_to_cos, scale);
}

// Checks a float32, float16 or bfloat16 (B, ...) CPU tensor that a training op reads, and that
// `other` is like it.
void check_batch_pair(const Tensor& first, const Tensor& other, const char* first_name, const char* other_name) {
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, first_name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(first.dim() >= 1 && first.numel() > 0, first_name, " must be a non-empty (B, ...) tensor, got ",
              first.sizes());
  TORCH_CHECK(other.sizes() == first.sizes() && other.scalar_type() == dtype, other_name, " must have ", first_name,
              "'s shape ", first.sizes(), " and dtype ", dtype, ", got ", other.sizes(), " ", other.scalar_type());
  TORCH_CHECK(first.is_contiguous() && other.is_contiguous(), first_name, " and ", other_name, " must be contiguous");
  TORCH_CHECK(first.is_cpu() && other.is_cpu(), "the C++ training kernels take CPU tensors (use triton)");
}

void check_weights(const std::optional<Tensor>& weights, const Tensor& model_output) {
  if (!weights) return;
  TORCH_CHECK(weights->dim() == 1 && weights->size(0) == model_output.size(0) &&
                  weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->is_cpu(),
              "weights must be a contiguous float32 CPU tensor of shape (", model_output.size(0), ",), got ",
              weights->sizes(), " ", weights->scalar_type());
}

std::vector<Tensor> add_noise(const Tensor& x0, const Tensor& noise, const Tensor& timesteps,
                              const Tensor& alphas_cumprod, bool velocity) {
  check_batch_pair(x0, noise, "original_samples", "noise");
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == x0.size(0) && timesteps.scalar_type() == at::kLong &&
                  timesteps.is_contiguous() && timesteps.is_cpu(),
              "timesteps must be a contiguous int64 CPU tensor of shape (", x0.size(0), ",), got ", timesteps.sizes(),
              " ", timesteps.scalar_type());
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.scalar_type() == at::kFloat &&
                  alphas_cumprod.is_contiguous() && alphas_cumprod.is_cpu(),
              "alphas_cumprod must be a contiguous 1-D float32 CPU tensor");
  const int64_t* t = timesteps.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < timesteps.size(0); ++b)
    TORCH_CHECK(t[b] >= 0 && t[b] < alphas_cumprod.size(0), "timesteps must lie in [0, ", alphas_cumprod.size(0),
                "), the schedule's length; got ", t[b]);
  return genfast::cpu::add_noise(x0, noise, timesteps, alphas_cumprod, velocity);
}

std::vector<Tensor> denoising_loss(const Tensor& model_output, const Tensor& target,
                                   const std::optional<Tensor>& weights, bool want_gradient) {
  check_batch_pair(model_output, target, "model_output", "target");
  check_weights(weights, model_output);
  return genfast::cpu::denoising_loss(model_output, target, weights, want_gradient);
}

Tensor scale(const Tensor& x, double scale) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.is_contiguous() && x.is_cpu(), "x must be a contiguous CPU tensor");
  return genfast::cpu::scale(x, scale);
}

// q (B, H, S_q, D), k (B, H_k, S_k, D), v (B, H_k, S_k, D_v): CPU tensors of one float type,
// last dimension contiguous, H_k dividing H; mask expanded to (B, H, S_q, S_k), bool or the
// math type; alibi_slopes expanded to (B, H) in the math type.
genfast::cpu::AttentionProblem attention_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const std::optional<Tensor>& mask,
                                                 const std::optional<Tensor>& alibi_slopes, double scale,
                                                 double softcap, int64_t window_left, int64_t window_right,
                                                 double dropout_p, int64_t dropout_seed) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "query must be float32, float16, bfloat16 or float64, got ", dtype);
  for (const auto& [t, name] : {std::pair{&q, "query"}, std::pair{&k, "key"}, std::pair{&v, "value"}})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == dtype && t->is_cpu() && (t->size(3) <= 1 || t->stride(3) == 1),
                name, " must be a (B, H, S, D) CPU tensor of query's dtype with a contiguous last dimension, got ",
                t->sizes(), " ", t->scalar_type(), " with strides ", t->strides());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Hk = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(3) == q.size(3) && v.size(1) == Hk && v.size(2) == Sk,
              "key and value must match query's batch, key query's head size, and value key's heads and length; "
              "got query ", q.sizes(), ", key ", k.sizes(), ", value ", v.sizes());
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "key's ", Hk, " heads must divide query's ", H);
  const auto math = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (mask)
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({B, H, Sq, Sk}) && mask->is_cpu() &&
                    (mask->scalar_type() == at::kBool || mask->scalar_type() == math),
                "attn_mask must be expanded to (", B, ", ", H, ", ", Sq, ", ", Sk, "), bool or ", math, ", got ",
                mask->sizes(), " ", mask->scalar_type());
  if (alibi_slopes)
    TORCH_CHECK(alibi_slopes->sizes() == at::IntArrayRef({B, H}) && alibi_slopes->scalar_type() == math &&
                    alibi_slopes->is_cpu(),
                "alibi_slopes must be expanded to (", B, ", ", H, ") in ", math, ", got ", alibi_slopes->sizes(), " ",
                alibi_slopes->scalar_type());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0 for none), got ", softcap);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window bounds must be >= -1 (-1 for none), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must lie in [0, 1), got ", dropout_p);
  TORCH_CHECK(dropout_seed >= 0, "dropout_seed must be >= 0, got ", dropout_seed);
  return {q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p,
          static_cast<uint64_t>(dropout_seed)};
}

std::vector<Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& mask, const std::optional<Tensor>& alibi_slopes,
                                      double scale, double softcap, int64_t window_left, int64_t window_right,
                                      double dropout_p, int64_t dropout_seed) {
  return genfast::cpu::attention_forward(attention_problem(q, k, v, mask, alibi_slopes, scale, softcap, window_left,
                                                           window_right, dropout_p, dropout_seed));
}

std::vector<Tensor> attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const std::optional<Tensor>& mask, const std::optional<Tensor>& alibi_slopes,
                                       double scale, double softcap, int64_t window_left, int64_t window_right,
                                       double dropout_p, int64_t dropout_seed, const Tensor& out, const Tensor& stats,
                                       const Tensor& dout, bool mask_grad) {
  auto problem = attention_problem(q, k, v, mask, alibi_slopes, scale, softcap, window_left, window_right, dropout_p,
                                   dropout_seed);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&dout, "dout"}})
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape) && t->scalar_type() == q.scalar_type() && t->is_cpu() &&
                    (t->size(3) <= 1 || t->stride(3) == 1),
                name, " must be a CPU tensor of shape ", at::IntArrayRef(out_shape), " in query's dtype with a "
                "contiguous last dimension, got ", t->sizes(), " ", t->scalar_type());
  const auto math = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> stats_shape{q.size(0), q.size(1), q.size(2), 2};
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(stats_shape) && stats.scalar_type() == math && stats.is_contiguous() &&
                  stats.is_cpu(),
              "stats must be a contiguous ", math, " CPU tensor of shape ", at::IntArrayRef(stats_shape), ", got ",
              stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK(!mask_grad || (mask && mask->scalar_type() != at::kBool), "mask_grad needs an additive float mask");
  return genfast::cpu::attention_backward(problem, out, stats, dout, mask_grad);
}

Tensor attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                        const std::optional<Tensor>& block_table, const std::optional<Tensor>& alibi_slopes,
                        double scale, double softcap, int64_t window_left, int64_t window_right) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "q must be float32, float16, bfloat16 or float64, got ", dtype);
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}})
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == dtype && t->is_cpu() && (t->size(3) <= 1 || t->stride(3) == 1),
                name, " must be a 4-D CPU tensor of q's dtype with a contiguous last dimension, got ", t->sizes(),
                " ", t->scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Hk = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == q.size(3) && v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3),
              "k_cache must have q's head size and v_cache k_cache's first three sizes; got q ", q.sizes(),
              ", k_cache ", k_cache.sizes(), ", v_cache ", v_cache.sizes());
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "the caches' ", Hk, " heads must divide q's ", H);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous() && lengths.is_cpu(),
              "lengths must be a contiguous int64 CPU tensor of shape (", B, "), got ", lengths.sizes());
  int64_t capacity = k_cache.size(2);
  if (block_table) {
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B && block_table->scalar_type() == at::kLong &&
                    block_table->stride(1) == 1 && block_table->is_cpu(),
                "block_table must be an int64 CPU tensor (", B, ", max_blocks) with contiguous rows, got ",
                block_table->sizes(), " ", block_table->scalar_type());
    capacity *= block_table->size(1);
    if (block_table->numel())
      TORCH_CHECK(block_table->min().item<int64_t>() >= 0 && block_table->max().item<int64_t>() < k_cache.size(0),
                  "block_table entries must lie in [0, ", k_cache.size(0), ")");
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "a contiguous k_cache must have q's batch ", B, ", got ", k_cache.size(0));
  }
  if (B)
    TORCH_CHECK(lengths.min().item<int64_t>() >= q.size(2) && lengths.max().item<int64_t>() <= capacity,
                "lengths must lie in [", q.size(2), " (the queries), ", capacity, " (the cache)]");
  const auto math = dtype == at::kDouble ? at::kDouble : at::kFloat;
  if (alibi_slopes)
    TORCH_CHECK(alibi_slopes->sizes() == at::IntArrayRef({B, H}) && alibi_slopes->scalar_type() == math &&
                    alibi_slopes->is_cpu(),
                "alibi_slopes must be expanded to (", B, ", ", H, ") in ", math, ", got ", alibi_slopes->sizes());
  TORCH_CHECK(std::isfinite(scale) && softcap >= 0 && window_left >= -1 && window_right >= -1,
              "scale must be finite, softcap >= 0 and the window bounds >= -1");
  return genfast::cpu::attention_decode(
      {q, k_cache, v_cache, lengths, block_table, alibi_slopes, scale, softcap, window_left, window_right});
}

Tensor conv2d_winograd_weight(const Tensor& weight, bool flipped) {
  TORCH_CHECK(weight.is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "weight must be a float32 CPU (K, C, 3, 3) tensor, got ", weight.scalar_type(), " ", weight.sizes(),
              " on ", weight.device());
  return genfast::cpu::conv2d_winograd_weight(weight, flipped);
}

Tensor conv2d_winograd(const Tensor& x, const Tensor& U, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& residual, int64_t out_channels, int64_t pad_h, int64_t pad_w,
                       int64_t upsample) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4, "x must be a float32 CPU (N, C, H, W) "
              "tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(1) > 0 && out_channels > 0, "x and the filters need at least one channel");
  const int64_t lanes = genfast::cpu::kVectorLanes<float>;
  TORCH_CHECK(U.is_cpu() && U.scalar_type() == at::kFloat && U.dim() == 3 && U.size(0) == 16 &&
                  U.size(1) == x.size(1) && U.size(2) == (out_channels + lanes - 1) / lanes * lanes,
              "the transformed filters must be float32 (16, ", x.size(1), ", ", out_channels, " rounded up to ",
              lanes, "), got ", U.scalar_type(), " ", U.sizes());
  TORCH_CHECK(upsample >= 1, "upsample must be >= 1, got ", upsample);
  const int64_t height = upsample * x.size(2), width = upsample * x.size(3);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && height + 2 * pad_h >= 3 && width + 2 * pad_w >= 3,
              "the padded input (", height, " + 2 * ", pad_h, ", ", width, " + 2 * ", pad_w,
              ") must be at least the 3x3 filter");
  if (bias) {
    TORCH_CHECK(bias->is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == out_channels,
                "bias must be float32 (", out_channels, "), got ", bias->scalar_type(), " ", bias->sizes());
  }
  if (residual) {
    const std::vector<int64_t> out_sizes{x.size(0), out_channels, height + 2 * pad_h - 2, width + 2 * pad_w - 2};
    TORCH_CHECK(residual->is_cpu() && residual->scalar_type() == at::kFloat && residual->sizes() == out_sizes &&
                    (residual->stride(1) == 1 || out_channels == 1),
                "residual must be float32 ", at::IntArrayRef(out_sizes), " with channels innermost, got ",
                residual->scalar_type(), " ", residual->sizes(), " strides ", residual->strides());
  }
  return genfast::cpu::conv2d_winograd(x, U, bias, residual, out_channels, pad_h, pad_w, upsample);
}

std::tuple<Tensor, Tensor> conv2d_winograd_filters_backward(const Tensor& x, const Tensor& dy, int64_t pad_h,
                                                           int64_t pad_w, int64_t upsample, bool bias,
                                                           bool filters_channels_last) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.size(1) > 0,
              "x must be a float32 CPU (N, C, H, W) tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  TORCH_CHECK(upsample >= 1 && pad_h >= 0 && pad_w >= 0, "upsample must be >= 1 and the padding >= 0, got ", upsample,
              ", ", pad_h, ", ", pad_w);
  const int64_t height = upsample * x.size(2) + 2 * pad_h - 2, width = upsample * x.size(3) + 2 * pad_w - 2;
  TORCH_CHECK(dy.is_cpu() && dy.scalar_type() == at::kFloat && dy.dim() == 4 && dy.size(0) == x.size(0) &&
                  dy.size(1) > 0 && dy.size(2) == height && dy.size(3) == width,
              "dy must be float32 (", x.size(0), ", K, ", height, ", ", width, "), got ", dy.scalar_type(), " ",
              dy.sizes());
  return genfast::cpu::conv2d_winograd_filters_backward(x, dy, pad_h, pad_w, upsample, bias, filters_channels_last);
}

}  // namespace

// An uninitialised CPU tensor of like's dtype from genfast's output memory (cpu/memory.h): from
// 2 MB, huge pages and the blocks of freed outputs reused, where a fresh allocation takes a page
// fault per 4 KB page.
Tensor empty_output(const std::vector<int64_t>& sizes, const Tensor& like) {
  TORCH_CHECK_VALUE(like.is_cpu(), "empty_output makes CPU tensors, got a tensor on ", like.device());
  TORCH_CHECK_VALUE(std::all_of(sizes.begin(), sizes.end(), [](int64_t size) { return size >= 0; }),
                    "sizes must not be negative, got ", at::IntArrayRef(sizes));
  return genfast::cpu::empty_output(sizes, like.options());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel runs without the GIL, as torch's ops do, so that Python threads calling genfast
  // at once run their kernels side by side rather than in turn. None of them touches a Python object.
  const auto without_gil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "genfast's C++ (CPU) and CUDA kernels";
#ifdef GENFAST_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("persistent_recurrence_fits", &persistent_recurrence_fits, without_gil,
        "Whether the persistent CUDA recurrence runs (cell, batch, hidden) on a device");
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("vector_lanes") = genfast::cpu::kVectorLanes<float>;  // the float32 lanes the kernels pad rows to
  m.attr("output_memory_from_bytes") = genfast::cpu::OutputCache::kMinBytes;  // smaller outputs: at::empty
  // a block given back before this many more bytes is written with streaming stores
  m.attr("output_memory_cold_after_bytes") = genfast::cpu::OutputCache::kColdAfterBytes;
  m.attr("output_memory_warm_bytes") = genfast::cpu::OutputCache::kWarmBytes;  // the recent blocks left unmarked
  m.def("empty_output", &empty_output, "An uninitialised CPU tensor (sizes, like's dtype) from genfast's output memory");
  m.def("group_norm_forward", &group_norm_forward, without_gil, "GroupNorm + activation forward: (y, mean, rstd)");
  m.def("group_norm_backward", &group_norm_backward, without_gil,
        "GroupNorm + activation backward: (dx, dweight, dbias)");
  m.def("activation_forward", &activation_forward, without_gil, "act(x) or act(x) * up: y");
  m.def("activation_backward", &activation_backward, without_gil,
        "The activation's backward: (dx, dup or an undefined tensor)");
  m.def("bias_act_forward", &bias_act_forward, without_gil, "clamp(gain act(x + bias)), laid out like x: y");
  m.def("bias_act_backward", &bias_act_backward, without_gil,
        "dy gain act' (order 1) or act'' (order 2) of x + bias where not clamped, and its sum per channel: (g, "
        "dbias or an undefined tensor)");
  m.def("linear_bias_act", &linear_bias_act, without_gil,
        "gain act(input weight^T + bias) as one autograd node, the weight's gradient in output memory: y");
  m.def("loss_forward", &loss_forward, without_gil, "A VAE or GAN loss's terms, or their scaled sum: loss");
  m.def("loss_backward", &loss_backward, without_gil, "The loss's gradients: (dx, dt or an undefined tensor)");
  m.def("reparameterize_forward", &reparameterize_forward, without_gil, "mu + exp(logvar / 2) noise: z");
  m.def("reparameterize_backward", &reparameterize_backward, without_gil, "The sample's gradient for logvar");
  m.def("minibatch_stddev_forward", &minibatch_stddev_forward, without_gil,
        "StyleGAN's minibatch standard deviation: cat(x, the group statistics)");
  m.def("minibatch_stddev_backward", &minibatch_stddev_backward, without_gil, "Its gradient for x");
  m.def("cross_entropy_rows", &cross_entropy_rows, without_gil,
        "Each row's cross-entropy: losses (rows,); with grad_scale, the logits become their gradient");
  m.def("recurrence_forward", &recurrence_forward, without_gil,
        "An LSTM's or GRU's time loop: (output, h_n, c_n, gates, h_prev, c_prev, tanh_c, hh_norm, c_norm, rstd)");
  m.def("cell_forward", &cell_forward, without_gil,
        "One LSTM or GRU step for inference, its input projection fused: (h', c' or an undefined tensor)");
  m.def("layer_inference", &layer_inference, without_gil,
        "A layer's forward for inference, its input projected by the loop: (output, h_n, c_n or an undefined tensor)");
  m.def("recurrence_backward", &recurrence_backward, without_gil,
        "The time loop's backward: (d_x_proj, d_weight_hh, d_bias_hh, dh0, dc0, d_weight_hr, d_norm_hh, d_norm_c)");
  m.def("sample", &sample, without_gil,
        "Draws one token per row of logits after temperature, top-k and top-p: tokens (rows,)");
  m.def("rotary_embedding", &rotary_embedding, without_gil,
        "Rotates x by the (cos, sin) tables into out (which may be x; a new tensor if None); returns out");
  m.def("layer_norm_forward", &layer_norm_forward, without_gil,
        "LayerNorm or RMSNorm (+ residual) forward: (y, h, mean, rstd)");
  m.def("layer_norm_backward", &layer_norm_backward, without_gil,
        "LayerNorm or RMSNorm backward: (dx, dweight, dbias)");
  m.def("denoise_step", &denoise_step, without_gil, "One fused sampler step: (prev, denoised or an undefined tensor)");
  m.def("timestep_embedding", &timestep_embedding, without_gil, "diffusers' sinusoidal timestep embedding, float32");
  m.def("add_noise", &add_noise, without_gil, "Training noise: (noisy, velocity or an undefined tensor)");
  m.def("denoising_loss", &denoising_loss, without_gil,
        "The denoising loss: (loss, per-sample mean squared errors, gradient or an undefined tensor)");
  m.def("attention_forward", &attention_forward, without_gil,
        "Scaled dot-product attention: (out, the softmax's statistics)");
  m.def("attention_backward", &attention_backward, without_gil,
        "Scaled dot-product attention's backward: (dq, dk, dv, dmask or an undefined tensor)");
  m.def("attention_decode", &attention_decode, without_gil,
        "Decoding attention over a contiguous or paged KV cache: out");
  m.def("conv2d_winograd_weight", &conv2d_winograd_weight, without_gil,
        "3x3 filters (K, C, 3, 3) transformed: (16, C, K); flipped: those of the input's gradient, (16, K, C)");
  m.def("conv2d_winograd", &conv2d_winograd, without_gil,
        "3x3 stride-1 convolution by Winograd F(2x2, 3x3) of x upsampled by nearest neighbours, + residual: y");
  m.def("conv2d_winograd_filters_backward", &conv2d_winograd_filters_backward, without_gil,
        "The gradients of that convolution's filters and bias, by the same transforms: (dweight, dbias or undefined); "
        "dweight channels-last where filters_channels_last");
  m.def("scale", &scale, without_gil, "scale * x, for the denoising loss's backward");
}
