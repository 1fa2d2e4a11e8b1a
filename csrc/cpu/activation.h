// Activations fused into CPU kernels, as types so that each kernel is instantiated per
// activation and the choice costs nothing per element. The formulas are genfast/reference/
// activation.py's and bias_act.py's; the names (ActivationKind) are the ones the activation op
// takes. forward(z) is act(z), backward(z, dy) is dy act'(z) and, where bias_act needs it,
// second(z, dy) is dy act''(z). LeakyReLU alone holds a parameter, so bias_act calls them on
// instances.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>
#include <vector>

#include "vec_math.h"

namespace genfast::cpu {

struct Identity {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return z; }
  // d act / dz at z, times dy.
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) { return dy; }
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) { return T(0); }
};

// The derivative at 0 is torch's: 0 for relu, the slope for leaky_relu. NaN passes through.
struct ReLU {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return z < T(0) ? T(0) : z; }
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) { return z <= T(0) ? T(0) : dy; }
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) { return T(0); }
};

// The slope in the type computed in, so that the loops need no conversion.
template <typename T>
struct LeakyReLU {
  T alpha;
  GENFAST_VECTOR_INLINE T forward(T z) const { return z < T(0) ? alpha * z : z; }
  GENFAST_VECTOR_INLINE T backward(T z, T dy) const { return z > T(0) ? dy : alpha * dy; }
  GENFAST_VECTOR_INLINE T second(T z, T dy) const { return T(0); }
};

struct Tanh {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return tanh_fast(z); }
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) {
    const T t = tanh_fast(z);
    return dy * (T(1) - t * t);
  }
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) {
    const T t = tanh_fast(z);
    return dy * T(-2) * t * (T(1) - t * t);
  }
};

struct Sigmoid {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return T(1) / (T(1) + exp_fast(-z)); }
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) {
    const T s = forward(z);
    return dy * s * (T(1) - s);
  }
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) {
    const T s = forward(z);
    return dy * s * (T(1) - s) * (T(1) - T(2) * s);
  }
};

struct SiLU {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return z / (T(1) + exp_fast(-z)); }
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) {
    const T s = T(1) / (T(1) + exp_fast(-z));
    return dy * s * (T(1) + z * (T(1) - s));
  }
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) {
    const T s = T(1) / (T(1) + exp_fast(-z));
    return dy * s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
  }
};

// z Phi(z), Phi the standard normal CDF.
struct GELU {
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return z * normal_cdf_fast(z); }
  // Phi(z) + z phi(z).
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) {
    return dy * (normal_cdf_fast(z) + z * T(0.39894228040143268) * exp_fast(T(-0.5) * z * z));
  }
  // phi(z) (2 - z^2).
  template <typename T>
  GENFAST_VECTOR_INLINE static T second(T z, T dy) {
    return dy * T(0.39894228040143268) * exp_fast(T(-0.5) * z * z) * (T(2) - z * z);
  }
};

// z sigma(2u) = z (1 + tanh u) / 2 with u = sqrt(2 / pi) (z + 0.044715 z^3): the tanh form,
// through a sigmoid so that it needs exp alone.
struct GELUTanh {
  template <typename T>
  GENFAST_VECTOR_INLINE static T inner(T z) { return T(0.79788456080286536) * (z + T(0.044715) * z * z * z); }
  template <typename T>
  GENFAST_VECTOR_INLINE static T forward(T z) { return z / (T(1) + exp_fast(T(-2) * inner(z))); }
  // (1 + tanh u) / 2 + z (1 - tanh^2 u) u'(z) / 2.
  template <typename T>
  GENFAST_VECTOR_INLINE static T backward(T z, T dy) {
    const T s = T(1) / (T(1) + exp_fast(T(-2) * inner(z)));  // (1 + tanh u) / 2
    const T du = T(0.79788456080286536) * (T(1) + T(3 * 0.044715) * z * z);
    return dy * (s + T(2) * z * s * (T(1) - s) * du);
  }
};

enum class ActivationKind { kIdentity, kSiLU, kGELU, kGELUTanh };

// The kind an op's activation argument names: "" (none), "silu", "gelu" or "gelu_tanh".
inline ActivationKind activation_kind(std::string_view name) {
  if (name.empty()) return ActivationKind::kIdentity;
  if (name == "silu") return ActivationKind::kSiLU;
  if (name == "gelu") return ActivationKind::kGELU;
  if (name == "gelu_tanh") return ActivationKind::kGELUTanh;
  TORCH_CHECK(false, "activation must be one of '', 'silu', 'gelu', 'gelu_tanh'; got '", name, "'");
}

// Calls body.template operator()<Act>() with the activation of `kind`.
template <typename Body>
void dispatch_activation(ActivationKind kind, Body&& body) {
  switch (kind) {
    case ActivationKind::kIdentity: body.template operator()<Identity>(); break;
    case ActivationKind::kSiLU: body.template operator()<SiLU>(); break;
    case ActivationKind::kGELU: body.template operator()<GELU>(); break;
    case ActivationKind::kGELUTanh: body.template operator()<GELUTanh>(); break;
  }
}

// The activation op's kernels (activation.cpp). Callers check the arguments (csrc/bindings.cpp):
// x (rows, width) of a float type with its last dimension contiguous, up (if given) like x, dy
// contiguous (rows, width).

// y = act(x), or act(x) * up: contiguous (rows, width).
at::Tensor activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& up, ActivationKind kind);

// Returns dx and, with up, dup (else an undefined tensor), both contiguous.
std::vector<at::Tensor> activation_backward(const at::Tensor& dy, const at::Tensor& x,
                                            const std::optional<at::Tensor>& up, ActivationKind kind);

}  // namespace genfast::cpu
