// The multi-tensor clipping loops (one chunk's norm partial, one range's scaling), compiled once per
// instruction set: clip_base in clip_grad.cpp, clip_avx2 / clip_avx512 in clip_grad_isa.cpp under
// `#pragma GCC target`. clip_grad.cpp picks a set at run time (cpu_features); all sets compute the same
// sums in the same order (the lanes are fixed, not the vector width), so the norm does not depend on
// which set runs. No include guard: included once per set, with TORCHFAST_CLIP_ISA naming it.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/clip_grad_isa.h"

#ifndef TORCHFAST_CLIP_ISA
#error "define TORCHFAST_CLIP_ISA (the namespace) before including clip_grad_kernels.h"
#endif

namespace torchfast {
namespace TORCHFAST_CLIP_ISA {
namespace {

// kLanes independent partial sums: the loop vectorises into several accumulator registers, so it is
// not bound by the latency of one chain of adds (a single vector accumulator made the 2-norm of
// ResNet-50's gradients 15 % slower than stock on one thread). Element i + j of every group of kLanes
// goes to lane j; n is a multiple of kLanes. Lanes are combined in a fixed order by the caller.
constexpr int64_t kLanes = 32;

template <typename T, typename acc_t, NormKind K>
void add_lanes(const T* x, int64_t n, acc_t p, acc_t (&lanes)[kLanes]) {
  // A local copy: `lanes` may alias x (both float) for all the compiler knows, which kept the
  // accumulators in memory (a reload and a store per vector per step); the copy lives in registers.
  // Same sums in the same order. (The 2-core VM's norm pass is memory-bound either way.)
  acc_t acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = lanes[j];
  for (int64_t i = 0; i < n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t a = std::abs(static_cast<acc_t>(x[i + j]));
      if constexpr (K == NormKind::kOne) acc[j] += a;
      else if constexpr (K == NormKind::kTwo) acc[j] += a * a;
      else acc[j] += std::pow(a, p);
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) lanes[j] = acc[j];
}

#if defined(TORCHFAST_CLIP_F16C)  // the vector sets (see clip_grad_isa.cpp)
constexpr int64_t kHalfBlock = 1024;  // a multiple of kLanes and of 8

// n % 8 == 0 float16 values widened to float (exactly), 8 per F16C instruction.
inline void half_to_float8(const c10::Half* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    _mm256_store_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
}
#endif

// Partial of one chunk: sum |x|^p (or max |x| for inf, NaN if any element is NaN) in acc_t. The
// simd reductions fix the summation order per build, independent of the thread count.
template <typename scalar_t, typename acc_t, NormKind K>
double chunk_partial(const scalar_t* x, int64_t n, acc_t p) {
  if constexpr (K == NormKind::kInf) {
    acc_t m = 0;
    int nan = 0;
#if defined(TORCHFAST_CLIP_F16C)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {  // max is order-free: blocks widened first
      alignas(32) float buf[kHalfBlock];
      const int64_t body = n - n % 8;
      for (int64_t b = 0; b < body; b += kHalfBlock) {
        const int64_t len = std::min(kHalfBlock, body - b);
        half_to_float8(x + b, buf, len);
#pragma omp simd reduction(max : m) reduction(| : nan)
        for (int64_t i = 0; i < len; ++i) {
          const acc_t a = std::abs(buf[i]);
          nan |= (a != a);
          m = a > m ? a : m;
        }
      }
      for (int64_t i = body; i < n; ++i) {
        const acc_t a = std::abs(static_cast<acc_t>(x[i]));
        nan |= (a != a);
        m = a > m ? a : m;
      }
      return nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m);
    }
#endif
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = std::abs(static_cast<acc_t>(x[i]));
      nan |= (a != a);
      m = a > m ? a : m;
    }
    return nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m);
  } else {
    acc_t lanes[kLanes] = {};
    const int64_t body = n - n % kLanes;
#if defined(TORCHFAST_CLIP_F16C)
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      // float16 through F16C: blocks widened to float (exactly), then the float lanes: the same sums
      // in the same order as the element-wise conversion, whose loop does not vectorise (0.7x stock).
      alignas(32) float buf[kHalfBlock];
      for (int64_t b = 0; b < body; b += kHalfBlock) {
        const int64_t m = std::min(kHalfBlock, body - b);
        half_to_float8(x + b, buf, m);
        add_lanes<float, acc_t, K>(buf, m, p, lanes);
      }
    } else {
      add_lanes<scalar_t, acc_t, K>(x, body, p, lanes);
    }
#else
    add_lanes<scalar_t, acc_t, K>(x, body, p, lanes);
#endif
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
  int64_t i = 0;
#if defined(TORCHFAST_CLIP_F16C)
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {  // the same rounding (nearest even), 8 at a time
    const __m256 c = _mm256_set1_ps(coef);
    for (; i + 16 <= n; i += 16) {  // two vectors a step (see the float loop below)
      __m128i* p = reinterpret_cast<__m128i*>(x + i);
      const __m256 v0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), c);
      const __m256 v1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p + 1)), c);
      _mm_storeu_si128(p, _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(p + 1, _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i + 8 <= n; i += 8) {
      __m128i* p = reinterpret_cast<__m128i*>(x + i);
      const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), c);
      _mm_storeu_si128(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // c10's rounding (nearest even, NaN -> 0x7FC0) in bit operations, 8 at a time: through c10's
    // conversion operator the loop does not vectorise (0.21x stock's scaling of ResNet-50's grads).
    const __m256 c = _mm256_set1_ps(coef);
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
    for (; i + 8 <= n; i += 8) {
      __m128i* p = reinterpret_cast<__m128i*>(x + i);
      const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16);
      const __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(w), c);
      const __m256i u = _mm256_castps_si256(v);
      __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one));
      r = _mm256_srli_epi32(r, 16);
      r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      _mm_storeu_si128(p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08)));
    }
  }
#endif
  // Blocks of 32 elements, each one vectorised loop of fixed length (4 AVX2 vectors unrolled): one
  // vector per loop step measured 7-10 % slower on one thread (a standalone 102 MB in-place scale on
  // the 2-core VM, three interleaved runs), as the loop instructions per cache line limit how far
  // ahead a core's loads run; stock's loops take two vectors a step. Same products.
  for (; i + 32 <= n; i += 32) {
#pragma omp simd
    for (int64_t j = 0; j < 32; ++j) x[i + j] = static_cast<scalar_t>(static_cast<acc_t>(x[i + j]) * coef);
  }
#pragma omp simd
  for (int64_t j = i; j < n; ++j) x[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * coef);
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
