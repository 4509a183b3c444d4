// The multi-tensor clipping loops (one chunk's norm partial, one range's scaling), compiled once per
// instruction set: clip_base in clip_grad.cpp, clip_avx2 / clip_avx512 in clip_grad_isa.cpp under
// `#pragma GCC target`. clip_grad.cpp picks a set at run time (cpu_features); all sets compute the same
// sums in the same order (the lanes are fixed, not the vector width), so the norm does not depend on
// which set runs. No include guard: included once per set, with TORCHFAST_CLIP_ISA naming it.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/clip_grad_isa.h"

#ifndef TORCHFAST_CLIP_ISA
#error "define TORCHFAST_CLIP_ISA (the namespace) before including clip_grad_kernels.h"
#endif

namespace torchfast {
namespace TORCHFAST_CLIP_ISA {
namespace {

// Partial of one chunk: sum |x|^p (or max |x| for inf, NaN if any element is NaN) in acc_t. The
// simd reductions fix the summation order per build, independent of the thread count.
template <typename scalar_t, typename acc_t, NormKind K>
double chunk_partial(const scalar_t* x, int64_t n, acc_t p) {
  if constexpr (K == NormKind::kInf) {
    acc_t m = 0;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = std::abs(static_cast<acc_t>(x[i]));
      nan |= (a != a);
      m = a > m ? a : m;
    }
    return nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m);
  } else {
    // kLanes independent partial sums: the loop vectorises into several accumulator registers, so
    // it is not bound by the latency of one chain of adds (a single vector accumulator made the
    // 2-norm of ResNet-50's gradients 15 % slower than stock on one thread). Lanes are combined in
    // a fixed order.
    constexpr int64_t kLanes = 32;
    acc_t lanes[kLanes] = {};
    const int64_t body = n - n % kLanes;
    for (int64_t i = 0; i < body; i += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const acc_t a = std::abs(static_cast<acc_t>(x[i + j]));
        if constexpr (K == NormKind::kOne) lanes[j] += a;
        else if constexpr (K == NormKind::kTwo) lanes[j] += a * a;
        else lanes[j] += std::pow(a, p);
      }
    }
    for (int64_t i = body; i < n; ++i) {
      const acc_t a = std::abs(static_cast<acc_t>(x[i]));
      if constexpr (K == NormKind::kOne) lanes[i - body] += a;
      else if constexpr (K == NormKind::kTwo) lanes[i - body] += a * a;
      else lanes[i - body] += std::pow(a, p);
    }
    double s = 0.0;
    for (int64_t j = 0; j < kLanes; ++j) s += static_cast<double>(lanes[j]);
    return s;
  }
}

template <typename scalar_t, typename acc_t>
void scale_range(scalar_t* x, int64_t n, acc_t coef) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * coef);
}

}  // namespace

template <typename scalar_t>
double norm_partial(NormKind kind, const scalar_t* x, int64_t n, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pp = static_cast<acc_t>(p);
  switch (kind) {
    case NormKind::kOne: return chunk_partial<scalar_t, acc_t, NormKind::kOne>(x, n, pp);
    case NormKind::kTwo: return chunk_partial<scalar_t, acc_t, NormKind::kTwo>(x, n, pp);
    case NormKind::kInf: return chunk_partial<scalar_t, acc_t, NormKind::kInf>(x, n, pp);
    default: return chunk_partial<scalar_t, acc_t, NormKind::kP>(x, n, pp);
  }
}

template <typename scalar_t>
void scale(scalar_t* x, int64_t n, double coef) {
  using acc_t = at::opmath_type<scalar_t>;
  scale_range<scalar_t, acc_t>(x, n, static_cast<acc_t>(coef));
}

template double norm_partial<float>(NormKind, const float*, int64_t, double);
template double norm_partial<double>(NormKind, const double*, int64_t, double);
template double norm_partial<c10::Half>(NormKind, const c10::Half*, int64_t, double);
template double norm_partial<c10::BFloat16>(NormKind, const c10::BFloat16*, int64_t, double);
template void scale<float>(float*, int64_t, double);
template void scale<double>(double*, int64_t, double);
template void scale<c10::Half>(c10::Half*, int64_t, double);
template void scale<c10::BFloat16>(c10::BFloat16*, int64_t, double);

}  // namespace TORCHFAST_CLIP_ISA
}  // namespace torchfast
