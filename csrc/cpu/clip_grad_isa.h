// The clipping loops' interface, one namespace per instruction set (see clip_grad_kernels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torchfast {

enum class NormKind { kOne, kTwo, kInf, kP };

// norm_partial: sum |x|^p over n elements (max |x| for kInf, NaN if any is NaN), as a double.
// scale: x *= coef over n elements (in the opmath type, rounded once).
#define TORCHFAST_CLIP_KERNEL_DECLS                                          \
  template <typename scalar_t>                                                \
  double norm_partial(NormKind kind, const scalar_t* x, int64_t n, double p); \
  template <typename scalar_t>                                                \
  void scale(scalar_t* x, int64_t n, double coef);

namespace clip_base {
TORCHFAST_CLIP_KERNEL_DECLS
}
namespace clip_avx2 {
TORCHFAST_CLIP_KERNEL_DECLS
}
namespace clip_avx512 {
TORCHFAST_CLIP_KERNEL_DECLS
}
#undef TORCHFAST_CLIP_KERNEL_DECLS

}  // namespace torchfast
