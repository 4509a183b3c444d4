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

// The backward's grad_out must match the saved input in shape and dtype.
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but input has ",
              input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
              " but input is ", input.scalar_type());
}

}  // namespace torchfast
