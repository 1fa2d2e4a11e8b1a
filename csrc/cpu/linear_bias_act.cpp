// genfast.nn.Linear with an activation on the CPU, one C++ autograd node: y = gain act(x W^T + b),
// the product ATen's (MKL), then bias, activation and gain in one pass (bias_act.cpp). Its backward
// is bias_act's pass, then dx = g W and dW = g^T x, the weight's gradient written into genfast's
// output memory. (The same node as a Python autograd.Function cost an MLP's training step 3%:
// benchmarks/experiments/NOTES.md.)
// Where autograd records the backward itself (create_graph: a gradient penalty), it recomputes the
// product and runs bias_act's backward through the custom op genfast::bias_act_backward, whose own
// gradient is registered, so that gradients of gradients reach x, W and b.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <tuple>

#include "bias_act.h"
#include "memory.h"

namespace genfast::cpu {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<Tensor> optional_bias(const Tensor& bias) { return bias.defined() ? std::optional(bias) : std::nullopt; }

// (dz, dbias) as the custom op computes them, recorded by autograd.
std::tuple<Tensor, Tensor> recorded_backward(const Tensor& dy, const Tensor& z, const Tensor& bias,
                                             const BiasActParams& params) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("genfast::bias_act_backward", "");
  torch::jit::Stack stack{dy,           z,           bias.defined() ? c10::IValue(bias) : c10::IValue(),
                          z.dim() - 1,  params.activation, params.alpha,
                          params.gain,  c10::IValue(), int64_t(1),
                          std::string("cpu")};
  op.callBoxed(&stack);
  return {stack[0].toTensor(), stack[1].toTensor()};
}

struct LinearBiasAct : public torch::autograd::Function<LinearBiasAct> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, const BiasActParams& params) {
    const Tensor z = at::linear(input, weight);
    ctx->save_for_backward({input, weight, bias.value_or(Tensor()), z});
    ctx->saved_data["activation"] = params.activation;
    ctx->saved_data["alpha"] = params.alpha;
    ctx->saved_data["gain"] = params.gain;
    return bias_act_forward(z, bias, params);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    const BiasActParams params{ctx->saved_data["activation"].toStringRef(), ctx->saved_data["alpha"].toDouble(),
                               ctx->saved_data["gain"].toDouble(), std::nullopt, 1};
    const bool recorded = at::GradMode::is_enabled();
    const Tensor z = recorded ? at::linear(input, weight) : saved[3];
    const Tensor dy = grads[0].contiguous();  // laid out as z
    Tensor dz, dbias;
    if (recorded) {
      std::tie(dz, dbias) = recorded_backward(dy, z, bias, params);
    } else {
      const std::vector<Tensor> g = bias_act_backward(dy, z, optional_bias(bias), params, 1);
      dz = g[0], dbias = g[1];
    }
    Tensor dinput, dweight;
    if (ctx->needs_input_grad(0)) dinput = at::matmul(dz, weight);
    if (ctx->needs_input_grad(1)) {
      const Tensor rows = dz.reshape({-1, dz.size(-1)}).t(), columns = input.reshape({-1, input.size(-1)});
      if (recorded) {
        dweight = rows.mm(columns);
      } else {
        dweight = empty_output({rows.size(0), columns.size(1)}, columns.options());
        at::mm_out(dweight, rows, columns);
      }
    }
    return {dinput, dweight, bias.defined() ? dbias : Tensor(), Tensor()};
  }
};

}  // namespace

Tensor linear_bias_act(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                       const BiasActParams& params) {
  return LinearBiasAct::apply(input, weight, bias, params);
}

}  // namespace genfast::cpu
