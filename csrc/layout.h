// Layout and argument helpers shared by the CPU and CUDA BatchNorm+ReLU kernels.
#pragma once

#include <ATen/ATen.h>

namespace torchfast {

// Layouts the BatchNorm+ReLU kernels address natively: contiguous (N, C, *) and channels_last
// (N, *, C) for 4-d and 5-d tensors. Anything else is made contiguous first.
inline bool native_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// t, an activation of x's shape, with its elements at x's offsets: t itself when they already are
// (strides equal wherever a size exceeds 1), else a copy in x's memory format. x is in a native
// layout, so the kernels then index every activation of a pass alike.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& x) {
  bool same = true;
  for (int64_t d = 0; d < x.dim(); ++d) same = same && (x.size(d) <= 1 || t.stride(d) == x.stride(d));
  if (same) return t;
  const auto format = x.is_contiguous() ? at::MemoryFormat::Contiguous
                      : x.dim() == 4    ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::ChannelsLast3d;
  return t.contiguous(format);
}

// The backward's grad_out must match the saved input in shape and dtype.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but input has ",
              input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
              " but input is ", input.scalar_type());
}

}  // namespace torchfast
