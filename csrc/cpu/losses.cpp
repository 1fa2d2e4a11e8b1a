// The losses of VAEs and GANs on the CPU. The forward computes each element's term and sums it in
// the same pass (per tile in registers, per thread in double); the backward writes the gradient
// of x, and of t where asked, in one pass over x and t. The reparameterised sample of a VAE and
// its gradient are one pass each too.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>
#include <vector>

#include "dispatch.h"
#include "elementwise.h"
#include "losses.h"
#include "memory.h"
#include "vec_math.h"

namespace genfast::cpu {
namespace {

using at::Tensor;

template <typename T>
GENFAST_VECTOR_INLINE T positive_part(T z) { return z < T(0) ? T(0) : z; }  // NaN passes

// log(1 + e^z), without overflow: max(z, 0) + log(1 + e^-|z|).
template <typename T>
GENFAST_VECTOR_INLINE T softplus(T z) { return positive_part(z) + log1p_fast(exp_fast(-std::abs(z))); }

template <typename T>
GENFAST_VECTOR_INLINE T sigmoid(T z) { return T(1) / (T(1) + exp_fast(-z)); }

template <LossKind kKind, typename T>
GENFAST_VECTOR_INLINE T loss_term(T x, T t, T sign) {
  if constexpr (kKind == LossKind::kMSE) return (x - t) * (x - t);
  if constexpr (kKind == LossKind::kBCEWithLogits) return softplus(x) - x * t;
  if constexpr (kKind == LossKind::kGaussianKL) return T(-0.5) * (T(1) + t - x * x - exp_fast(t));
  if constexpr (kKind == LossKind::kSoftplus) return softplus(sign * x);
  if constexpr (kKind == LossKind::kHinge) return positive_part(T(1) + sign * x);
}

// The term's partial derivatives for x and t.
template <LossKind kKind, typename T>
GENFAST_VECTOR_INLINE void loss_gradient(T x, T t, T sign, T& dx, T& dt) {
  if constexpr (kKind == LossKind::kMSE) {
    dx = T(2) * (x - t), dt = -dx;
  } else if constexpr (kKind == LossKind::kBCEWithLogits) {
    dx = sigmoid(x) - t, dt = -x;
  } else if constexpr (kKind == LossKind::kGaussianKL) {
    dx = x, dt = T(0.5) * (exp_fast(t) - T(1));
  } else if constexpr (kKind == LossKind::kSoftplus) {
    dx = sign * sigmoid(sign * x), dt = T(0);
  } else {
    // 0 at the kink and the sign where x is NaN, as torch's relu (threshold_backward).
    dx = T(1) + sign * x <= T(0) ? T(0) : sign, dt = T(0);
  }
}

template <typename Body>
void dispatch_loss(LossKind kind, Body&& body) {
  switch (kind) {
    case LossKind::kMSE: return body.template operator()<LossKind::kMSE>();
    case LossKind::kBCEWithLogits: return body.template operator()<LossKind::kBCEWithLogits>();
    case LossKind::kGaussianKL: return body.template operator()<LossKind::kGaussianKL>();
    case LossKind::kSoftplus: return body.template operator()<LossKind::kSoftplus>();
    case LossKind::kHinge: return body.template operator()<LossKind::kHinge>();
  }
}

}  // namespace

LossKind loss_kind(std::string_view name) {
  if (name == "mse") return LossKind::kMSE;
  if (name == "bce_with_logits") return LossKind::kBCEWithLogits;
  if (name == "gaussian_kl") return LossKind::kGaussianKL;
  if (name == "softplus") return LossKind::kSoftplus;
  if (name == "hinge") return LossKind::kHinge;
  TORCH_CHECK(false, "loss must be one of mse, bce_with_logits, gaussian_kl, softplus, hinge; got '", name, "'");
}

Tensor loss_forward(const Tensor& x, const std::optional<Tensor>& t, const LossParams& params) {
  const int64_t n = x.numel();
  Tensor out = params.reduce ? Tensor() : empty_output(x.sizes(), x.options());
  dispatch_float_types<true>(x.scalar_type(), "loss", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ts = t ? t->const_data_ptr<scalar_t>() : nullptr;
    const acc_t sign = static_cast<acc_t>(params.sign);
    std::vector<double> thread_sums(params.reduce ? at::get_num_threads() : 0, 0.0);
    scalar_t* outs = params.reduce ? nullptr : out.mutable_data_ptr<scalar_t>();
    dispatch_loss(params.kind, [&]<LossKind kKind>() {
      for_each_tile(1, n, [&](int64_t, int64_t first, int64_t end) {
        auto term = [&](int64_t i) {
          return loss_term<kKind>(static_cast<acc_t>(xs[i]), ts ? static_cast<acc_t>(ts[i]) : acc_t(0), sign);
        };
        if (outs == nullptr) {
          thread_sums[at::get_thread_num()] += lane_sum<acc_t>(end - first, [&](int64_t i) { return term(first + i); });
        } else {
#pragma omp simd
          for (int64_t i = first; i < end; ++i) outs[i] = static_cast<scalar_t>(term(i));
        }
      });
    });
    if (!params.reduce) return;
    double total = 0;
    for (double sum : thread_sums) total += sum;
    out = at::scalar_tensor(total * params.scale, x.options());
  });
  return out;
}

std::vector<Tensor> loss_backward(const Tensor& grad, const Tensor& x, const std::optional<Tensor>& t,
                                  const LossParams& params, bool with_target_grad) {
  const int64_t n = x.numel();
  Tensor dx = empty_output(x.sizes(), x.options());
  Tensor dt = with_target_grad ? empty_output(x.sizes(), x.options()) : Tensor();
  dispatch_float_types<true>(x.scalar_type(), "loss_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ts = t ? t->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* grads = params.reduce ? nullptr : grad.const_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(params.reduce ? grad.item<double>() * params.scale : 1.0);
    const acc_t sign = static_cast<acc_t>(params.sign);
    scalar_t* dxs = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dts = with_target_grad ? dt.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_loss(params.kind, [&]<LossKind kKind>() {
      for_each_tile(1, n, [&](int64_t, int64_t first, int64_t end) {
#pragma omp simd
        for (int64_t i = first; i < end; ++i) {
          acc_t gx, gt;
          loss_gradient<kKind>(static_cast<acc_t>(xs[i]), ts ? static_cast<acc_t>(ts[i]) : acc_t(0), sign, gx, gt);
          const acc_t g = grads ? scale * static_cast<acc_t>(grads[i]) : scale;
          dxs[i] = static_cast<scalar_t>(g * gx);
          if (dts) dts[i] = static_cast<scalar_t>(g * gt);
        }
      });
    });
  });
  return {dx, dt};
}

Tensor reparameterize(const Tensor& a, const Tensor& logvar, const Tensor& noise, bool gradient) {
  Tensor out = empty_output(a.sizes(), a.options());
  dispatch_float_types<true>(a.scalar_type(), "reparameterize", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = math_t<scalar_t>;
    const scalar_t* as = a.const_data_ptr<scalar_t>();
    const scalar_t* logvars = logvar.const_data_ptr<scalar_t>();
    const scalar_t* noises = noise.const_data_ptr<scalar_t>();
    scalar_t* outs = out.mutable_data_ptr<scalar_t>();
    for_each_tile(1, a.numel(), [&](int64_t, int64_t first, int64_t end) {
#pragma omp simd
      for (int64_t i = first; i < end; ++i) {
        const acc_t value = static_cast<acc_t>(as[i]);
        const acc_t std_noise = exp_fast(acc_t(0.5) * static_cast<acc_t>(logvars[i])) * static_cast<acc_t>(noises[i]);
        outs[i] = static_cast<scalar_t>(gradient ? acc_t(0.5) * value * std_noise : value + std_noise);
      }
    });
  });
  return out;
}

}  // namespace genfast::cpu
