// Layout helpers shared by the CPU and CUDA kernels.
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

}  // namespace torchfast
