// The clipping loops' interface, one namespace per instruction set (see clip_grad_kernels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace torchfast {

enum class NormKind { kOne, kTwo, kInf, kP };

// One chunk of the multi-tensor table as the loops see it: n elements from data.
struct Span {
  void* data;
  int64_t n;
};

// norm_partials: partial[i] = sum |x|^p over spans[i] (max |x| for kInf, NaN if any is NaN), as a
// double, for i < count. Each partial depends only on its span's elements (fixed lanes, fixed order).
// scale_spans: x *= coef over every span (in the opmath type, rounded once).
#define TORCHFAST_CLIP_KERNEL_DECLS                                                                    \
  template <typename scalar_t>                                                                          \
  void norm_partials(NormKind kind, const Span* spans, int64_t count, double p, double* partial); \
  template <typename scalar_t>                                                                          \
  void scale_spans(const Span* spans, int64_t count, double coef);

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
