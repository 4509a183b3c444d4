// Autograd for the compiled fused ops, in C++: the Autograd-key kernels of torchfast::bn_relu_fwd and
// torchfast::bn_add_relu_fwd (every device), and the running-statistics update the functional form calls
// after the forward. On small layers (8x64x8x8) a Python autograd wrapper cost more than the kernels
// (about 14 us forward and 38 us backward per call, against 20 + 25 us of work), so it lives here.
//
// What backward keeps, per op (the same as the Python formulas in torchfast/_ops.py, which the
// reference, Triton and emulator ops use):
//   bn_relu:     input, weight, bias, mean, invstd     (the ReLU mask is recomputed from them)
//   bn_add_relu: output, input, weight, mean, invstd   (the mask is output > 0)
// A backward that must itself be differentiable (create_graph=True: gradient penalties) calls the
// composite torchfast::bn_relu_double_backward / bn_add_relu_double_backward ops, which torchfast/_ops.py
// defines with differentiable torch ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

namespace torchfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The dtype a per-channel gradient is returned in (the parameter's own), as an IValue-storable int.
int64_t dtype_of(const OptTensor& t) {
  return static_cast<int64_t>(present(t) ? t->scalar_type() : at::kFloat);
}

// What both forwards keep besides the saved tensors: the flags, the parameters' dtypes, and, for each
// tensor argument that can have a gradient (named, with whether it was given), its position among the
// tensors autograd sees (its "edge"; -1 for an absent optional). The statistics are not differentiable.
void remember(AutogradContext* ctx, bool training, double eps, const OptTensor& weight, const OptTensor& bias,
              std::initializer_list<std::pair<const char*, bool>> edges, const variable_list& stats) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["w_dtype"] = dtype_of(weight);
  ctx->saved_data["b_dtype"] = dtype_of(bias);
  int64_t next = 0;
  for (const auto& [name, given] : edges) ctx->saved_data[name] = given ? next++ : int64_t(-1);
  ctx->mark_non_differentiable(stats);
}

bool needs(AutogradContext* ctx, const std::string& key) {
  const int64_t e = ctx->saved_data[key].toInt();
  return e >= 0 && ctx->needs_input_grad(static_cast<size_t>(e));
}

// A per-channel gradient in its parameter's dtype, or undefined when it is not needed.
at::Tensor param_grad(AutogradContext* ctx, bool need, const at::Tensor& g, const char* dtype_key) {
  return need ? g.to(static_cast<at::ScalarType>(ctx->saved_data[dtype_key].toInt())) : at::Tensor();
}

}  // namespace

// Outside the anonymous namespace: the backward node's name (profiler, grad_fn) is
// torch::autograd::CppNode<torchfast::BnReluFunction>.
class BnReluFunction : public torch::autograd::Function<BnReluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double eps) {
    static const auto fwd = op_handle("torchfast::bn_relu_fwd").typed<Quad(
        const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double)>();
    at::Tensor out, mean, invstd, var;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, mean, invstd, var) = fwd.call(input, weight, bias, running_mean, running_var, training, eps);
    }
    ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, invstd});
    remember(ctx, training, eps, weight, bias,
             {{"e_input", true}, {"e_weight", present(weight)}, {"e_bias", present(bias)}}, {mean, invstd, var});
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const OptTensor w = weight.defined() ? OptTensor(weight) : c10::nullopt;
    const OptTensor b = bias.defined() ? OptTensor(bias) : c10::nullopt;
    const bool training = ctx->saved_data["training"].toBool();
    const bool need_in = needs(ctx, "e_input"), need_w = needs(ctx, "e_weight"), need_b = needs(ctx, "e_bias");
    const at::Tensor& grad_out = grads[0];
    at::Tensor gi, gw, gb;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable composite
      static const auto dbl = op_handle("torchfast::bn_relu_double_backward").typed<std::vector<at::Tensor>(
          const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
          const at::Tensor&, bool, double, bool, bool, bool)>();
      auto r = dbl.call(grad_out, input, w, b, mean, invstd, training, ctx->saved_data["eps"].toDouble(), need_in,
                        need_w, need_b);
      gi = r[0], gw = r[1], gb = r[2];
    } else {
      static const auto bwd = op_handle("torchfast::bn_relu_bwd").typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
          const at::Tensor&, bool)>();
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gi, gw, gb) = bwd.call(grad_out, input, w, b, mean, invstd, training);
    }
    return {need_in ? gi.to(input.scalar_type()) : at::Tensor(), param_grad(ctx, need_w, gw, "w_dtype"),
            param_grad(ctx, need_b, gb, "b_dtype"), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class BnAddReluFunction : public torch::autograd::Function<BnAddReluFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& residual,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double eps) {
    static const auto fwd = op_handle("torchfast::bn_add_relu_fwd").typed<Quad(
        const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
        bool, double)>();
    at::Tensor out, mean, invstd, var;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, mean, invstd, var) =
          fwd.call(input, residual, weight, bias, running_mean, running_var, training, eps);
    }
    ctx->save_for_backward({out, input, weight.value_or(at::Tensor()), mean, invstd});
    remember(ctx, training, eps, weight, bias,
             {{"e_input", true}, {"e_residual", true}, {"e_weight", present(weight)}, {"e_bias", present(bias)}},
             {mean, invstd, var});
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &out = saved[0], &input = saved[1], &weight = saved[2], &mean = saved[3], &invstd = saved[4];
    const OptTensor w = weight.defined() ? OptTensor(weight) : c10::nullopt;
    const bool training = ctx->saved_data["training"].toBool();
    const bool need_in = needs(ctx, "e_input"), need_res = needs(ctx, "e_residual"), need_w = needs(ctx, "e_weight"),
               need_b = needs(ctx, "e_bias");
    const at::Tensor& grad_out = grads[0];
    at::Tensor gi, gr, gw, gb;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable composite
      static const auto dbl = op_handle("torchfast::bn_add_relu_double_backward").typed<std::vector<at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
          const at::Tensor&, bool, double, bool, bool, bool, bool)>();
      auto r = dbl.call(grad_out, out, input, w, mean, invstd, training, ctx->saved_data["eps"].toDouble(), need_in,
                        need_res, need_w, need_b);
      gi = r[0], gr = r[1], gw = r[2], gb = r[3];
    } else {
      static const auto bwd = op_handle("torchfast::bn_add_relu_bwd").typed<Quad(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
          const at::Tensor&, bool)>();
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(gi, gr, gw, gb) = bwd.call(grad_out, out, input, w, mean, invstd, training);
    }
    return {need_in ? gi.to(input.scalar_type()) : at::Tensor(), need_res ? gr : at::Tensor(),
            param_grad(ctx, need_w, gw, "w_dtype"), param_grad(ctx, need_b, gb, "b_dtype"),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

Quad as_quad(const variable_list& v) { return {v[0], v[1], v[2], v[3]}; }

Quad bn_relu_fwd_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  return as_quad(BnReluFunction::apply(input, weight, bias, running_mean, running_var, training, eps));
}

Quad bn_add_relu_fwd_autograd(const at::Tensor& input, const at::Tensor& residual, const OptTensor& weight,
                              const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                              bool training, double eps) {
  return as_quad(BnAddReluFunction::apply(input, residual, weight, bias, running_mean, running_var, training, eps));
}

// ---------------------------------------------------------------------------------------------------
// running = (1 - momentum) * running + momentum * batch, with the unbiased variance var * n / (n - 1),
// in double and rounded once, as stock's CPU kernel does. No-op for an empty batch (count == 0).

void check_stat(const OptTensor& running, const at::Tensor& batch, const char* name) {
  if (!present(running)) return;
  TORCH_CHECK(running->dim() == 1 && running->numel() == batch.numel(), "bn_update_running_stats_: ", name,
              " must have ", batch.numel(), " elements, got shape ", running->sizes());
  TORCH_CHECK(running->device() == batch.device(), "bn_update_running_stats_: ", name, " is on ", running->device(),
              " but the batch statistics are on ", batch.device());
  TORCH_CHECK(running->is_floating_point(), "bn_update_running_stats_: ", name, " must be floating point, got ",
              running->scalar_type());
}

void update_one(at::Tensor& running, const at::Tensor& batch, double momentum, double factor) {
  const at::Tensor b = batch.to(at::kDouble).contiguous();
  const double* bp = b.data_ptr<double>();
  const int64_t C = b.numel();
  const int64_t stride = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_update_running_stats_", [&] {
    scalar_t* rp = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      scalar_t& r = rp[c * stride];
      r = static_cast<scalar_t>(momentum * (bp[c] * factor) + (1.0 - momentum) * static_cast<double>(r));
    }
  });
}

void bn_update_running_stats_cpu(const OptTensor& running_mean, const OptTensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, double momentum, int64_t count) {
  check_stat(running_mean, mean, "running_mean");
  check_stat(running_var, var, "running_var");
  if (count <= 0) return;
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  if (present(running_mean)) {
    at::Tensor r = *running_mean;
    update_one(r, mean, momentum, 1.0);
  }
  if (present(running_var)) {
    at::Tensor r = *running_var;
    update_one(r, var, momentum, unbias);
  }
}

// Other devices: the same formula with tensor ops (two kernels per statistic).
void bn_update_running_stats_any(const OptTensor& running_mean, const OptTensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, double momentum, int64_t count) {
  check_stat(running_mean, mean, "running_mean");
  check_stat(running_var, var, "running_var");
  if (count <= 0) return;
  const double unbias = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
  if (present(running_mean)) running_mean->mul_(1.0 - momentum).add_(mean, momentum);
  if (present(running_var)) running_var->mul_(1.0 - momentum).add_(var, momentum * unbias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("bn_relu_fwd", &bn_relu_fwd_autograd);
  m.impl("bn_add_relu_fwd", &bn_add_relu_fwd_autograd);
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) { m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu); }

TORCH_LIBRARY_IMPL(torchfast, CompositeExplicitAutograd, m) {
  m.impl("bn_update_running_stats_", &bn_update_running_stats_any);
}

}  // namespace torchfast
