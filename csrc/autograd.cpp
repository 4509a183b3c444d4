// Autograd for the compiled fused ops, in C++: the Autograd-key kernels of torchfast::bn_relu_fwd and
// torchfast::bn_add_relu_fwd (every device), the running-statistics update that follows a training
// forward, and torchfast::bn_relu / bn_add_relu, the forward and that update in one call. On small
// layers (8x64x8x8) a Python autograd wrapper cost more than the kernels (about 14 us forward and
// 38 us backward per call, against 20 + 25 us of work), so it lives here.
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
#include <c10/core/InferenceMode.h>
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

// What both forwards keep besides the saved tensors, in two saved_data entries: "eps", and "meta", one
// int64 packing the training flag, the parameters' dtypes, and for each tensor argument that can have a
// gradient (in argument order; absent optionals included) its position among the tensors autograd sees
// (its "edge"; -1 for an absent optional). saved_data is a string-keyed map: the seven entries this
// used to be cost a hash insert each per forward and a lookup each per backward. The statistics
// are not differentiable.
struct Meta {
  bool training = false;
  at::ScalarType w_dtype = at::kFloat, b_dtype = at::kFloat;
  int64_t edge[4] = {-1, -1, -1, -1};

  int64_t pack() const {
    int64_t v = (training ? 1 : 0) | (static_cast<int64_t>(w_dtype) << 8) | (static_cast<int64_t>(b_dtype) << 16);
    for (int k = 0; k < 4; ++k) v |= (edge[k] + 1) << (32 + 4 * k);
    return v;
  }
  static Meta unpack(int64_t v) {
    Meta m;
    m.training = v & 1;
    m.w_dtype = static_cast<at::ScalarType>((v >> 8) & 0xff);
    m.b_dtype = static_cast<at::ScalarType>((v >> 16) & 0xff);
    for (int k = 0; k < 4; ++k) m.edge[k] = ((v >> (32 + 4 * k)) & 0xf) - 1;
    return m;
  }
};

void remember(AutogradContext* ctx, bool training, double eps, const OptTensor& weight, const OptTensor& bias,
              std::initializer_list<bool> given, const variable_list& stats) {
  Meta m;
  m.training = training;
  if (present(weight)) m.w_dtype = weight->scalar_type();
  if (present(bias)) m.b_dtype = bias->scalar_type();
  int64_t next = 0, k = 0;
  for (const bool g : given) m.edge[k++] = g ? next++ : -1;
  ctx->saved_data["meta"] = m.pack();
  ctx->saved_data["eps"] = eps;
  ctx->mark_non_differentiable(stats);
  // The statistics' gradients are never used: no zero tensors for them (the default makes three per
  // backward). An undefined output gradient is handled in backward.
  ctx->set_materialize_grads(false);
}

// The input gradient in the input's dtype (the kernels' already is: no dispatcher round trip for it).
at::Tensor in_dtype(const at::Tensor& g, const at::Tensor& input) {
  return g.scalar_type() == input.scalar_type() ? g : g.to(input.scalar_type());
}

bool needs(AutogradContext* ctx, const Meta& m, int k) {
  return m.edge[k] >= 0 && ctx->needs_input_grad(static_cast<size_t>(m.edge[k]));
}

// A per-channel gradient (float32 or float64 from the kernels) in its parameter's dtype, or undefined
// when it is not needed. float16/bfloat16 parameters on the CPU are converted here in a loop: .to()
// went through five dispatcher calls for 2x64 values, ~3 % of a small layer's step.
at::Tensor param_grad(bool need, const at::Tensor& g, at::ScalarType dtype) {
  if (!need) return at::Tensor();
  if (g.scalar_type() == dtype) return g;
  if (g.is_cpu() && g.scalar_type() == at::kFloat && g.dim() == 1 && g.is_contiguous() &&
      (dtype == at::kHalf || dtype == at::kBFloat16) && !g.requires_grad()) {
    at::Tensor r = at::detail::empty_cpu({g.numel()}, dtype, /*pin_memory=*/false, c10::nullopt);
    const float* src = g.const_data_ptr<float>();
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "param_grad", [&] {
      scalar_t* dst = r.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < g.numel(); ++i) dst[i] = static_cast<scalar_t>(src[i]);  // round to nearest, as .to()
    });
    return r;
  }
  return g.to(dtype);
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
    remember(ctx, training, eps, weight, bias, {true, present(weight), present(bias)}, {mean, invstd, var});
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const OptTensor w = weight.defined() ? OptTensor(weight) : c10::nullopt;
    const OptTensor b = bias.defined() ? OptTensor(bias) : c10::nullopt;
    const Meta meta = Meta::unpack(ctx->saved_data["meta"].toInt());
    const bool training = meta.training;
    const bool need_in = needs(ctx, meta, 0), need_w = needs(ctx, meta, 1), need_b = needs(ctx, meta, 2);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(7);  // no gradient reached the output: none flows back
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
    return {need_in ? in_dtype(gi, input) : at::Tensor(), param_grad(need_w, gw, meta.w_dtype),
            param_grad(need_b, gb, meta.b_dtype), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
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
    remember(ctx, training, eps, weight, bias, {true, true, present(weight), present(bias)}, {mean, invstd, var});
    return {out, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &out = saved[0], &input = saved[1], &weight = saved[2], &mean = saved[3], &invstd = saved[4];
    const OptTensor w = weight.defined() ? OptTensor(weight) : c10::nullopt;
    const Meta meta = Meta::unpack(ctx->saved_data["meta"].toInt());
    const bool training = meta.training;
    const bool need_in = needs(ctx, meta, 0), need_res = needs(ctx, meta, 1), need_w = needs(ctx, meta, 2),
               need_b = needs(ctx, meta, 3);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return variable_list(8);
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
    return {need_in ? in_dtype(gi, input) : at::Tensor(), need_res ? gr : at::Tensor(),
            param_grad(need_w, gw, meta.w_dtype), param_grad(need_b, gb, meta.b_dtype),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

Quad as_quad(const variable_list& v) { return {v[0], v[1], v[2], v[3]}; }

// As stock's autograd kernel of native_batch_norm, with its message: while grad mode is on, running
// statistics that require grad are refused (in training they would be updated in place, and no
// gradient flows to them).
void check_stats_need_no_grad(const OptTensor& running_mean, const OptTensor& running_var) {
  if (!at::GradMode::is_enabled()) return;
  TORCH_CHECK(!(present(running_mean) && running_mean->requires_grad()),
              "The function 'native_batch_norm' is not differentiable with respect to argument 'running_mean'. "
              "This input cannot have requires_grad True.");
  TORCH_CHECK(!(present(running_var) && running_var->requires_grad()),
              "The function 'native_batch_norm' is not differentiable with respect to argument 'running_var'. "
              "This input cannot have requires_grad True.");
}

Quad bn_relu_fwd_autograd(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                          const OptTensor& running_mean, const OptTensor& running_var, bool training, double eps) {
  check_stats_need_no_grad(running_mean, running_var);
  return as_quad(BnReluFunction::apply(input, weight, bias, running_mean, running_var, training, eps));
}

Quad bn_add_relu_fwd_autograd(const at::Tensor& input, const at::Tensor& residual, const OptTensor& weight,
                              const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                              bool training, double eps) {
  check_stats_need_no_grad(running_mean, running_var);
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

template <typename batch_t>
void update_from(at::Tensor& running, const batch_t* bp, int64_t bstride, int64_t C, double momentum, double factor) {
  const int64_t stride = running.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_update_running_stats_", [&] {
    scalar_t* rp = running.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      scalar_t& r = rp[c * stride];
      const double b = static_cast<double>(bp[c * bstride]);
      r = static_cast<scalar_t>(momentum * (b * factor) + (1.0 - momentum) * static_cast<double>(r));
    }
  });
}

void update_one(at::Tensor& running, const at::Tensor& batch, double momentum, double factor) {
  // The batch statistics are the forward's (float32, or float64): read in place, widened exactly.
  if (batch.dim() == 1 && batch.scalar_type() == at::kFloat)
    return update_from(running, batch.const_data_ptr<float>(), batch.stride(0), batch.numel(), momentum, factor);
  if (batch.dim() == 1 && batch.scalar_type() == at::kDouble)
    return update_from(running, batch.const_data_ptr<double>(), batch.stride(0), batch.numel(), momentum, factor);
  const at::Tensor b = batch.to(at::kDouble).contiguous();
  update_from(running, b.const_data_ptr<double>(), 1, b.numel(), momentum, factor);
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

// ---------------------------------------------------------------------------------------------------
// bn_relu / bn_add_relu: the forward (through its autograd kernel above) and the running-statistics
// update, as torchfast.nn.functional did with two ops from Python.

void update_after_forward(const at::Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                          const at::Tensor& mean, const at::Tensor& var, bool training, double momentum) {
  if (!training || !(present(running_mean) || present(running_var))) return;
  const int64_t C = input.size(1);
  const int64_t count = C > 0 ? input.numel() / C : 0;
  if (count == 0) return;
  static const auto update = op_handle("torchfast::bn_update_running_stats_").typed<void(
      const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, double, int64_t)>();
  update.call(running_mean, running_var, mean, var, momentum, count);
}

// What F.batch_norm refuses that the forward ops' own checks let through: torchfast.nn.functional
// calls the whole-call ops without its Python checks (they cost a small layer ~5 us per call) and
// runs them only to word the error as stock does, so every refusal of stock's must come from here.
// Every tensor on the input's device: the dispatcher would otherwise pick the kernel of the other
// device (a meta weight with a CPU input ran the meta kernel and returned meta tensors).
void check_batch(const at::Tensor& input, bool training, std::initializer_list<const OptTensor*> others) {
  TORCH_CHECK_VALUE(!(training && input.dim() >= 2 && input.size(1) > 0 && input.numel() / input.size(1) == 1),
                    "Expected more than 1 value per channel when training, got input size ", input.sizes());
  for (const OptTensor* t : others)
    TORCH_CHECK(!present(*t) || (*t)->device() == input.device(), "a tensor argument is on ", (*t)->device(),
                " but input is on ", input.device());
}

at::Tensor bn_relu_whole(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                         double eps) {
  check_batch(input, training, {&weight, &bias, &running_mean, &running_var});
  static const auto fwd = op_handle("torchfast::bn_relu_fwd").typed<Quad(
      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool, double)>();
  auto [out, mean, invstd, var] = fwd.call(input, weight, bias, running_mean, running_var, training, eps);
  update_after_forward(input, running_mean, running_var, mean, var, training, momentum);
  return out;
}

at::Tensor bn_add_relu_whole(const at::Tensor& input, const at::Tensor& residual, const OptTensor& weight,
                             const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                             bool training, double momentum, double eps) {
  check_batch(input, training, {&weight, &bias, &running_mean, &running_var});
  TORCH_CHECK(residual.device() == input.device(), "residual is on ", residual.device(), " but input is on ",
              input.device());
  static const auto fwd = op_handle("torchfast::bn_add_relu_fwd").typed<Quad(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      bool, double)>();
  auto [out, mean, invstd, var] = fwd.call(input, residual, weight, bias, running_mean, running_var, training, eps);
  update_after_forward(input, running_mean, running_var, mean, var, training, momentum);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CompositeImplicitAutograd, m) {
  m.impl("bn_relu", &bn_relu_whole);
  m.impl("bn_add_relu", &bn_add_relu_whole);
}

TORCH_LIBRARY_IMPL(torchfast, Autograd, m) {
  m.impl("bn_relu_fwd", &bn_relu_fwd_autograd);
  m.impl("bn_add_relu_fwd", &bn_add_relu_fwd_autograd);
}

// ---------------------------------------------------------------------------------------------------
// The ops that write their arguments in place bump those tensors' version counters, as ATen's in-place
// ops do in their ADInplaceOrView kernels: autograd then refuses a backward whose saved tensor has been
// overwritten since ("modified by an inplace operation"), where it used the new values silently (a
// weight re-initialised, or a gradient clipped, between forward and backward). One boxed kernel reads
// which arguments the schema marks as written (Tensor(a!), Tensor(a!)?, Tensor(a!)[]). Not the
// running-statistics update: stock's native_batch_norm updates them without a bump (its schema does
// not mark them written), and a bump would refuse backwards stock runs (an eval-mode forward's saved
// statistics, updated by a later training forward).

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) written.push_back(v.toTensor());
    else if (v.isTensorList())
      for (const at::Tensor& t : v.toTensorVector()) written.push_back(t);
  }
  // Refused before anything is written (bump_version below would raise only after the kernel ran).
  for (const at::Tensor& t : written)
    TORCH_CHECK(!t.defined() || !t.is_inference() || c10::InferenceMode::is_enabled(),
                "Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to "
                "get a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for "
                "more details.");
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written)
    if (t.defined()) torch::autograd::impl::bump_version(t);
}

TORCH_LIBRARY_IMPL(torchfast, ADInplaceOrView, m) {
  for (const char* name : {"multi_tensor_clip_", "clip_grad_norm_fused_", "philox_fill_"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

TORCH_LIBRARY_IMPL(torchfast, CPU, m) { m.impl("bn_update_running_stats_", &bn_update_running_stats_cpu); }

TORCH_LIBRARY_IMPL(torchfast, CompositeExplicitAutograd, m) {
  m.impl("bn_update_running_stats_", &bn_update_running_stats_any);
}

}  // namespace torchfast
