// The CPU BatchNorm(+add)+ReLU kernels behind one interface, compiled once per instruction set:
// bn_cpu_base (the build's baseline, SSE2 on x86-64) in bn_relu.cpp and bn_cpu_avx2 (AVX2, 8-float
// vectors) in bn_relu_avx2.cpp, both from bn_relu_kernels.h. bn_relu.cpp checks and allocates, then
// calls the set the running CPU supports (cpu_features::has_avx2; TORCHFAST_NO_AVX2=1 forces the base).
#pragma once

#include <ATen/ATen.h>

namespace torchfast {

// forward: y = relu((x - mean) * scale + shift [+ res]); mean/invstd/var: the batch statistics in
// training, the running ones in eval. backward: grad_in (and grad_res for bn_add_relu, where `o` is the
// saved output and the mask is o > 0), grad_w, grad_b. All full-size tensors share x's layout
// (contiguous or channels_last); res / o / grad_res are undefined for bn_relu. stats, backward_reduce
// (float64 sums) and backward_apply are the local pieces of the synchronised layers.
#define TORCHFAST_BN_KERNEL_DECLS                                                                           \
  void forward(const at::Tensor& x, const at::Tensor& res, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd, \
               at::Tensor& var, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,  \
               const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,     \
               bool training, double eps);                                                                   \
  void backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& o, at::Tensor& grad_in,           \
                at::Tensor& grad_res, at::Tensor& grad_w, at::Tensor& grad_b,                                 \
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,               \
                const at::Tensor& mean, const at::Tensor& invstd, bool training, double mask_thr);             \
  void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var);                                        \
  void backward_reduce(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& o, at::Tensor& grad_res,   \
                       const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,         \
                       const at::Tensor& mean, const at::Tensor& invstd, double mask_thr, at::Tensor& sum_dy,  \
                       at::Tensor& sum_dy_xmu);                                                                \
  void backward_apply(const at::Tensor& x, const at::Tensor& grad, bool mask_from_input, at::Tensor& grad_in,  \
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,          \
                      const at::Tensor& mean, const at::Tensor& invstd, double mask_thr,                       \
                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count);

namespace bn_cpu_base {
TORCHFAST_BN_KERNEL_DECLS
}
namespace bn_cpu_avx2 {
TORCHFAST_BN_KERNEL_DECLS
}
#undef TORCHFAST_BN_KERNEL_DECLS

}  // namespace torchfast
