// Activations fused into the epilogues of CPU kernels, as types so that each
// kernel is instantiated per activation and the choice costs nothing per element.
#pragma once

#include "vec_math.h"

namespace genfast::cpu {

struct Identity {
  template <typename T>
  static T forward(T z) { return z; }
  // d act / dz at z, times dy.
  template <typename T>
  static T backward(T z, T dy) { return dy; }
};

struct SiLU {
  template <typename T>
  static T forward(T z) { return z / (T(1) + exp_fast(-z)); }
  template <typename T>
  static T backward(T z, T dy) {
    const T s = T(1) / (T(1) + exp_fast(-z));
    return dy * s * (T(1) + z * (T(1) - s));
  }
};

// Calls body.template operator()<Act>() with the activation named by `silu`.
template <typename Body>
void dispatch_activation(bool silu, Body&& body) {
  if (silu) {
    body.template operator()<SiLU>();
  } else {
    body.template operator()<Identity>();
  }
}

}  // namespace genfast::cpu
