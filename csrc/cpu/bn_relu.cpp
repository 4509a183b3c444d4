// Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU on the CPU: the ops (argument checks,
// layouts, allocation) and their registration. The kernels are in bn_relu_kernels.h, compiled here for
// the baseline instruction set and in bn_relu_avx2.cpp for AVX2; kernels() picks one at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#define TORCHFAST_STREAM_STORES 1
#endif

#include "cpu/half_convert.h"
#include "layout.h"
#include "cpu/cpu_features.h"

#define TORCHFAST_BN_ISA bn_cpu_base
#include "cpu/bn_relu_kernels.h"
#undef TORCHFAST_BN_ISA

#if defined(__x86_64__) && defined(__GNUC__)
#define TORCHFAST_BN_HAVE_AVX2 1  // bn_relu_avx2.cpp compiles the AVX2 set
#endif

namespace torchfast {
namespace {

struct Kernels {
  decltype(&bn_cpu_base::forward) forward;
  decltype(&bn_cpu_base::backward) backward;
  decltype(&bn_cpu_base::stats) stats;
  decltype(&bn_cpu_base::backward_reduce) backward_reduce;
  decltype(&bn_cpu_base::backward_apply) backward_apply;
};

const Kernels& kernels() {
#if defined(TORCHFAST_BN_HAVE_AVX2)
  static const Kernels avx2{&bn_cpu_avx2::forward, &bn_cpu_avx2::backward, &bn_cpu_avx2::stats,
                            &bn_cpu_avx2::backward_reduce, &bn_cpu_avx2::backward_apply};
  if (cpu_features::has_avx2()) return avx2;
#endif
  static const Kernels base{&bn_cpu_base::forward, &bn_cpu_base::backward, &bn_cpu_base::stats,
                            &bn_cpu_base::backward_reduce, &bn_cpu_base::backward_apply};
  return base;
}

// ---------------------------------------------------------------------------------------------

// float16 and bfloat16 run in the kernels, converted in blocks (see half_convert.h); float16 needs
// F16C for that. Without it float16 goes through float32 copies: GCC does not vectorise the
// element-wise float16 conversions, and ATen's (runtime-dispatched) conversions plus the float32
// kernels measured 0.4x stock instead of 0.06x.
bool half_through_float_copies(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf && !cpu_features::has_f16c();
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input is on ", input.device(), ", expected cpu");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have at least 2 dimensions (N, C, ...), got ", input.dim());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
}

void check_channel_vector(const c10::optional<at::Tensor>& t, int64_t C, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(), ", expected cpu");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (", C, ",), got ", t->sizes());
}

// The per-channel arguments of the backward ops: the affine parameters and the saved statistics.
void check_backward_vectors(int64_t C, const char* op, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd) {
  check_channel_vector(weight, C, op, "weight");
  check_channel_vector(bias, C, op, "bias");
  check_channel_vector(mean, C, op, "mean");
  check_channel_vector(invstd, C, op, "invstd");
}

// Shared by the bn_relu and bn_add_relu ops: `residual` / `out` are undefined for bn_relu.
void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " has shape ", t.sizes(), " but input has ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but input is ",
              input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const char* op, const at::Tensor& input, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  check_input(input, op);
  const bool add = residual.defined();
  if (add) check_like_input(residual, input, op, "residual");
  if (half_through_float_copies(input)) {
    // The float32 kernels compute exactly what the float16 ones would (float32 math, one rounding).
    auto [out, mean, invstd, var] =
        forward_cpu(op, input.to(at::kFloat), add ? residual.to(at::kFloat) : residual, weight, bias, running_mean,
                    running_var, training, eps);
    return {out.to(input.scalar_type()), mean, invstd, var};
  }
  const int64_t C = input.size(1);
  check_channel_vector(weight, C, op, "weight");
  check_channel_vector(bias, C, op, "bias");
  check_channel_vector(running_mean, C, op, "running_mean");
  check_channel_vector(running_var, C, op, "running_var");
  TORCH_CHECK(training || (running_mean.has_value() && running_var.has_value()), op,
              ": eval mode needs running_mean and running_var");
  // A non-native input is made contiguous; a residual in another layout is brought to x's.
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor res = add ? in_layout_of(residual, x) : residual;
  at::Tensor out = at::empty_like(input);
  at::Tensor y = native ? out : at::empty_like(x);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = input.options().dtype(acc_type);
  at::Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts), var = at::empty({C}, opts);
  kernels().forward(x, res, y, mean, invstd, var, weight, bias, running_mean, running_var, training, eps);
  if (!native) out.copy_(y);
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  return forward_cpu("bn_relu_fwd", input, at::Tensor(), weight, bias, running_mean, running_var, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  TORCH_CHECK(residual.defined(), "bn_add_relu_fwd: residual is undefined");
  return forward_cpu("bn_add_relu_fwd", input, residual, weight, bias, running_mean, running_var, training, eps);
}

// Backward of both ops. bn_relu (saved_out undefined): the mask is recomputed from the input with the
// forward's scale and shift. bn_add_relu: the mask is saved_out > 0, the masked gradient is written to
// grad_residual by the reduction pass and read back by the elementwise pass.
// Returns (grad_input, grad_residual or undefined, grad_weight, grad_bias).
// bn_relu's recomputed mask is v > T, T the largest float that rounds to 0 in the output's dtype
// (round to nearest even: the tie at half the smallest subnormal goes to 0): exactly where the forward
// stored a positive output, so no gradient reaches an element whose output is 0.
double mask_threshold(at::ScalarType t) {
  if (t == at::kHalf) return std::ldexp(1.0, -25);
  if (t == at::kBFloat16) return std::ldexp(1.0, -134);
  return 0.0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const char* op, const at::Tensor& grad_out, const at::Tensor& saved_out, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, double mask_thr) {
  check_input(input, op);
  const int64_t C = input.size(1);
  check_grad_out(grad_out, input, op);
  const bool add = saved_out.defined();
  if (add) check_like_input(saved_out, input, op, "out");
  if (half_through_float_copies(input)) {  // as in the forward
    auto [grad_in, grad_res, grad_w, grad_b] =
        backward_cpu(op, grad_out.to(at::kFloat), add ? saved_out.to(at::kFloat) : saved_out, input.to(at::kFloat),
                     weight, bias, mean, invstd, training, mask_thr);
    return {grad_in.to(input.scalar_type()), add ? grad_res.to(input.scalar_type()) : grad_res, grad_w, grad_b};
  }
  check_backward_vectors(C, op, weight, bias, mean, invstd);
  // A non-native input is made contiguous; grad_out and out in another layout are brought to x's
  // (a channels_last network's first BatchNorm gets a contiguous gradient from the pooling's backward:
  // one copy of it, not copies of everything there and back).
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor dy = in_layout_of(grad_out, x);
  const at::Tensor o = add ? in_layout_of(saved_out, x) : saved_out;
  at::Tensor grad_in = at::empty_like(x);
  at::Tensor grad_res = add ? at::empty_like(x) : at::Tensor();
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = input.options().dtype(acc_type);
  at::Tensor grad_w = at::empty({C}, opts), grad_b = at::empty({C}, opts);
  kernels().backward(x, dy, o, grad_in, grad_res, grad_w, grad_b, weight, bias, mean, invstd, training, mask_thr);
  if (!native) {
    // Outputs in the input's layout, as the forward's.
    grad_in = at::empty_like(input).copy_(grad_in);
    if (add) grad_res = at::empty_like(input).copy_(grad_res);
  }
  return {grad_in, grad_res, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const c10::optional<at::Tensor>& bias,
                                                               const at::Tensor& mean, const at::Tensor& invstd,
                                                               bool training) {
  auto [grad_in, grad_res, grad_w, grad_b] =
      backward_cpu("bn_relu_bwd", grad_out, at::Tensor(), input, weight, bias, mean, invstd, training,
                   mask_threshold(input.scalar_type()));
  return {grad_in, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  TORCH_CHECK(out.defined(), "bn_add_relu_bwd: out is undefined");
  return backward_cpu("bn_add_relu_bwd", grad_out, out, input, weight, c10::nullopt, mean, invstd, training, 0.0);
}

// ---------------------------------------------------------------------------------------------
// The local pieces of the synchronised layers (see schemas.h).

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  const char* op = "bn_stats";
  check_input(input, op);
  if (half_through_float_copies(input)) return bn_stats_cpu(input.to(at::kFloat));
  const int64_t C = input.size(1);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({C}, input.options().dtype(acc_type)), var = at::empty({C}, input.options().dtype(acc_type));
  if (input.numel() == 0) {  // no statistics: NaN, as the training forward's
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  kernels().stats(native_layout(input) ? input : input.contiguous(), mean, var);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_bwd_reduce_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& out, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const char* op = "bn_relu_bwd_reduce";
  check_input(input, op);
  check_grad_out(grad_out, input, op);
  const bool add = out.has_value() && out->defined();
  if (add) check_like_input(*out, input, op, "out");
  if (half_through_float_copies(input)) {
    auto [s1, s2, gm] = bn_relu_bwd_reduce_cpu(grad_out.to(at::kFloat),
                                               add ? c10::optional<at::Tensor>(out->to(at::kFloat)) : c10::nullopt,
                                               input.to(at::kFloat), weight, bias, mean, invstd);
    return {s1, s2, add ? gm.to(input.scalar_type()) : gm};
  }
  const int64_t C = input.size(1);
  check_backward_vectors(C, op, weight, bias, mean, invstd);
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor dy = in_layout_of(grad_out, x);
  const at::Tensor o = add ? in_layout_of(*out, x) : at::Tensor();
  at::Tensor gm = add ? at::empty_like(x) : at::empty({0}, input.options());
  auto opts = input.options().dtype(at::kDouble);
  at::Tensor sum_dy = at::zeros({C}, opts), sum_dy_xmu = at::zeros({C}, opts);
  if (input.numel() > 0)
    kernels().backward_reduce(x, dy, o, gm, weight, bias, mean, invstd, mask_threshold(input.scalar_type()), sum_dy,
                              sum_dy_xmu);
  if (add && !native) gm = at::empty_like(input).copy_(gm);
  return {sum_dy, sum_dy_xmu, gm};
}

at::Tensor bn_relu_bwd_elemt_cpu(const at::Tensor& grad, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count,
                                 bool mask_from_input) {
  const char* op = "bn_relu_bwd_elemt";
  check_input(input, op);
  check_grad_out(grad, input, op);
  if (half_through_float_copies(input))
    return bn_relu_bwd_elemt_cpu(grad.to(at::kFloat), input.to(at::kFloat), weight, bias, mean, invstd, sum_dy,
                                 sum_dy_xmu, count, mask_from_input)
        .to(input.scalar_type());
  const int64_t C = input.size(1);
  check_backward_vectors(C, op, weight, bias, mean, invstd);
  check_channel_vector(sum_dy, C, op, "sum_dy");
  check_channel_vector(sum_dy_xmu, C, op, "sum_dy_xmu");
  TORCH_CHECK(sum_dy.scalar_type() == at::kDouble && sum_dy_xmu.scalar_type() == at::kDouble, op,
              ": sum_dy and sum_dy_xmu must be float64 (bn_relu_bwd_reduce's), got ", sum_dy.scalar_type(), " and ",
              sum_dy_xmu.scalar_type());
  TORCH_CHECK(count >= input.numel() / std::max<int64_t>(C, 1), op, ": count (", count,
              ") is smaller than this input's elements per channel");
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor g = in_layout_of(grad, x);
  at::Tensor grad_in = at::empty_like(x);
  if (input.numel() > 0)
    kernels().backward_apply(x, g, mask_from_input, grad_in, weight, bias, mean, invstd,
                             mask_threshold(input.scalar_type()), sum_dy.contiguous(), sum_dy_xmu.contiguous(), count);
  if (!native) grad_in = at::empty_like(input).copy_(grad_in);
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_relu_bwd_reduce", &bn_relu_bwd_reduce_cpu);
  m.impl("bn_relu_bwd_elemt", &bn_relu_bwd_elemt_cpu);
  m.impl("bn_relu_fwd", &bn_relu_fwd_cpu);
  m.impl("bn_relu_bwd", &bn_relu_bwd_cpu);
  m.impl("bn_add_relu_fwd", &bn_add_relu_fwd_cpu);
  m.impl("bn_add_relu_bwd", &bn_add_relu_bwd_cpu);
}

}  // namespace torchfast
