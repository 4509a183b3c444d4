// Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU on the CPU: the kernels. Included once per
// instruction set (see bn_relu_isa.h) with TORCHFAST_BN_ISA naming the namespace; bn_relu_avx2.cpp
// includes it under `#pragma GCC target("avx2")` with TORCHFAST_BN_AVX2 defined (GCC does not define
// __AVX2__ there), after every header, so only this code is compiled for AVX2.
//
// Passes over memory (M = N * spatial elements per channel; counts in activation-sized tensors):
//   bn_relu training forward: statistics pass (read x), normalise+ReLU pass (read x, write y): 2 reads, 1 write
//   bn_relu eval forward:     one pass (read x, write y)
//   bn_relu backward:         reduction pass (read x, dy) and elementwise pass (read x, dy, write dx): 4 reads,
//                             1 write; the ReLU mask is recomputed from x, nothing intermediate is materialised.
//   bn_add_relu forward:      as bn_relu, the elementwise pass also reads the residual: 3 reads, 1 write
//   bn_add_relu backward:     reduction pass (read dy, out, x; write grad_residual = dy masked by out > 0) and
//                             elementwise pass (read grad_residual, x; write dx): 5 reads, 2 writes.
// Layouts handled natively: contiguous (N, C, *), seen as rows of length S per (n, c), and
// channels_last (N, *, C), seen as N*S rows of C channels. Any other stride pattern is copied to
// contiguous first (output keeps the input's layout through empty_like).
//
// Statistics use sums shifted by the mean of each channel's first 32 elements (stable for large
// means), with partials in acc_t (float for fp32/fp16/bf16, double for fp64) over short runs (32
// elements, or 16 channels_last rows) folded in double; the backward's sums likewise. channels_last
// reductions are split into blocks of 64 rows x tiles of channels (ClUnits) and the blocks added in a
// fixed order, so results do not depend on the thread count.
//
// Contiguous layout with at least as many channels as threads and rows of >= 256 elements: each
// thread takes whole channels and runs both passes on one channel before the next, so the second pass
// reads the channel (N*S elements; 400 KB of x for ResNet's 32x64x56x56, 800 KB of x and dy in the
// backward) from cache rather than DRAM. Streaming (non-temporal) stores only for outputs larger than
// half the last-level cache (stream_output).
// No include guard: included once per instruction set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <unistd.h>  // sysconf

#if defined(__SSE2__)
#include <immintrin.h>
#define TORCHFAST_STREAM_STORES 1
#endif

#include "cpu/half_convert.h"
#include "layout.h"
#include "cpu/bn_relu_isa.h"

#ifndef TORCHFAST_BN_ISA
#error "define TORCHFAST_BN_ISA (the namespace) before including bn_relu_kernels.h"
#endif

namespace torchfast {
namespace TORCHFAST_BN_ISA {
namespace {

constexpr int64_t kRowsPerBlock = 64;  // channels_last rows folded per partial
// channels_last passes over wide rows walk them one tile of channels at a time, so that the tile's
// per-channel arrays (up to 7: mean, scale, shift, k0..k2, partial sums) stay in L1 while the rows
// stream by: whole rows of C = 2048 need 56 KB of them (tiles of 1024: backward 8x2048x7x7 -15 %).
// Narrower tiles cost more than they save (256: +90 % on 8x512x28x28: the rows are read in pieces).
constexpr int64_t kChanTile = 1024;
constexpr int64_t kFoldRows = 16;      // channels_last rows summed in acc_t before folding into double
constexpr int64_t kMinChannelRow = 256;  // see by_channel

enum class Layout { kNCS, kNSC };

struct Geometry {
  int64_t N, C, S;
  Layout layout;
};

Geometry geometry(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = x.numel() / std::max<int64_t>(1, g.N * g.C);
  // (N, C), and any map of one element (N, C, 1, 1), whatever its strides say: rows of C channels
  // (as contiguous rows of one element they were N * C single-element rows, 2x512x1x1: 37 us a call)
  if (x.dim() == 2 || g.S == 1) g.layout = Layout::kNSC;
  else if (x.is_contiguous()) g.layout = Layout::kNCS;
  else g.layout = Layout::kNSC;  // caller checked channels_last
  return g;
}

// A per-channel vector (weight, bias, statistics) in acc_t, `fill` where it is absent. A 1-D CPU
// vector is read in place, converted element by element (exactly what .to() rounds to); through
// .to() and .contiguous() every call was a dispatcher round trip, and for float16/bfloat16 parameters
// an allocation and a copy kernel: five of them per small layer's step, ~5 % of its instructions.
template <typename acc_t>
std::vector<acc_t> per_channel(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(C, fill);
  if (!t.has_value() || !t->defined()) return v;
  const at::Tensor& s = *t;
  const at::ScalarType dt = s.scalar_type();
  if (s.is_cpu() && s.dim() == 1 && s.numel() == C &&
      (dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16)) {
    const int64_t st = s.stride(0);
    if constexpr (std::is_same_v<acc_t, float>) {
      // float16/bfloat16 with the vector conversions (the same exact values): element by element they
      // were ~4 % of a 32x2048 float16 forward (four vectors of 2048 per call).
      if (st == 1 && dt == at::kHalf && cpu_features::has_f16c()) {
        f16c::to_float(s.const_data_ptr<c10::Half>(), v.data(), C);
        return v;
      }
      if (st == 1 && dt == at::kBFloat16) {
        f16c::to_float(s.const_data_ptr<c10::BFloat16>(), v.data(), C);
        return v;
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "per_channel", [&] {
      const scalar_t* p = s.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(p[c * st]);
    });
    return v;
  }
  at::Tensor c = s.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = c.data_ptr<acc_t>();
  std::copy(p, p + C, v.begin());
  return v;
}

// Element conversions. bfloat16/float16 <-> float are written as branch-free bit operations with
// exactly c10's results (round-to-nearest-even; NaN -> 0x7FC0 / 0x7E00) so the loops around them
// vectorise; through c10's conversion operators the half-precision kernels ran 10-14x slower than
// stock PyTorch.
template <typename acc_t, typename T>
inline acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float16 -> float, branch-free: the float multiply rebiases normal and subnormal halves exactly;
// infinities and NaNs keep their payload.
template <>
inline float to_acc<float, c10::Half>(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t em = (h & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &em, sizeof(f));
  f *= 5.192296858534828e+33f;  // 2^112
  uint32_t r;
  std::memcpy(&r, &f, sizeof(r));
  r = em >= (0x7C00u << 13) ? (em | 0x7F800000u) : r;
  r |= (h & 0x8000u) << 16;
  std::memcpy(&f, &r, sizeof(f));
  return f;
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return c10::BFloat16(v != v ? static_cast<uint16_t>(0x7FC0) : rounded, c10::BFloat16::from_bits());
}
// float -> float16 with round-to-nearest-even, branch-free (all three cases computed, one selected):
// overflow/inf -> inf, NaN -> 0x7E00, subnormal results through a float add, normals by rounding the
// mantissa; the same results as c10::Half's conversion.
template <>
inline c10::Half from_acc<c10::Half, float>(float v) {
  uint32_t f;
  std::memcpy(&f, &v, sizeof(f));
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint16_t big = f > 0x7F800000u ? 0x7E00 : 0x7C00;
  float a;
  std::memcpy(&a, &f, sizeof(a));
  a += 0.5f;  // denormal magic: (127 - 15 + 23 - 10 + 1) << 23
  uint32_t ab;
  std::memcpy(&ab, &a, sizeof(ab));
  const uint16_t sub = static_cast<uint16_t>(ab - 0x3F000000u);
  const uint16_t norm = static_cast<uint16_t>((f + 0xC8000FFFu + ((f >> 13) & 1u)) >> 13);
  const uint16_t mag = f >= (143u << 23) ? big : (f < (113u << 23) ? sub : norm);
  return c10::Half(static_cast<uint16_t>(mag | (sign >> 16)), c10::Half::from_bits());
}

// ReLU that propagates NaN like torch.relu (v < 0 is false for NaN).
template <typename acc_t>
inline acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// The ReLU-masked gradient. Both operands are evaluated before the select, so the gradient load is
// unconditional and the loop vectorises into a blend instead of a branch on random data.
template <typename acc_t>
inline acc_t masked_grad(acc_t y, acc_t g, acc_t thr = acc_t(0)) {
  return y > thr ? g : acc_t(0);
}

// The normalised value is (x - mean) * scale + shift with scale = weight * invstd and shift = bias: the
// single formula of the forward and of the backward's recomputed mask. (x * scale + (bias - mean *
// scale) would round x * scale at |mean| / std times the result's scale: 3.5x stock's error at the
// mean/std of 2.6 seen in DenseNet's layers.)
template <typename acc_t>
void scale_shift(const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd, const std::vector<acc_t>& w,
                 const std::vector<acc_t>& b, std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
  const size_t C = mean.size();
  scale.resize(C);
  shift.resize(C);
  for (size_t c = 0; c < C; ++c) {
    scale[c] = w[c] * invstd[c];
    shift[c] = b[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Per-row kernels (one contiguous run of elements of one channel, or one row of C channels).

// Sums over a row: vectorised acc_t partials over chunks of kSumChunk elements, folded into double
// (double throughout would not vectorise with the float compare of the backward and measured 5x
// slower; acc_t partials over whole rows put 4e-7 relative error into the variance).
constexpr int64_t kSumChunk = 32;

template <typename scalar_t, typename acc_t>
void row_moments(const scalar_t* x, int64_t n, acc_t K, double& s1, double& s2) {
  double d1 = 0, d2 = 0;
  for (int64_t b = 0; b < n; b += kSumChunk) {
    const int64_t e = std::min(n, b + kSumChunk);
    acc_t a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t i = b; i < e; ++i) {
      const acc_t d = to_acc<acc_t>(x[i]) - K;
      a1 += d;
      a2 += d * d;
    }
    d1 += static_cast<double>(a1);
    d2 += static_cast<double>(a2);
  }
  s1 = d1;
  s2 = d2;
}

// y = relu((x - mu) * sc + sh [+ r]) over one run of one channel; r (the residual) may be null.
template <typename scalar_t, typename acc_t>
void normalize_row(const scalar_t* x, const scalar_t* r, scalar_t* y, int64_t n, acc_t mu, acc_t sc, acc_t sh) {
  if (r == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = (to_acc<acc_t>(x[i]) - mu) * sc + sh;
      y[i] = from_acc<scalar_t, acc_t>(relu(v));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = (to_acc<acc_t>(x[i]) - mu) * sc + sh + to_acc<acc_t>(r[i]);
      y[i] = from_acc<scalar_t, acc_t>(relu(v));
    }
  }
}

// The backward's masked gradient gm = ((m - mmu) * msc + msh > 0) ? dy : 0. For bn_relu the mask
// source m is the input with the forward's mean, scale and shift (the forward's own formula); for
// bn_add_relu it is the saved output with mmu = 0, msc = 1, msh = 0 (exactly out > 0) in the
// reduction pass, and null (no mask: dy is already gm) in the elementwise pass.

// sum(gm) and sum(gm * (x - mean)) over one run of one channel; gm is also stored to gm_out unless
// that is null.
template <typename scalar_t, typename acc_t>
void backward_row_sums(const scalar_t* x, const scalar_t* dy, const scalar_t* m, scalar_t* gm_out, int64_t n,
                       acc_t mmu, acc_t msc, acc_t msh, acc_t mthr, acc_t mu, double& s1, double& s2) {
  double d1 = 0, d2 = 0;
  for (int64_t b = 0; b < n; b += kSumChunk) {
    const int64_t e = std::min(n, b + kSumChunk);
    acc_t a1 = 0, a2 = 0;
    if (gm_out == nullptr) {
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = b; i < e; ++i) {
        const acc_t xv = to_acc<acc_t>(x[i]);
        const acc_t gm = masked_grad((to_acc<acc_t>(m[i]) - mmu) * msc + msh, to_acc<acc_t>(dy[i]), mthr);
        a1 += gm;
        a2 += gm * (xv - mu);
      }
    } else {
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t i = b; i < e; ++i) {
        const acc_t xv = to_acc<acc_t>(x[i]);
        const acc_t gm = masked_grad((to_acc<acc_t>(m[i]) - mmu) * msc + msh, to_acc<acc_t>(dy[i]), mthr);
        gm_out[i] = from_acc<scalar_t, acc_t>(gm);
        a1 += gm;
        a2 += gm * (xv - mu);
      }
    }
    d1 += static_cast<double>(a1);
    d2 += static_cast<double>(a2);
  }
  s1 = d1;
  s2 = d2;
}

#if defined(__SSE2__)
// float rows: gm and x - mean in float, four lanes, exactly as the template computes them; their sums
// and products in double (a float times a float is exact in double). The backward's sums cancel --
// sum(gm) is far smaller than sum(|gm|) -- and float partials put their rounding into every element
// of dx through k1 and k2. Stock's CPU kernels accumulate these in double too. (GCC does not vectorise the mixed float/double loop itself:
// it turns the mask into a branch, 5x slower on random data.)
inline void add_products4(__m128 g, __m128 t, __m128d& s1lo, __m128d& s1hi, __m128d& s2lo, __m128d& s2hi) {
  const __m128d glo = _mm_cvtps_pd(g), ghi = _mm_cvtps_pd(_mm_movehl_ps(g, g));
  s1lo = _mm_add_pd(s1lo, glo);
  s1hi = _mm_add_pd(s1hi, ghi);
  s2lo = _mm_add_pd(s2lo, _mm_mul_pd(glo, _mm_cvtps_pd(t)));
  s2hi = _mm_add_pd(s2hi, _mm_mul_pd(ghi, _mm_cvtps_pd(_mm_movehl_ps(t, t))));
}

inline __m128 masked_grad4_thr(__m128 v, __m128 dy, __m128 thr) { return _mm_and_ps(_mm_cmpgt_ps(v, thr), dy); }

template <>
void backward_row_sums<float, float>(const float* x, const float* dy, const float* m, float* gm_out, int64_t n,
                                     float mmu, float msc, float msh, float mthr, float mu, double& s1, double& s2) {
  const __m128 vmmu = _mm_set1_ps(mmu), vmsc = _mm_set1_ps(msc), vmsh = _mm_set1_ps(msh), vthr = _mm_set1_ps(mthr);
  const __m128 vmu = _mm_set1_ps(mu);
  __m128d a1lo = _mm_setzero_pd(), a1hi = a1lo, a2lo = a1lo, a2hi = a1lo;
  auto gm4 = [&](int64_t j) {
    const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(m + j), vmmu), vmsc), vmsh);
    const __m128 gm = masked_grad4_thr(v, _mm_loadu_ps(dy + j), vthr);
    if (gm_out != nullptr) _mm_storeu_ps(gm_out + j, gm);
    return gm;
  };
  int64_t i = 0;
  // Eight elements a step: two vectors' gm and gm * (x - mean) added in float (one rounding of two
  // terms), then widened: half the conversions, the float kernel's speed (2048x7x7: 1.8 -> ~1.4 ms).
  for (; i + 8 <= n; i += 8) {
    const __m128 g1 = gm4(i), g2 = gm4(i + 4);
    const __m128 t1 = _mm_sub_ps(_mm_loadu_ps(x + i), vmu), t2 = _mm_sub_ps(_mm_loadu_ps(x + i + 4), vmu);
    const __m128 g = _mm_add_ps(g1, g2), p = _mm_add_ps(_mm_mul_ps(g1, t1), _mm_mul_ps(g2, t2));
    a1lo = _mm_add_pd(a1lo, _mm_cvtps_pd(g));
    a1hi = _mm_add_pd(a1hi, _mm_cvtps_pd(_mm_movehl_ps(g, g)));
    a2lo = _mm_add_pd(a2lo, _mm_cvtps_pd(p));
    a2hi = _mm_add_pd(a2hi, _mm_cvtps_pd(_mm_movehl_ps(p, p)));
  }
  for (; i + 4 <= n; i += 4) add_products4(gm4(i), _mm_sub_ps(_mm_loadu_ps(x + i), vmu), a1lo, a1hi, a2lo, a2hi);
  double r1[2], r2[2];
  _mm_storeu_pd(r1, _mm_add_pd(a1lo, a1hi));
  _mm_storeu_pd(r2, _mm_add_pd(a2lo, a2hi));
  double d1 = r1[0] + r1[1], d2 = r2[0] + r2[1];
  for (; i < n; ++i) {
    const float gm = masked_grad((m[i] - mmu) * msc + msh, dy[i], mthr);
    if (gm_out != nullptr) gm_out[i] = gm;
    d1 += static_cast<double>(gm);
    d2 += static_cast<double>(gm) * static_cast<double>(x[i] - mu);
  }
  s1 = d1;
  s2 = d2;
}
#endif

// dx = gm * k0 - k1 - (x - mean) * k2 over one run of one channel (gm = dy when m is null).
template <typename scalar_t, typename acc_t>
void backward_row(const scalar_t* x, const scalar_t* dy, const scalar_t* m, scalar_t* dx, int64_t n, acc_t mmu,
                  acc_t msc, acc_t msh, acc_t mthr, acc_t mu, acc_t k0, acc_t k1, acc_t k2) {
  if (m == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xv = to_acc<acc_t>(x[i]);
      dx[i] = from_acc<scalar_t, acc_t>(to_acc<acc_t>(dy[i]) * k0 - k1 - (xv - mu) * k2);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t xv = to_acc<acc_t>(x[i]);
      const acc_t gm = masked_grad((to_acc<acc_t>(m[i]) - mmu) * msc + msh, to_acc<acc_t>(dy[i]), mthr);
      dx[i] = from_acc<scalar_t, acc_t>(gm * k0 - k1 - (xv - mu) * k2);
    }
  }
}

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// float16 and bfloat16 rows (float16 only when the CPU has F16C, checked by the callers; see
// half_convert.h): the half_* row functions behind the row kernels' specialisations below, one
// implementation per instruction set.
#if !defined(TORCHFAST_BN_AVX2)
// Base set: blocks of kHalfBlock elements are converted to float32 on the stack, run through the
// float32 row kernels (which vectorise) and converted back: the same float32 math as the other
// dtypes, one rounding at the end.
constexpr int64_t kHalfBlock = 1024;

template <typename T>
void half_row_moments(const T* x, int64_t n, float K, double& s1, double& s2) {
  float bx[kHalfBlock];
  double a1 = 0, a2 = 0;
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t m = std::min(kHalfBlock, n - i);
    f16c::to_float(x + i, bx, m);
    double b1, b2;
    row_moments<float, float>(bx, m, K, b1, b2);
    a1 += b1;
    a2 += b2;
  }
  s1 = a1;
  s2 = a2;
}

template <typename T>
void half_normalize_row(const T* x, const T* r, T* y, int64_t n, float mu, float sc, float sh) {
  float bx[kHalfBlock], br[kHalfBlock];
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t m = std::min(kHalfBlock, n - i);
    f16c::to_float(x + i, bx, m);
    if (r != nullptr) f16c::to_float(r + i, br, m);
    normalize_row<float, float>(bx, r ? br : nullptr, bx, m, mu, sc, sh);  // in place: element i reads and writes i
    f16c::from_float(bx, y + i, m);
  }
}

// The mask source block: the input's own block when m is x, else m converted (null stays null).
template <typename T>
const float* mask_block(const T* m, const T* x, int64_t i, int64_t len, const float* bx, float* bm) {
  if (m == nullptr) return nullptr;
  if (m == x) return bx;
  f16c::to_float(m + i, bm, len);
  return bm;
}

template <typename T>
void half_backward_row_sums(const T* x, const T* dy, const T* m, T* gm_out, int64_t n, float mmu, float msc,
                               float msh, float mthr, float mu, double& s1, double& s2) {
  float bx[kHalfBlock], bg[kHalfBlock], bm[kHalfBlock];
  double a1 = 0, a2 = 0;
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t len = std::min(kHalfBlock, n - i);
    f16c::to_float(x + i, bx, len);
    f16c::to_float(dy + i, bg, len);
    const float* mb = mask_block(m, x, i, len, bx, bm);
    double b1, b2;
    // gm into the dy buffer, in place (element i only reads and writes i)
    backward_row_sums<float, float>(bx, bg, mb, gm_out ? bg : nullptr, len, mmu, msc, msh, mthr, mu, b1, b2);
    if (gm_out != nullptr) f16c::from_float(bg, gm_out + i, len);
    a1 += b1;
    a2 += b2;
  }
  s1 = a1;
  s2 = a2;
}

template <typename T>
void half_backward_row(const T* x, const T* dy, const T* m, T* dx, int64_t n, float mmu, float msc, float msh,
                          float mthr, float mu, float k0, float k1, float k2) {
  float bx[kHalfBlock], bg[kHalfBlock], bm[kHalfBlock];
  for (int64_t i = 0; i < n; i += kHalfBlock) {
    const int64_t len = std::min(kHalfBlock, n - i);
    f16c::to_float(x + i, bx, len);
    f16c::to_float(dy + i, bg, len);
    const float* mb = mask_block(m, x, i, len, bx, bm);
    backward_row<float, float>(bx, bg, mb, bg, len, mmu, msc, msh, mthr, mu, k0, k1, k2);  // dx into dy's buffer
    f16c::from_float(bg, dx + i, len);
  }
}

#else
// bfloat16 and float16 rows in the AVX2 set: the conversions fused into the row loops, 8 elements a
// step, with no float buffer in between (bfloat16 widens by a shift and narrows by the rounding of
// float_to_bf16_avx2; float16 converts with F16C, which every caller has checked: without it float16
// goes through float32 copies). The elementwise kernels compute the float template's formulas with the
// blocked path's conversions, so they write what it writes, bit for bit; the sums are formed in another
// order. Measured on the 2-core CI machine, one thread, bfloat16 32x64x56x56: statistics 3.3 -> 1.1 ms,
// normalise+ReLU 2.9 -> 1.8. Compiled with F16C enabled (TF_BN_F16C); only the float16 loads and
// stores use it.
#define TF_BN_F16C __attribute__((target("avx2,f16c")))
// Eight 16-bit values widened to float (widen8) and eight floats rounded to them (narrow8), for the
// whole-vector loads and stores (load8, store8) and the short tails' partial ones (tail_load).
TF_BN_F16C inline __m256 widen8(const c10::BFloat16*, __m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Round to nearest even, NaN -> 0x7FC0 (c10's conversion, as f16c::float_to_bf16_avx2).
TF_BN_F16C inline __m128i narrow8(const c10::BFloat16*, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))),
                                16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

TF_BN_F16C inline __m256 widen8(const c10::Half*, __m128i h) { return _mm256_cvtph_ps(h); }

TF_BN_F16C inline __m128i narrow8(const c10::Half*, __m256 v) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

template <typename T>
TF_BN_F16C inline __m256 load8(const T* p) {
  return widen8(p, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename T>
TF_BN_F16C inline void store8(T* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow8(p, v));
}

// float rows use the same helpers for their statistics (row_moments<float, float> below).
template <>
TF_BN_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// v's eight floats added to the double accumulators (lanes 0-3 to lo, 4-7 to hi).
TF_BN_F16C inline void widen_add8(__m256 v, __m256d& lo, __m256d& hi) {
  lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

TF_BN_F16C inline double hsum8(__m256d lo, __m256d hi) {
  const __m256d s = _mm256_add_pd(lo, hi);
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

// All-ones in the lanes of tail_load's vector that hold elements i..n-1, zero in the others.
TF_BN_F16C inline __m256 tail_live(int64_t i, int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i live = n >= 8 ? _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int>(7 - (n - i))))
                              : _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
  return _mm256_castsi256_ps(live);
}

// The 32-bit lanes of a 128-bit vector below k / 2 (the whole pairs of k 16-bit elements).
TF_BN_F16C inline __m128i pair_lanes(int64_t k) {
  return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(k >> 1)), _mm_setr_epi32(0, 1, 2, 3));
}

// The elements i..n-1 of a row (fewer than 8 left) as one vector, without a scalar loop: rows whose
// length is not a multiple of 8 (7x7 and 14x14 maps: 49 and 196 elements) ended in scalar loops whose
// conversions cost as much as the vector body (8x256x14x14 float16 backward, one thread: 1.7 -> 0.9 ns
// per element). A row of 8 or more takes the vector that ends at its end: the lanes below 8 - (n - i)
// repeat elements already done, which an elementwise pass writes again with the same values and a sum
// masks out (tail_live). A shorter row is read with masked loads (float: 8 lanes; 16-bit types: their
// whole pairs as 32-bit lanes, an odd last element on its own), its other lanes zero, and written with
// masked stores. (Through a zeroed stack vector filled by memcpy, every short row paid a library call
// and a stalled load, as the vector load could not take its bytes from the copy's smaller stores:
// 2x2 maps in float16/bfloat16, 32x512x2x2 forward+backward, ran at 0.6-0.75x stock.) Each lane
// computes what the scalar loop computed for its element: the elementwise outputs are unchanged.
template <typename T>
TF_BN_F16C inline __m256 tail_load(const T* row, int64_t i, int64_t n) {
  if (n >= 8) return load8(row + n - 8);
  const int64_t k = n - i;
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskload_ps(row + i, _mm256_castps_si256(tail_live(i, n)));
  } else {
    const T* p = row + i;
    __m128i h = _mm_maskload_epi32(reinterpret_cast<const int*>(p), pair_lanes(k));
    if (k & 1) {  // the odd last element into lane k - 1
      const __m128i at = _mm_cmpeq_epi16(_mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7), _mm_set1_epi16(static_cast<short>(k - 1)));
      uint16_t last;
      std::memcpy(&last, p + k - 1, sizeof(last));
      h = _mm_or_si128(h, _mm_and_si128(at, _mm_set1_epi16(static_cast<short>(last))));
    }
    return widen8(p, h);
  }
}

template <typename T>
TF_BN_F16C inline void tail_store(T* row, int64_t i, int64_t n, __m256 v) {
  if (n >= 8) return store8(row + n - 8, v);
  const int64_t k = n - i;
  if constexpr (std::is_same_v<T, float>) {
    _mm256_maskstore_ps(row + i, _mm256_castps_si256(tail_live(i, n)), v);
  } else {
    T* p = row + i;
    const __m128i h = narrow8(p, v);
    _mm_maskstore_epi32(reinterpret_cast<int*>(p), pair_lanes(k), h);
    if (k & 1) {  // the odd last element from lane k - 1 (a load within the one store: forwarded)
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
      std::memcpy(p + k - 1, buf + k - 1, sizeof(uint16_t));
    }
  }
}

// The per-vector formulas of the rows below, shared by their whole-vector loops and their tails (the
// same operations in the same order as the float template, so the same results).
TF_BN_F16C inline void add_moments8(__m256 d, __m256& a1, __m256& a2) {
  a1 = _mm256_add_ps(a1, d);
  a2 = _mm256_add_ps(a2, _mm256_mul_ps(d, d));
}

// (v - mu) * sc + sh: the normalisation, and the backward's recomputed pre-ReLU value.
TF_BN_F16C inline __m256 affine8(__m256 v, __m256 mu, __m256 sc, __m256 sh) {
  return _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, mu), sc), sh);
}

// gm * k0 - k1 - (x - mean) * k2, in the template's order.
TF_BN_F16C inline __m256 input_grad8(__m256 gm, __m256 xv, __m256 mu, __m256 k0, __m256 k1, __m256 k2) {
  return _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(gm, k0), k1), _mm256_mul_ps(_mm256_sub_ps(xv, mu), k2));
}

// Each lane sums four vectors (kSumChunk elements in all) in float, then widens into double.
template <typename T>
TF_BN_F16C void half_row_moments(const T* x, int64_t n, float K, double& s1, double& s2) {
  const __m256 k = _mm256_set1_ps(K);
  __m256d a1lo = _mm256_setzero_pd(), a1hi = a1lo, a2lo = a1lo, a2hi = a1lo;
  int64_t i = 0;
  for (; i + kSumChunk <= n; i += kSumChunk) {
    __m256 a1 = _mm256_setzero_ps(), a2 = a1;
    for (int u = 0; u < kSumChunk; u += 8) add_moments8(_mm256_sub_ps(load8(x + i + u), k), a1, a2);
    widen_add8(a1, a1lo, a1hi);
    widen_add8(a2, a2lo, a2hi);
  }
  if (i < n) {  // the last partial chunk: whole vectors, then the rest masked (its padding lanes add 0)
    __m256 a1 = _mm256_setzero_ps(), a2 = a1;
    for (; i + 8 <= n; i += 8) add_moments8(_mm256_sub_ps(load8(x + i), k), a1, a2);
    if (i < n) add_moments8(_mm256_and_ps(_mm256_sub_ps(tail_load(x, i, n), k), tail_live(i, n)), a1, a2);
    widen_add8(a1, a1lo, a1hi);
    widen_add8(a2, a2lo, a2hi);
  }
  s1 = hsum8(a1lo, a1hi);
  s2 = hsum8(a2lo, a2hi);
}

template <typename T>
TF_BN_F16C void half_normalize_row(const T* x, const T* r, T* y, int64_t n, float mu, float sc, float sh) {
  const __m256 vmu = _mm256_set1_ps(mu), vsc = _mm256_set1_ps(sc), vsh = _mm256_set1_ps(sh), zero = _mm256_setzero_ps();
  int64_t i = 0;
  // relu(v) = v < 0 ? 0 : v is max(0, v): max returns its second operand for a NaN, and -0 for -0.
  if (r == nullptr) {
    for (; i + 8 <= n; i += 8) store8(y + i, _mm256_max_ps(zero, affine8(load8(x + i), vmu, vsc, vsh)));
  } else {
    for (; i + 8 <= n; i += 8)
      store8(y + i, _mm256_max_ps(zero, _mm256_add_ps(affine8(load8(x + i), vmu, vsc, vsh), load8(r + i))));
  }
  if (i < n) {
    __m256 v = affine8(tail_load(x, i, n), vmu, vsc, vsh);
    if (r != nullptr) v = _mm256_add_ps(v, tail_load(r, i, n));
    tail_store(y, i, n, _mm256_max_ps(zero, v));
  }
}

// The masked gradient of 8 elements: dy where (m - mmu) * msc + msh > thr (false for NaN), else 0.
TF_BN_F16C inline __m256 masked_grad8(__m256 mv, __m256 g, __m256 mmu, __m256 msc, __m256 msh, __m256 thr) {
  return _mm256_and_ps(_mm256_cmp_ps(affine8(mv, mmu, msc, msh), thr, _CMP_GT_OQ), g);
}

// gm of elements j..j+7 (stored to gm_out unless null: dy or 0, exact) and their x - mean. (A helper,
// not a lambda: a lambda would not carry TF_BN_F16C, and the loads could not be inlined into it.)
template <typename T>
TF_BN_F16C inline void masked_step8(const T* x, const T* dy, const T* m, T* gm_out, int64_t j, __m256 mmu, __m256 msc,
                                    __m256 msh, __m256 thr, __m256 mu, __m256& gm, __m256& t) {
  const __m256 xv = load8(x + j);
  gm = masked_grad8(m == x ? xv : load8(m + j), load8(dy + j), mmu, msc, msh, thr);
  if (gm_out != nullptr) store8(gm_out + j, gm);
  t = _mm256_sub_ps(xv, mu);
}

// As the float rows' SSE kernel: two vectors' gm and gm * (x - mean) added in float (one rounding of
// two terms), then widened into double.
template <typename T>
TF_BN_F16C void half_backward_row_sums(const T* x, const T* dy, const T* m, T* gm_out, int64_t n, float mmu, float msc,
                                        float msh, float mthr, float mu, double& s1, double& s2) {
  const __m256 vmmu = _mm256_set1_ps(mmu), vmsc = _mm256_set1_ps(msc), vmsh = _mm256_set1_ps(msh),
               vthr = _mm256_set1_ps(mthr), vmu = _mm256_set1_ps(mu);
  __m256d a1lo = _mm256_setzero_pd(), a1hi = a1lo, a2lo = a1lo, a2hi = a1lo;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 g1, t1, g2, t2;
    masked_step8(x, dy, m, gm_out, i, vmmu, vmsc, vmsh, vthr, vmu, g1, t1);
    masked_step8(x, dy, m, gm_out, i + 8, vmmu, vmsc, vmsh, vthr, vmu, g2, t2);
    widen_add8(_mm256_add_ps(g1, g2), a1lo, a1hi);
    widen_add8(_mm256_add_ps(_mm256_mul_ps(g1, t1), _mm256_mul_ps(g2, t2)), a2lo, a2hi);
  }
  if (i < n) {  // up to 15 left: a whole vector, then the rest masked (padding lanes add exactly 0)
    __m256 g1 = _mm256_setzero_ps(), p1 = g1;
    if (i + 8 <= n) {
      __m256 t1;
      masked_step8(x, dy, m, gm_out, i, vmmu, vmsc, vmsh, vthr, vmu, g1, t1);
      p1 = _mm256_mul_ps(g1, t1);
      i += 8;
    }
    if (i < n) {
      const __m256 live = tail_live(i, n);
      const __m256 xv = tail_load(x, i, n);
      const __m256 gm = masked_grad8(m == x ? xv : tail_load(m, i, n), tail_load(dy, i, n), vmmu, vmsc, vmsh, vthr);
      if (gm_out != nullptr) tail_store(gm_out, i, n, gm);  // every lane: the repeated ones rewrite their values
      const __m256 g2 = _mm256_and_ps(gm, live);
      const __m256 p2 = _mm256_and_ps(_mm256_mul_ps(g2, _mm256_sub_ps(xv, vmu)), live);
      g1 = _mm256_add_ps(g1, g2);
      p1 = _mm256_add_ps(p1, p2);
    }
    widen_add8(g1, a1lo, a1hi);
    widen_add8(p1, a2lo, a2hi);
  }
  s1 = hsum8(a1lo, a1hi);
  s2 = hsum8(a2lo, a2hi);
}

template <typename T>
TF_BN_F16C void half_backward_row(const T* x, const T* dy, const T* m, T* dx, int64_t n, float mmu, float msc,
                                   float msh, float mthr, float mu, float k0, float k1, float k2) {
  const __m256 vmmu = _mm256_set1_ps(mmu), vmsc = _mm256_set1_ps(msc), vmsh = _mm256_set1_ps(msh),
               vthr = _mm256_set1_ps(mthr), vmu = _mm256_set1_ps(mu), vk0 = _mm256_set1_ps(k0),
               vk1 = _mm256_set1_ps(k1), vk2 = _mm256_set1_ps(k2);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = load8(x + i);
    __m256 g = load8(dy + i);
    if (m != nullptr) g = masked_grad8(m == x ? xv : load8(m + i), g, vmmu, vmsc, vmsh, vthr);
    store8(dx + i, input_grad8(g, xv, vmu, vk0, vk1, vk2));
  }
  if (i < n) {
    const __m256 xv = tail_load(x, i, n);
    __m256 g = tail_load(dy, i, n);
    if (m != nullptr) g = masked_grad8(m == x ? xv : tail_load(m, i, n), g, vmmu, vmsc, vmsh, vthr);
    tail_store(dx, i, n, input_grad8(g, xv, vmu, vk0, vk1, vk2));
  }
}


// channels_last rows of float16 and bfloat16 (AVX2 set): the channel loops of batch_stats,
// normalize_relu, backward_sums and backward_elementwise with the conversions inline, 8 channels a step
// (float16's inline bit conversions do not vectorise, and converting 64-row blocks into float32 copies
// cost more than the arithmetic). Per element the same operations as those loops, so the same results.
template <typename T>
TF_BN_F16C void cl_moments_row(const T* row, const float* kc, float* a1, float* a2, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 d = _mm256_sub_ps(load8(row + c), _mm256_loadu_ps(kc + c));
    _mm256_storeu_ps(a1 + c, _mm256_add_ps(_mm256_loadu_ps(a1 + c), d));
    _mm256_storeu_ps(a2 + c, _mm256_add_ps(_mm256_loadu_ps(a2 + c), _mm256_mul_ps(d, d)));
  }
  for (; c < n; ++c) {
    const float d = to_acc<float>(row[c]) - kc[c];
    a1[c] += d;
    a2[c] += d * d;
  }
}

template <typename T>
TF_BN_F16C void cl_normalize_row(const T* x, const T* r, T* y, int64_t n, const float* mean, const float* scale,
                                 const float* shift) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 v = affine8(load8(x + c), _mm256_loadu_ps(mean + c), _mm256_loadu_ps(scale + c), _mm256_loadu_ps(shift + c));
    if (r != nullptr) v = _mm256_add_ps(v, load8(r + c));
    store8(y + c, _mm256_max_ps(zero, v));
  }
  for (; c < n; ++c) {
    float v = (to_acc<float>(x[c]) - mean[c]) * scale[c] + shift[c];
    if (r != nullptr) v = v + to_acc<float>(r[c]);
    y[c] = from_acc<T, float>(relu(v));
  }
}

template <typename T>
TF_BN_F16C void cl_backward_sums_row(const T* x, const T* dy, const T* m, T* gm_out, int64_t n, const float* mmu,
                                     const float* msc, const float* msh, float mthr, const float* mu, float* a1,
                                     float* a2) {
  const __m256 thr = _mm256_set1_ps(mthr);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 gm = masked_grad8(load8(m + c), load8(dy + c), _mm256_loadu_ps(mmu + c), _mm256_loadu_ps(msc + c),
                                   _mm256_loadu_ps(msh + c), thr);
    if (gm_out != nullptr) store8(gm_out + c, gm);
    _mm256_storeu_ps(a1 + c, _mm256_add_ps(_mm256_loadu_ps(a1 + c), gm));
    const __m256 t = _mm256_sub_ps(load8(x + c), _mm256_loadu_ps(mu + c));
    _mm256_storeu_ps(a2 + c, _mm256_add_ps(_mm256_loadu_ps(a2 + c), _mm256_mul_ps(gm, t)));
  }
  for (; c < n; ++c) {
    const float gm = masked_grad((to_acc<float>(m[c]) - mmu[c]) * msc[c] + msh[c], to_acc<float>(dy[c]), mthr);
    if (gm_out != nullptr) gm_out[c] = from_acc<T, float>(gm);
    a1[c] += gm;
    a2[c] += gm * (to_acc<float>(x[c]) - mu[c]);
  }
}

template <typename T>
TF_BN_F16C void cl_backward_row(const T* x, const T* dy, const T* m, T* dx, int64_t n, const float* mmu,
                                const float* msc, const float* msh, float mthr, const float* mean, const float* k0,
                                const float* k1, const float* k2) {
  const __m256 thr = _mm256_set1_ps(mthr);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 g = load8(dy + c);
    if (m != nullptr)
      g = masked_grad8(load8(m + c), g, _mm256_loadu_ps(mmu + c), _mm256_loadu_ps(msc + c), _mm256_loadu_ps(msh + c),
                       thr);
    store8(dx + c, input_grad8(g, load8(x + c), _mm256_loadu_ps(mean + c), _mm256_loadu_ps(k0 + c),
                               _mm256_loadu_ps(k1 + c), _mm256_loadu_ps(k2 + c)));
  }
  for (; c < n; ++c) {
    const float g = to_acc<float>(dy[c]);
    const float gm = m == nullptr ? g : masked_grad((to_acc<float>(m[c]) - mmu[c]) * msc[c] + msh[c], g, mthr);
    dx[c] = from_acc<T, float>(gm * k0[c] - k1[c] - (to_acc<float>(x[c]) - mean[c]) * k2[c]);
  }
}
#undef TF_BN_F16C
#endif

#define TORCHFAST_HALF_ROWS(T)                                                                                \
  template <>                                                                                                  \
  void row_moments<T, float>(const T* x, int64_t n, float K, double& s1, double& s2) {                         \
    half_row_moments(x, n, K, s1, s2);                                                                        \
  }                                                                                                            \
  template <>                                                                                                  \
  void normalize_row<T, float>(const T* x, const T* r, T* y, int64_t n, float mu, float sc, float sh) {        \
    half_normalize_row(x, r, y, n, mu, sc, sh);                                                               \
  }                                                                                                            \
  template <>                                                                                                  \
  void backward_row_sums<T, float>(const T* x, const T* dy, const T* m, T* gm_out, int64_t n, float mmu,       \
                                   float msc, float msh, float mthr, float mu, double& s1, double& s2) {       \
    half_backward_row_sums(x, dy, m, gm_out, n, mmu, msc, msh, mthr, mu, s1, s2);                             \
  }                                                                                                            \
  template <>                                                                                                  \
  void backward_row<T, float>(const T* x, const T* dy, const T* m, T* dx, int64_t n, float mmu, float msc,     \
                              float msh, float mthr, float mu, float k0, float k1, float k2) {                 \
    half_backward_row(x, dy, m, dx, n, mmu, msc, msh, mthr, mu, k0, k1, k2);                                  \
  }
TORCHFAST_HALF_ROWS(c10::BFloat16)
TORCHFAST_HALF_ROWS(c10::Half)
#undef TORCHFAST_HALF_ROWS

#if defined(TORCHFAST_BN_AVX2)
// float rows' statistics in the AVX2 set: the half-precision rows' lane-wise sums (each lane adds its
// four elements of a 32-element chunk in float, then widens into double). The template's omp simd
// reduction added each chunk's lanes together, a horizontal sum per 32 elements that cost as much
// as the chunk (8x64x8x8 forward: the statistics were half the op's kernel time). Another summation
// order, no less precise.
template <>
void row_moments<float, float>(const float* x, int64_t n, float K, double& s1, double& s2) {
  half_row_moments(x, n, K, s1, s2);
}
#endif

// channels_last rows: in the base set float16/bfloat16 rows (up to kRowsPerBlock at a time) are read
// through a float32 copy (as_acc_row) and written from one (acc_out_row, then store_row); for other
// dtypes these return the rows themselves. The AVX2 set makes no copies: its channel loops for
// float16 and bfloat16 are the explicit 8-channel cl_*_row functions above (kFusedCl), with the
// conversions inline and the same results. One thread, 32x64x56x56, against the copies: float16
// statistics 4.0 -> 2.3 ms, normalise+ReLU 3.8 -> 1.5, backward elementwise 7.1 -> 2.5; bfloat16
// 3.7 -> 2.4, 4.1 -> 1.9, 7.4 -> 3.3.
#if defined(TORCHFAST_BN_AVX2)
template <typename T>
constexpr bool kBuffered = false;
template <typename T>
constexpr bool kFusedCl = kReduced<T>;
#else
template <typename T>
constexpr bool kBuffered = kReduced<T>;
template <typename T>
constexpr bool kFusedCl = false;
#endif

template <typename scalar_t>
inline auto as_acc_row(const scalar_t* row, int64_t n, std::vector<float>& buf) {
  if constexpr (kBuffered<scalar_t>) {
    f16c::to_float(row, buf.data(), n);
    return static_cast<const float*>(buf.data());
  } else {
    return row;
  }
}

template <typename scalar_t>
inline auto acc_out_row(scalar_t* row, std::vector<float>& buf) {
  if constexpr (kBuffered<scalar_t>) return buf.data();
  else return row;
}

template <typename scalar_t>
inline void store_row(scalar_t* row, const std::vector<float>& buf, int64_t n) {
  if constexpr (kBuffered<scalar_t>) f16c::from_float(buf.data(), row, n);
}

template <typename scalar_t>
inline size_t half_buffer(int64_t C) {
  return kBuffered<scalar_t> ? static_cast<size_t>(C) : 0;
}

#ifdef TORCHFAST_STREAM_STORES
// float32 rows of the whole-channel paths, written with non-temporal stores: the output of a large
// activation leaves the cache before anyone reads it, so skipping the read-for-ownership saves a
// third of the elementwise pass's memory traffic. Same operations, same order, same results as
// normalize_row / backward_row (SSE2 is baseline x86-64; maxps(0, v) returns v when v is NaN, as
// relu() does, and the compare-and-mask zeroes the gradient there like masked_grad).
inline void normalize_row_stream(const float* x, const float* r, float* y, int64_t n, float mu, float sc,
                                 float sh) {
  int64_t i = 0;
  auto scalar = [&](int64_t j) {
    float v = (x[j] - mu) * sc + sh;
    if (r != nullptr) v = v + r[j];
    y[j] = relu(v);
  };
  for (; i < n && (reinterpret_cast<uintptr_t>(y + i) & 15); ++i) scalar(i);
  const __m128 vmu = _mm_set1_ps(mu), vsc = _mm_set1_ps(sc), vsh = _mm_set1_ps(sh), zero = _mm_setzero_ps();
  if (r == nullptr) {
    for (; i + 4 <= n; i += 4)
      _mm_stream_ps(y + i, _mm_max_ps(zero, _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + i), vmu), vsc), vsh)));
  } else {
    for (; i + 4 <= n; i += 4) {
      const __m128 t = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(x + i), vmu), vsc), vsh);
      const __m128 v = _mm_add_ps(t, _mm_loadu_ps(r + i));
      _mm_stream_ps(y + i, _mm_max_ps(zero, v));
    }
  }
  for (; i < n; ++i) scalar(i);
}

// gm = ((m - mmu) * msc + msh > 0) ? dy : 0, four lanes; dy itself when m is null.
inline __m128 masked_grad4(const float* m, const float* dy, __m128 mmu, __m128 msc, __m128 msh) {
  if (m == nullptr) return _mm_loadu_ps(dy);
  const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(m), mmu), msc), msh);
  const __m128 mask = _mm_cmpgt_ps(v, _mm_setzero_ps());
  return _mm_and_ps(mask, _mm_loadu_ps(dy));
}

inline void backward_row_stream(const float* x, const float* dy, const float* m, float* dx, int64_t n, float mmu,
                                float msc, float msh, float mu, float k0, float k1, float k2) {
  int64_t i = 0;
  auto scalar = [&](int64_t j) {
    const float gm = m == nullptr ? dy[j] : masked_grad((m[j] - mmu) * msc + msh, dy[j]);
    dx[j] = gm * k0 - k1 - (x[j] - mu) * k2;
  };
  for (; i < n && (reinterpret_cast<uintptr_t>(dx + i) & 15); ++i) scalar(i);
  const __m128 vmmu = _mm_set1_ps(mmu), vsc = _mm_set1_ps(msc), vsh = _mm_set1_ps(msh), vmu = _mm_set1_ps(mu);
  const __m128 vk0 = _mm_set1_ps(k0), vk1 = _mm_set1_ps(k1), vk2 = _mm_set1_ps(k2);
  for (; i + 4 <= n; i += 4) {
    const __m128 xv = _mm_loadu_ps(x + i);
    const __m128 gm = masked_grad4(m ? m + i : nullptr, dy + i, vmmu, vsc, vsh);
    _mm_stream_ps(dx + i, _mm_sub_ps(_mm_sub_ps(_mm_mul_ps(gm, vk0), vk1), _mm_mul_ps(_mm_sub_ps(xv, vmu), vk2)));
  }
  for (; i < n; ++i) scalar(i);
}

// channels_last rows (C % 4 == 0, 16-byte aligned output): the same two formulas per channel.
inline void normalize_cl_row_stream(const float* x, const float* r, float* y, int64_t C, const float* mean,
                                    const float* scale, const float* shift) {
  const __m128 zero = _mm_setzero_ps();
  for (int64_t c = 0; c < C; c += 4) {
    const __m128 t = _mm_sub_ps(_mm_loadu_ps(x + c), _mm_loadu_ps(mean + c));
    __m128 v = _mm_add_ps(_mm_mul_ps(t, _mm_loadu_ps(scale + c)), _mm_loadu_ps(shift + c));
    if (r != nullptr) v = _mm_add_ps(v, _mm_loadu_ps(r + c));
    _mm_stream_ps(y + c, _mm_max_ps(zero, v));
  }
}

inline void backward_cl_row_stream(const float* x, const float* dy, const float* m, float* dx, int64_t C,
                                   const float* mmean, const float* mscale, const float* mshift, const float* mean,
                                   const float* k0, const float* k1, const float* k2) {
  for (int64_t c = 0; c < C; c += 4) {
    const __m128 xv = _mm_loadu_ps(x + c);
    const __m128 gm = m == nullptr ? _mm_loadu_ps(dy + c)
                                   : masked_grad4(m + c, dy + c, _mm_loadu_ps(mmean + c), _mm_loadu_ps(mscale + c),
                                                  _mm_loadu_ps(mshift + c));
    _mm_stream_ps(dx + c, _mm_sub_ps(_mm_sub_ps(_mm_mul_ps(gm, _mm_loadu_ps(k0 + c)), _mm_loadu_ps(k1 + c)),
                                     _mm_mul_ps(_mm_sub_ps(xv, _mm_loadu_ps(mean + c)), _mm_loadu_ps(k2 + c))));
  }
}

// Non-temporal stores skip the read-for-ownership of an output that leaves the cache before anyone
// reads it; an output that fits in half the last-level cache is written normally, since the next pass
// (the backward, the next layer) finds it there. Measured on the 2-core EPYC VM (32 MB L3): a
// BatchNorm+add+ReLU training step at 8x2048x7x7 channels_last (3.2 MB tensors) went from 0.87x stock
// with streaming stores to 1.0-1.5x without; above the threshold streaming still wins.
inline bool stream_output(int64_t bytes) {
  static const int64_t threshold = []() -> int64_t {
    if (const char* forced = std::getenv("TORCHFAST_STREAM_MIN_BYTES")) return static_cast<int64_t>(std::atoll(forced));  // tests
    int64_t l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::max<int64_t>(int64_t(8) << 20, l3 > 0 ? l3 / 2 : int64_t(16) << 20);
  }();
  return bytes >= threshold;
}

inline int64_t float_bytes(const Geometry& g) { return g.N * g.C * g.S * static_cast<int64_t>(sizeof(float)); }

// Whether a float32 channels_last output can take the streaming rows above.
inline bool cl_streamable(const void* out, int64_t C) {
  return C % 4 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
}

// f(offset of (row r, channel c0), c0, tile width) over rows [b, e): groups of kRowsPerBlock rows (at
// most 512 KB at C = 2048, so a group's rows are still in L2 for its next tile), each one channel
// tile at a time (see kChanTile; a multiple of 8, so tiles keep the rows' vector alignment).
template <typename F>
inline void for_cl_tiles(int64_t b, int64_t e, int64_t C, F&& f) {
  for (int64_t g0 = b; g0 < e; g0 += kRowsPerBlock) {
    const int64_t g1 = std::min(e, g0 + kRowsPerBlock);
    for (int64_t c0 = 0; c0 < C; c0 += kChanTile) {
      const int64_t n = std::min(kChanTile, C - c0);
      for (int64_t r = g0; r < g1; ++r) f(r * C + c0, c0, n);
    }
  }
}

#ifdef TORCHFAST_BN_AVX2
// The same channels_last rows eight lanes at a time (C % 8 == 0, 32-byte aligned output). The compare is
// ordered (a NaN value masks its gradient to 0, as masked_grad does); maxps(0, v) keeps a NaN v.
inline bool cl_streamable8(const void* out, int64_t C) {
  return C % 8 == 0 && (reinterpret_cast<uintptr_t>(out) & 31) == 0;
}

inline void normalize_cl_row_stream8(const float* x, const float* r, float* y, int64_t C, const float* mean,
                                     const float* scale, const float* shift) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(mean + c));
    __m256 v = _mm256_add_ps(_mm256_mul_ps(t, _mm256_loadu_ps(scale + c)), _mm256_loadu_ps(shift + c));
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + c));
    _mm256_stream_ps(y + c, _mm256_max_ps(zero, v));
  }
}

inline void backward_cl_row_stream8(const float* x, const float* dy, const float* m, float* dx, int64_t C,
                                    const float* mmean, const float* mscale, const float* mshift, float mthr,
                                    const float* mean, const float* k0, const float* k1, const float* k2) {
  const __m256 thr = _mm256_set1_ps(mthr);
  for (int64_t c = 0; c < C; c += 8) {
    __m256 gm = _mm256_loadu_ps(dy + c);
    if (m != nullptr) {
      const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(m + c), _mm256_loadu_ps(mmean + c));
      const __m256 v = _mm256_add_ps(_mm256_mul_ps(t, _mm256_loadu_ps(mscale + c)), _mm256_loadu_ps(mshift + c));
      gm = _mm256_and_ps(_mm256_cmp_ps(v, thr, _CMP_GT_OQ), gm);
    }
    const __m256 xm = _mm256_sub_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(mean + c));
    _mm256_stream_ps(dx + c, _mm256_sub_ps(_mm256_sub_ps(_mm256_mul_ps(gm, _mm256_loadu_ps(k0 + c)),
                                                         _mm256_loadu_ps(k1 + c)),
                                           _mm256_mul_ps(xm, _mm256_loadu_ps(k2 + c))));
  }
}
#endif
#endif

// mean, biased variance and 1/sqrt(var + eps) from the shifted sums of one channel.
template <typename acc_t>
void finish_stats(double S1, double S2, double K, double M, double eps, acc_t& mean, acc_t& var, acc_t& invstd) {
  const double m1 = S1 / M;
  const double v = std::max(0.0, S2 / M - m1 * m1);
  mean = to_acc<acc_t>(K + m1);
  var = to_acc<acc_t>(v);
  invstd = to_acc<acc_t>(1.0 / std::sqrt(v + eps));
}

// finish_stats for channels [0, C), four channels a step in the AVX2 build: the same operations, each
// correctly rounded in either form (a scalar double divide and square root per channel were ~8 % of a
// 32x2048 forward's time, the divides waiting on each other).
template <typename acc_t>
void finish_stats_all(const double* S1, const double* S2, const double* K, double M, double eps, int64_t C,
                      acc_t* mean, acc_t* var, acc_t* invstd) {
  int64_t c = 0;
#if defined(TORCHFAST_BN_AVX2)
  const __m256d vM = _mm256_set1_pd(M), veps = _mm256_set1_pd(eps), zero = _mm256_setzero_pd(),
                one = _mm256_set1_pd(1.0);
  for (; c + 4 <= C; c += 4) {
    const __m256d m1 = _mm256_div_pd(_mm256_loadu_pd(S1 + c), vM);
    const __m256d d = _mm256_sub_pd(_mm256_div_pd(_mm256_loadu_pd(S2 + c), vM), _mm256_mul_pd(m1, m1));
    const __m256d v = _mm256_and_pd(d, _mm256_cmp_pd(zero, d, _CMP_LT_OQ));  // std::max(0.0, d): +0 unless 0 < d
    const __m256d mu = _mm256_add_pd(_mm256_loadu_pd(K + c), m1);
    const __m256d is = _mm256_div_pd(one, _mm256_sqrt_pd(_mm256_add_pd(v, veps)));
    if constexpr (std::is_same_v<acc_t, float>) {
      _mm_storeu_ps(mean + c, _mm256_cvtpd_ps(mu));
      _mm_storeu_ps(var + c, _mm256_cvtpd_ps(v));
      _mm_storeu_ps(invstd + c, _mm256_cvtpd_ps(is));
    } else {
      _mm256_storeu_pd(mean + c, mu);
      _mm256_storeu_pd(var + c, v);
      _mm256_storeu_pd(invstd + c, is);
    }
  }
#endif
  for (; c < C; ++c) finish_stats<acc_t>(S1[c], S2[c], K[c], M, eps, mean[c], var[c], invstd[c]);
}

// The shift K of the shifted sums: the mean of each channel's first 32 elements (within ~0.2 std of the
// channel's mean). With K = the first element, which can sit 2 std from the mean, sum((x-K)^2)/M and
// (sum(x-K)/M)^2 are each 5x the variance and their difference keeps a fifth of the precision.
template <typename scalar_t, typename acc_t>
std::vector<double> channel_shifts(const scalar_t* x, const Geometry& g) {
  constexpr int64_t kSamples = 32;
  const int64_t N = g.N, C = g.C, S = g.S;
  const int64_t count = std::min(kSamples, N * S);
  std::vector<double> K(C, 0.0);
  if (g.layout == Layout::kNCS) {
    // Channels in parallel (each channel's sum in the same order on any thread count): serial, this was
    // a tenth of a small layer's forward (8x512x7x7 float16: 16K scalar conversions).
    // The samples of up to kShiftBlock channels are gathered (float16/bfloat16 with the vector
    // conversions: one at a time they took 2K scalar conversions, a fifth of an 8x64x8x8 forward's
    // kernel time), then each channel's are added in order, the channels side by side (one channel
    // at a time was a chain of dependent double adds): the same shift.
    at::parallel_for(0, C, 64, [&](int64_t cb, int64_t ce) {
      constexpr int64_t kShiftBlock = 8;
      double v[kShiftBlock][kSamples];
      float conv[kSamples];
      for (int64_t c0 = cb; c0 < ce; c0 += kShiftBlock) {
        const int64_t nb = std::min(kShiftBlock, ce - c0);
        for (int64_t q = 0; q < nb; ++q) {
          int64_t got = 0;
          for (int64_t n = 0; got < count; ++n) {
            const scalar_t* row = x + (n * C + c0 + q) * S;
            const int64_t take = std::min(S, count - got);
            if constexpr (kReduced<scalar_t>) {
              f16c::to_float(row, conv, take);
              for (int64_t i = 0; i < take; ++i) v[q][got + i] = static_cast<double>(conv[i]);
            } else {
              for (int64_t i = 0; i < take; ++i) v[q][got + i] = static_cast<double>(to_acc<acc_t>(row[i]));
            }
            got += take;
          }
        }
        double acc[kShiftBlock] = {};
        for (int64_t j = 0; j < count; ++j)
          for (int64_t q = 0; q < kShiftBlock; ++q) acc[q] += q < nb ? v[q][j] : 0.0;
        for (int64_t q = 0; q < nb; ++q) K[c0 + q] = acc[q];
      }
    });
  } else {  // in acc_t (32 terms; a shift needs no more), vectorised across the row
    std::vector<acc_t> k(C, acc_t(0));
    // float16/bfloat16 rows converted with the vector conversions first (float16's inline conversion
    // does not vectorise: on (N, C) inputs of 32-64 rows the shift converted most of the tensor one
    // element at a time, half of a 32x2048 float16 forward); the same values, added in the same order.
    // Column ranges in parallel (each channel's terms in the same order on any thread count): on
    // (N, C) inputs of up to 32 rows the shift reads the whole tensor, serially a tenth of the forward.
    const int64_t grain = std::max<int64_t>(256, 16384 / std::max<int64_t>(count, 1));
    at::parallel_for(0, C, grain, [&](int64_t cb, int64_t ce) {
      std::vector<float> conv(kReduced<scalar_t> ? ce - cb : 0);
      for (int64_t r = 0; r < count; ++r) {
        const scalar_t* row = x + r * C + cb;
        acc_t* kr = k.data() + cb;
        if constexpr (kReduced<scalar_t>) {
          f16c::to_float(row, conv.data(), ce - cb);
#pragma omp simd
          for (int64_t c = 0; c < ce - cb; ++c) kr[c] += conv[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < ce - cb; ++c) kr[c] += to_acc<acc_t>(row[c]);
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) K[c] = static_cast<double>(k[c]);
  }
  for (int64_t c = 0; c < C; ++c) K[c] = static_cast<double>(to_acc<acc_t>(count ? K[c] / count : 0.0));
  return K;
}

// Per-channel backward coefficients: dx = w*invstd * (gm - sum_dy/M - (x-mean) * invstd^2 * sum_dy_xmu/M)
// = gm * k0 - k1 - (x - mean) * k2 in training, gm * k0 in eval.
template <typename acc_t>
void backward_coeffs(double sum_dy, double sum_dy_xmu, acc_t w, acc_t invstd, double M, bool training, acc_t& gw,
                     acc_t& gb, acc_t& k0, acc_t& k1, acc_t& k2) {
  const double inv = static_cast<double>(invstd), wd = static_cast<double>(w);
  gb = to_acc<acc_t>(sum_dy);
  gw = M > 0 ? to_acc<acc_t>(sum_dy_xmu * inv) : acc_t(0);  // an empty batch: zero, as stock (not 0 * NaN)
  k0 = to_acc<acc_t>(wd * inv);
  const bool full = training && M > 0;
  k1 = full ? to_acc<acc_t>(wd * inv * sum_dy / M) : acc_t(0);
  k2 = full ? to_acc<acc_t>(wd * inv * inv * inv * sum_dy_xmu / M) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// Training forward, contiguous layout, whole channels per thread (see the header comment).

template <typename scalar_t, typename acc_t>
void train_forward_by_channel(const scalar_t* x, const scalar_t* res, scalar_t* y, const Geometry& g, double eps,
                              const acc_t* w,
                              const acc_t* b, acc_t* mean, acc_t* invstd, acc_t* var) {
  const int64_t N = g.N, C = g.C, S = g.S;
#ifdef TORCHFAST_STREAM_STORES
  const bool stream = stream_output(float_bytes(g));
#endif
  const double M = static_cast<double>(N * S);
  const std::vector<double> shifts = channel_shifts<scalar_t, acc_t>(x, g);
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const acc_t K = to_acc<acc_t>(shifts[c]);
      double S1 = 0, S2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        double s1, s2;
        row_moments<scalar_t, acc_t>(x + (n * C + c) * S, S, K, s1, s2);
        S1 += static_cast<double>(s1);
        S2 += static_cast<double>(s2);
      }
      finish_stats<acc_t>(S1, S2, static_cast<double>(K), M, eps, mean[c], var[c], invstd[c]);
      const acc_t mu = mean[c], sc = w[c] * invstd[c], sh = b[c];  // scale_shift's formula
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * S;
#ifdef TORCHFAST_STREAM_STORES
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (stream) {
            normalize_row_stream(x + o, res ? res + o : nullptr, y + o, S, mu, sc, sh);
            continue;
          }
        }
#endif
        normalize_row<scalar_t, acc_t>(x + o, res ? res + o : nullptr, y + o, S, mu, sc, sh);
      }
    }
#ifdef TORCHFAST_STREAM_STORES
    _mm_sfence();  // make the non-temporal stores visible before the parallel region ends
#endif
  });
}

// Backward, contiguous layout, whole channels per thread.
// The mask source: m with per-channel msc/msh (see backward_row_sums); gm_out, when not null, receives
// the masked gradient in the reduction pass and the elementwise pass reads it back with no mask.
template <typename scalar_t, typename acc_t>
struct MaskSource {
  const scalar_t* m;
  const acc_t* mmu;
  const acc_t* msc;
  const acc_t* msh;
  acc_t mthr;  // mask = (m - mmu) * msc + msh > mthr (see mask_threshold)
  scalar_t* gm_out;
};

template <typename scalar_t, typename acc_t>
void backward_by_channel(const scalar_t* x, const scalar_t* dy, const MaskSource<scalar_t, acc_t>& ms, scalar_t* dx,
                         const Geometry& g, const acc_t* mean, const acc_t* invstd, const acc_t* w, bool training,
                         acc_t* gw, acc_t* gb) {
  const int64_t N = g.N, C = g.C, S = g.S;
#ifdef TORCHFAST_STREAM_STORES
  const bool stream = stream_output(float_bytes(g));
#endif
  const double M = static_cast<double>(N * S);
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double sum_dy = 0, sum_dy_xmu = 0;
      for (int64_t n = 0; n < N; ++n) {
        double s1, s2;
        const int64_t o = (n * C + c) * S;
        backward_row_sums<scalar_t, acc_t>(x + o, dy + o, ms.m + o, ms.gm_out ? ms.gm_out + o : nullptr, S, ms.mmu[c],
                                           ms.msc[c], ms.msh[c], ms.mthr, mean[c], s1, s2);
        sum_dy += static_cast<double>(s1);
        sum_dy_xmu += static_cast<double>(s2);
      }
      acc_t k0, k1, k2;
      backward_coeffs<acc_t>(sum_dy, sum_dy_xmu, w[c], invstd[c], M, training, gw[c], gb[c], k0, k1, k2);
      // The elementwise pass reads the stored gm (no mask) when there is one, else dy masked again.
      const scalar_t* gsrc = ms.gm_out ? ms.gm_out : dy;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * S;
        const scalar_t* mo = ms.gm_out ? nullptr : ms.m + o;
#ifdef TORCHFAST_STREAM_STORES
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (stream && ms.mthr == 0.0f) {  // the SSE rows mask at 0
            backward_row_stream(x + o, gsrc + o, mo, dx + o, S, ms.mmu[c], ms.msc[c], ms.msh[c], mean[c], k0, k1, k2);
            continue;
          }
        }
#endif
        backward_row<scalar_t, acc_t>(x + o, gsrc + o, mo, dx + o, S, ms.mmu[c], ms.msc[c], ms.msh[c], ms.mthr, mean[c],
                                      k0, k1, k2);
      }
    }
#ifdef TORCHFAST_STREAM_STORES
    _mm_sfence();
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// Two-pass versions, parallel over rows: contiguous with few channels, and channels_last.

// The channels_last reductions' work units: blocks of kRowsPerBlock rows times tiles of kChanTile
// channels (whole rows where float16/bfloat16 rows are converted a block at a time: the base set). Each unit
// writes its block's partial sums for its channels; reduce() adds the blocks in order, so the result
// does not depend on the thread count. Splitting channels too keeps both threads busy on layers with
// few rows (8x2048x7x7 has 392 rows: 7 blocks, 56 units).
struct ClUnits {
  int64_t R, C, nblk, tile, ntiles;
  ClUnits(int64_t R_, int64_t C_, bool whole_rows)
      : R(R_), C(C_), nblk((R_ + kRowsPerBlock - 1) / kRowsPerBlock),
        tile(std::max<int64_t>(1, whole_rows ? C_ : std::min(C_, kChanTile))), ntiles((C_ + tile - 1) / tile) {}
  int64_t count() const { return nblk * ntiles; }
  int64_t block(int64_t i) const { return i / ntiles; }
  int64_t c0(int64_t i) const { return (i % ntiles) * tile; }
  int64_t c1(int64_t i) const { return std::min(C, c0(i) + tile); }
  void reduce(const std::vector<double>& p1, const std::vector<double>& p2, double* s1, double* s2) const {
    at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(nblk, 1)), [&](int64_t cb, int64_t ce) {
      for (int64_t blk = 0; blk < nblk; ++blk) {  // row by row (a column walk was 12 % of the forward)
        const double* q1 = p1.data() + blk * C;
        const double* q2 = p2.data() + blk * C;
#pragma omp simd
        for (int64_t c = cb; c < ce; ++c) {
          s1[c] += q1[c];
          s2[c] += q2[c];
        }
      }
    });
  }
};

// Rows per chunk of the channels_last elementwise passes: kRowsPerBlock, fewer when that would leave
// a thread idle ((N, C) inputs of 32-64 rows: one block ran on one thread, 0.8-0.9x stock on two),
// but at least ~16K elements a chunk (a smaller one costs more to hand to a thread than to run). The
// passes are elementwise: any split computes the same values.
inline int64_t cl_row_grain(int64_t R, int64_t C) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (R + threads - 1) / threads;
  const int64_t min_rows = (16384 + C - 1) / std::max<int64_t>(C, 1);
  return std::max<int64_t>(1, std::min(kRowsPerBlock, std::max(per_thread, min_rows)));
}

// Contiguous rows r = n * C + c are walked with the channel counted along (a division per row cost
// ~2 % of a small layer's pass), and each row's two sums kept in RowPartials, then folded per channel
// in row order (the same order on any thread count).
inline int64_t next_channel(int64_t c, int64_t C) { return c + 1 == C ? 0 : c + 1; }

struct RowPartials {
  std::unique_ptr<double[]> s1, s2;  // every entry is written before it is read: no zero fill
  explicit RowPartials(int64_t rows) : s1(new double[rows]), s2(new double[rows]) {}
  void fold(int64_t N, int64_t C, double* S1, double* S2) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        S1[c] += s1[n * C + c];
        S2[c] += s2[n * C + c];
      }
  }
};

template <typename scalar_t, typename acc_t>
void batch_stats(const scalar_t* x, const Geometry& g, double eps, acc_t* mean, acc_t* invstd, acc_t* var) {
  const int64_t N = g.N, C = g.C, S = g.S;
  const double M = static_cast<double>(N * S);
  std::vector<double> S1(C, 0.0), S2(C, 0.0);
  const std::vector<double> K = channel_shifts<scalar_t, acc_t>(x, g);
  if (g.layout == Layout::kNCS) {
    RowPartials part(N * C);
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b, c = b % C; r < e; ++r, c = next_channel(c, C))
        row_moments<scalar_t, acc_t>(x + r * S, S, to_acc<acc_t>(K[c]), part.s1[r], part.s2[r]);
    });
    part.fold(N, C, S1.data(), S2.data());
  } else {
    const int64_t R = N * S;
    std::vector<acc_t> Kc(C);
    for (int64_t c = 0; c < C; ++c) Kc[c] = to_acc<acc_t>(K[c]);
    const ClUnits u(R, C, kBuffered<scalar_t>);
    std::vector<double> p1(u.nblk * C), p2(u.nblk * C);
    at::parallel_for(0, u.count(), 1, [&](int64_t ub, int64_t ue) {
      std::vector<acc_t> a1(u.tile), a2(u.tile);
      std::vector<float> fx(half_buffer<scalar_t>(kRowsPerBlock * C));
      for (int64_t i = ub; i < ue; ++i) {
        const int64_t blk = u.block(i), c0 = u.c0(i), c1 = u.c1(i);
        double* q1 = p1.data() + blk * C;
        double* q2 = p2.data() + blk * C;
        std::fill(q1 + c0, q1 + c1, 0.0);
        std::fill(q2 + c0, q2 + c1, 0.0);
        const int64_t r0 = blk * kRowsPerBlock, r_end = std::min(R, r0 + kRowsPerBlock);
        const auto* xb = as_acc_row(x + r0 * C, (r_end - r0) * C, fx);  // the block's rows, converted at once
        for (int64_t f0 = r0; f0 < r_end; f0 += kFoldRows) {  // acc_t partials over kFoldRows rows, then double
          std::fill(a1.begin(), a1.end(), acc_t(0));
          std::fill(a2.begin(), a2.end(), acc_t(0));
          for (int64_t r = f0; r < std::min(r_end, f0 + kFoldRows); ++r) {
            const auto* row = xb + (r - r0) * C + c0;
            const acc_t* kc = Kc.data() + c0;
            if constexpr (kFusedCl<scalar_t>) {
              cl_moments_row(row, kc, a1.data(), a2.data(), c1 - c0);
            } else {
#pragma omp simd
              for (int64_t c = 0; c < c1 - c0; ++c) {
                const acc_t d = to_acc<acc_t>(row[c]) - kc[c];
                a1[c] += d;
                a2[c] += d * d;
              }
            }
          }
          for (int64_t c = c0; c < c1; ++c) {
            q1[c] += static_cast<double>(a1[c - c0]);
            q2[c] += static_cast<double>(a2[c - c0]);
          }
        }
      }
    });
    u.reduce(p1, p2, S1.data(), S2.data());
  }
  finish_stats_all<acc_t>(S1.data(), S2.data(), K.data(), M, eps, C, mean, var, invstd);
}

template <typename scalar_t, typename acc_t>
void normalize_relu(const scalar_t* x, const scalar_t* res, scalar_t* y, const Geometry& g, const acc_t* mean,
                    const acc_t* scale, const acc_t* shift) {
  const int64_t N = g.N, C = g.C, S = g.S;
  if (g.layout == Layout::kNCS) {
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b, c = b % C; r < e; ++r, c = next_channel(c, C))
        normalize_row<scalar_t, acc_t>(x + r * S, res ? res + r * S : nullptr, y + r * S, S, mean[c], scale[c],
                                       shift[c]);
    });
  } else {
#ifdef TORCHFAST_STREAM_STORES
    if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef TORCHFAST_BN_AVX2
      if (cl_streamable8(y, C) && stream_output(float_bytes(g))) {
        at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
          for_cl_tiles(b, e, C, [&](int64_t o, int64_t c0, int64_t n) {
            normalize_cl_row_stream8(x + o, res ? res + o : nullptr, y + o, n, mean + c0, scale + c0, shift + c0);
          });
          _mm_sfence();
        });
        return;
      }
#endif
      if (cl_streamable(y, C) && stream_output(float_bytes(g))) {
        at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
          for_cl_tiles(b, e, C, [&](int64_t o, int64_t c0, int64_t n) {
            normalize_cl_row_stream(x + o, res ? res + o : nullptr, y + o, n, mean + c0, scale + c0, shift + c0);
          });
          _mm_sfence();
        });
        return;
      }
    }
#endif
    at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
      const size_t nbuf = half_buffer<scalar_t>(kRowsPerBlock * C);
      std::vector<float> fx(nbuf), fy(nbuf), fr(res ? nbuf : 0);
      for (int64_t g0 = b; g0 < e; g0 += kRowsPerBlock) {  // groups of rows, converted at once
        const int64_t g1 = std::min(e, g0 + kRowsPerBlock);
        const auto* xg = as_acc_row(x + g0 * C, (g1 - g0) * C, fx);
        const auto* rg = res ? as_acc_row(res + g0 * C, (g1 - g0) * C, fr) : nullptr;
        auto* yg = acc_out_row(y + g0 * C, fy);
        using out_t = std::remove_pointer_t<decltype(yg)>;
        for (int64_t r = g0; r < g1; ++r) {
          const auto* xr = xg + (r - g0) * C;
          out_t* yr = yg + (r - g0) * C;
          if constexpr (kFusedCl<scalar_t>) {
            cl_normalize_row(xr, rg ? rg + (r - g0) * C : nullptr, yr, C, mean, scale, shift);
          } else if (rg == nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              acc_t v = (to_acc<acc_t>(xr[c]) - mean[c]) * scale[c] + shift[c];
              yr[c] = from_acc<out_t, acc_t>(relu(v));
            }
          } else {
            const auto* rr = rg + (r - g0) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              acc_t v = (to_acc<acc_t>(xr[c]) - mean[c]) * scale[c] + shift[c] + to_acc<acc_t>(rr[c]);
              yr[c] = from_acc<out_t, acc_t>(relu(v));
            }
          }
        }
        store_row(y + g0 * C, fy, (g1 - g0) * C);
      }
    });
  }
}

// Backward reduction: per channel sum(dy * mask) and sum(dy * mask * (x - mean)).
template <typename scalar_t, typename acc_t>
void backward_sums(const scalar_t* x, const scalar_t* dy, const MaskSource<scalar_t, acc_t>& ms, const Geometry& g,
                   const acc_t* mean, double* sum_dy, double* sum_dy_xmu) {
  const int64_t N = g.N, C = g.C, S = g.S;
  std::fill(sum_dy, sum_dy + C, 0.0);
  std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
  if (g.layout == Layout::kNCS) {
    RowPartials part(N * C);
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b, c = b % C; r < e; ++r, c = next_channel(c, C))
        backward_row_sums<scalar_t, acc_t>(x + r * S, dy + r * S, ms.m + r * S, ms.gm_out ? ms.gm_out + r * S : nullptr,
                                           S, ms.mmu[c], ms.msc[c], ms.msh[c], ms.mthr, mean[c], part.s1[r], part.s2[r]);
    });
    part.fold(N, C, sum_dy, sum_dy_xmu);
  } else {
    const int64_t R = N * S;
    const ClUnits u(R, C, kBuffered<scalar_t>);
    std::vector<double> p1(u.nblk * C), p2(u.nblk * C);
    at::parallel_for(0, u.count(), 1, [&](int64_t ub, int64_t ue) {
      const size_t nbuf = half_buffer<scalar_t>(kRowsPerBlock * C);
      const bool own_mask = ms.m != x;
      std::vector<float> fx(nbuf), fg(nbuf), fm(own_mask ? nbuf : 0), fo(ms.gm_out ? nbuf : 0);
      std::vector<acc_t> a1(u.tile), a2(u.tile);
      for (int64_t i = ub; i < ue; ++i) {
        const int64_t blk = u.block(i), c0 = u.c0(i), c1 = u.c1(i), n = c1 - c0;
        double* q1 = p1.data() + blk * C;
        double* q2 = p2.data() + blk * C;
        std::fill(q1 + c0, q1 + c1, 0.0);
        std::fill(q2 + c0, q2 + c1, 0.0);
        const int64_t r0 = blk * kRowsPerBlock, r_end = std::min(R, r0 + kRowsPerBlock), len = (r_end - r0) * C;
        const auto* xb = as_acc_row(x + r0 * C, len, fx);
        const auto* gb = as_acc_row(dy + r0 * C, len, fg);
        const auto* mb = own_mask ? as_acc_row(ms.m + r0 * C, len, fm) : xb;
        auto* ob = ms.gm_out ? acc_out_row(ms.gm_out + r0 * C, fo) : nullptr;
        using out_t = std::remove_pointer_t<decltype(ob)>;
        const acc_t *mmu = ms.mmu + c0, *msc = ms.msc + c0, *msh = ms.msh + c0, *mu = mean + c0;
        // acc_t partials over kFoldRows rows (a 16-term sum per channel), folded into double: the
        // backward's sums cancel, but 16 terms lose nothing a double accumulator would keep.
        for (int64_t f0 = r0; f0 < r_end; f0 += kFoldRows) {
          std::fill(a1.begin(), a1.end(), acc_t(0));
          std::fill(a2.begin(), a2.end(), acc_t(0));
          for (int64_t r = f0; r < std::min(r_end, f0 + kFoldRows); ++r) {
            const int64_t o = (r - r0) * C + c0;
            const auto *xr = xb + o, *gr = gb + o, *mr = mb + o;
            if constexpr (kFusedCl<scalar_t>) {
              cl_backward_sums_row(xr, gr, mr, ob ? ob + o : nullptr, n, mmu, msc, msh, ms.mthr, mu, a1.data(),
                                   a2.data());
            } else if (ob != nullptr) {
              out_t* orow = ob + o;
#pragma omp simd
              for (int64_t c = 0; c < n; ++c) {
                const acc_t gm = masked_grad((to_acc<acc_t>(mr[c]) - mmu[c]) * msc[c] + msh[c], to_acc<acc_t>(gr[c]),
                                             ms.mthr);
                orow[c] = from_acc<out_t, acc_t>(gm);
                a1[c] += gm;
                a2[c] += gm * (to_acc<acc_t>(xr[c]) - mu[c]);
              }
            } else {
#pragma omp simd
              for (int64_t c = 0; c < n; ++c) {
                const acc_t gm = masked_grad((to_acc<acc_t>(mr[c]) - mmu[c]) * msc[c] + msh[c], to_acc<acc_t>(gr[c]),
                                             ms.mthr);
                a1[c] += gm;
                a2[c] += gm * (to_acc<acc_t>(xr[c]) - mu[c]);
              }
            }
          }
          for (int64_t c = 0; c < n; ++c) {
            q1[c0 + c] += static_cast<double>(a1[c]);
            q2[c0 + c] += static_cast<double>(a2[c]);
          }
        }
        if (ms.gm_out != nullptr) store_row(ms.gm_out + r0 * C, fo, len);
      }
    });
    u.reduce(p1, p2, sum_dy, sum_dy_xmu);
  }
}

// dx from the masked gradient: gm = dy masked by m (see backward_row_sums), or dy itself when m is null.
template <typename scalar_t, typename acc_t>
void backward_elementwise(const scalar_t* x, const scalar_t* dy, const scalar_t* m, scalar_t* dx, const Geometry& g,
                          const acc_t* mmu, const acc_t* msc, const acc_t* msh, acc_t mthr, const acc_t* mean,
                          const acc_t* k0, const acc_t* k1, const acc_t* k2) {
  const int64_t N = g.N, C = g.C, S = g.S;
  if (g.layout == Layout::kNCS) {
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b, c = b % C; r < e; ++r, c = next_channel(c, C))
        backward_row<scalar_t, acc_t>(x + r * S, dy + r * S, m ? m + r * S : nullptr, dx + r * S, S, mmu[c], msc[c],
                                      msh[c], mthr, mean[c], k0[c], k1[c], k2[c]);
    });
  } else {
#ifdef TORCHFAST_STREAM_STORES
    if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef TORCHFAST_BN_AVX2
      if (cl_streamable8(dx, C) && stream_output(float_bytes(g))) {
        at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
          for_cl_tiles(b, e, C, [&](int64_t o, int64_t c0, int64_t n) {
            backward_cl_row_stream8(x + o, dy + o, m ? m + o : nullptr, dx + o, n, mmu + c0, msc + c0, msh + c0, mthr,
                                    mean + c0, k0 + c0, k1 + c0, k2 + c0);
          });
          _mm_sfence();
        });
        return;
      }
#endif
      if (cl_streamable(dx, C) && mthr == 0.0f && stream_output(float_bytes(g))) {  // the SSE rows mask at 0
        at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
          for_cl_tiles(b, e, C, [&](int64_t o, int64_t c0, int64_t n) {
            backward_cl_row_stream(x + o, dy + o, m ? m + o : nullptr, dx + o, n, mmu + c0, msc + c0, msh + c0,
                                   mean + c0, k0 + c0, k1 + c0, k2 + c0);
          });
          _mm_sfence();
        });
        return;
      }
    }
#endif
    at::parallel_for(0, N * S, cl_row_grain(N * S, C), [&](int64_t b, int64_t e) {
      const size_t nbuf = half_buffer<scalar_t>(kRowsPerBlock * C);
      const bool own_mask = m != nullptr && m != x;
      std::vector<float> fx(nbuf), fg(nbuf), fd(nbuf), fm(own_mask ? nbuf : 0);
      for (int64_t g0 = b; g0 < e; g0 += kRowsPerBlock) {  // groups of rows, converted at once
        const int64_t g1 = std::min(e, g0 + kRowsPerBlock), len = (g1 - g0) * C;
        const auto* xg = as_acc_row(x + g0 * C, len, fx);
        const auto* gg = as_acc_row(dy + g0 * C, len, fg);
        const auto* mg = own_mask ? as_acc_row(m + g0 * C, len, fm) : xg;
        auto* dg = acc_out_row(dx + g0 * C, fd);
        using out_t = std::remove_pointer_t<decltype(dg)>;
        for (int64_t r = g0; r < g1; ++r) {
          const auto* xr = xg + (r - g0) * C;
          const auto* gr = gg + (r - g0) * C;
          const auto* mr = mg + (r - g0) * C;
          out_t* dr = dg + (r - g0) * C;
          if constexpr (kFusedCl<scalar_t>) {
            cl_backward_row(xr, gr, m ? mr : nullptr, dr, C, mmu, msc, msh, mthr, mean, k0, k1, k2);
          } else if (m == nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t xv = to_acc<acc_t>(xr[c]);
              dr[c] = from_acc<out_t, acc_t>(to_acc<acc_t>(gr[c]) * k0[c] - k1[c] - (xv - mean[c]) * k2[c]);
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const acc_t xv = to_acc<acc_t>(xr[c]);
              const acc_t gm =
                  masked_grad((to_acc<acc_t>(mr[c]) - mmu[c]) * msc[c] + msh[c], to_acc<acc_t>(gr[c]), mthr);
              dr[c] = from_acc<out_t, acc_t>(gm * k0[c] - k1[c] - (xv - mean[c]) * k2[c]);
            }
          }
        }
        store_row(dx + g0 * C, fd, len);
      }
    });
  }
}

// Whole channels per thread pays off when every thread gets channels to work on and the channel's rows
// are long: a 7x7 channel is 32 runs of 196 bytes, 400 KB apart, which the prefetchers cannot follow
// (measured 5x slower than streaming all rows twice, 32x2048x7x7 backward on the 2-core EPYC VM).
bool by_channel(const Geometry& g) {
  return g.layout == Layout::kNCS && g.C >= at::get_num_threads() && g.S >= kMinChannelRow;
}

// The mask source's parameters (see MaskSource): bn_add_relu masks by the saved output, (out - 0) * 1 + 0 >
// 0, exactly out > 0; bn_relu by the input with the forward's mean, scale and shift.
template <typename acc_t>
void mask_params(bool from_out, const std::vector<acc_t>& m, const std::vector<acc_t>& is, const std::vector<acc_t>& w,
                 const c10::optional<at::Tensor>& bias, std::vector<acc_t>& mmu, std::vector<acc_t>& msc,
                 std::vector<acc_t>& msh) {
  const int64_t C = static_cast<int64_t>(m.size());
  if (from_out) {
    mmu.assign(C, acc_t(0));
    msc.assign(C, acc_t(1));
    msh.assign(C, acc_t(0));
  } else {
    mmu = m;
    scale_shift(m, is, w, per_channel<acc_t>(bias, C, 0), msc, msh);
  }
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& res, at::Tensor& y, at::Tensor& mean, at::Tensor& invstd,
             at::Tensor& var, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
             const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
             bool training, double eps) {
  const at::Tensor& input = x;
  const bool add = res.defined();
  const int64_t C = x.size(1);
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = geometry(x);
    const scalar_t* rp = add ? res.data_ptr<scalar_t>() : nullptr;
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    if (training && numel > 0 && by_channel(g)) {
      const std::vector<acc_t> w = per_channel<acc_t>(weight, C, 1), b = per_channel<acc_t>(bias, C, 0);
      train_forward_by_channel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), rp, y.data_ptr<scalar_t>(), g, eps, w.data(),
                                                b.data(), mp, ip, vp);
      return;
    }
    if (training) {
      if (numel > 0) {
        batch_stats<scalar_t, acc_t>(x.data_ptr<scalar_t>(), g, eps, mp, ip, vp);
      } else {
        std::fill(mp, mp + C, std::numeric_limits<acc_t>::quiet_NaN());
        std::fill(vp, vp + C, std::numeric_limits<acc_t>::quiet_NaN());
        std::fill(ip, ip + C, std::numeric_limits<acc_t>::quiet_NaN());
      }
    } else {
      std::vector<acc_t> rm = per_channel<acc_t>(running_mean, C, 0), rv = per_channel<acc_t>(running_var, C, 1);
      for (int64_t c = 0; c < C; ++c) {
        mp[c] = rm[c];
        vp[c] = rv[c];
        ip[c] = to_acc<acc_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
      }
    }
    if (numel == 0) return;
    std::vector<acc_t> m(mp, mp + C), is(ip, ip + C), scale, shift;
    scale_shift(m, is, per_channel<acc_t>(weight, C, 1), per_channel<acc_t>(bias, C, 0), scale, shift);
    normalize_relu<scalar_t, acc_t>(x.data_ptr<scalar_t>(), rp, y.data_ptr<scalar_t>(), g, m.data(), scale.data(),
                                    shift.data());
  });
}

void backward(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& o, at::Tensor& grad_in,
              at::Tensor& grad_res, at::Tensor& grad_w, at::Tensor& grad_b, const c10::optional<at::Tensor>& weight,
              const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
              double mask_thr) {
  const at::Tensor& input = x;
  const bool add = o.defined();
  const int64_t C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry g = geometry(x);
    std::vector<acc_t> m = per_channel<acc_t>(mean, C, 0), is = per_channel<acc_t>(invstd, C, 1);
    std::vector<acc_t> w = per_channel<acc_t>(weight, C, 1), mmu, msc, msh;
    mask_params<acc_t>(add, m, is, w, bias, mmu, msc, msh);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = grad_in.data_ptr<scalar_t>();
    const MaskSource<scalar_t, acc_t> ms{add ? o.data_ptr<scalar_t>() : xp, mmu.data(), msc.data(), msh.data(),
                                         add ? acc_t(0) : static_cast<acc_t>(mask_thr),
                                         add ? grad_res.data_ptr<scalar_t>() : nullptr};
    acc_t* gw = grad_w.data_ptr<acc_t>();
    acc_t* gb = grad_b.data_ptr<acc_t>();
    if (x.numel() > 0 && by_channel(g)) {
      backward_by_channel<scalar_t, acc_t>(xp, dyp, ms, dxp, g, m.data(), is.data(), w.data(), training, gw, gb);
      return;
    }
    std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
    if (x.numel() > 0) backward_sums<scalar_t, acc_t>(xp, dyp, ms, g, m.data(), sum_dy.data(), sum_dy_xmu.data());
    const double M = static_cast<double>(g.N * g.S);
    std::vector<acc_t> k0(C), k1(C), k2(C);
    for (int64_t c = 0; c < C; ++c)
      backward_coeffs<acc_t>(sum_dy[c], sum_dy_xmu[c], w[c], is[c], M, training, gw[c], gb[c], k0[c], k1[c], k2[c]);
    if (x.numel() > 0) {
      // bn_add_relu: the stored gm, no mask; bn_relu: dy masked again from x.
      const scalar_t* gsrc = add ? ms.gm_out : dyp;
      backward_elementwise<scalar_t, acc_t>(xp, gsrc, add ? nullptr : xp, dxp, g, mmu.data(), msc.data(), msh.data(),
                                            ms.mthr, m.data(), k0.data(), k1.data(), k2.data());
    }
  });
}

// The local pieces of the synchronised layers (torchfast.nn.SyncBatchNormReLU), which all-reduce between
// them: the batch statistics alone, the backward's sums alone, and the backward's elementwise pass from
// sums and a count that cover every process's batch.

void stats(const at::Tensor& x, at::Tensor& mean, at::Tensor& var) {
  const int64_t C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> invstd(C);  // not wanted: eps 0 makes it inf for a constant channel, unused
    batch_stats<scalar_t, acc_t>(x.data_ptr<scalar_t>(), geometry(x), 0.0, mean.data_ptr<acc_t>(), invstd.data(),
                                 var.data_ptr<acc_t>());
  });
}

void backward_reduce(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& o, at::Tensor& grad_res,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& mean, const at::Tensor& invstd, double mask_thr, at::Tensor& sum_dy,
                     at::Tensor& sum_dy_xmu) {
  const bool add = o.defined();
  const int64_t C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_bwd_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> m = per_channel<acc_t>(mean, C, 0), is = per_channel<acc_t>(invstd, C, 1);
    std::vector<acc_t> w = per_channel<acc_t>(weight, C, 1), mmu, msc, msh;
    mask_params<acc_t>(add, m, is, w, bias, mmu, msc, msh);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const MaskSource<scalar_t, acc_t> ms{add ? o.data_ptr<scalar_t>() : xp, mmu.data(), msc.data(), msh.data(),
                                         add ? acc_t(0) : static_cast<acc_t>(mask_thr),
                                         add ? grad_res.data_ptr<scalar_t>() : nullptr};
    backward_sums<scalar_t, acc_t>(xp, dy.data_ptr<scalar_t>(), ms, geometry(x), m.data(), sum_dy.data_ptr<double>(),
                                   sum_dy_xmu.data_ptr<double>());
  });
}

void backward_apply(const at::Tensor& x, const at::Tensor& grad, bool mask_from_input, at::Tensor& grad_in,
                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& mean, const at::Tensor& invstd, double mask_thr, const at::Tensor& sum_dy,
                    const at::Tensor& sum_dy_xmu, int64_t count) {
  const int64_t C = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_bwd_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> m = per_channel<acc_t>(mean, C, 0), is = per_channel<acc_t>(invstd, C, 1);
    std::vector<acc_t> w = per_channel<acc_t>(weight, C, 1), mmu, msc, msh;
    mask_params<acc_t>(!mask_from_input, m, is, w, bias, mmu, msc, msh);
    const double* s1 = sum_dy.data_ptr<double>();
    const double* s2 = sum_dy_xmu.data_ptr<double>();
    std::vector<acc_t> k0(C), k1(C), k2(C);
    acc_t gw, gb;  // the process's own weight and bias gradients come from its own sums, not these
    for (int64_t c = 0; c < C; ++c)
      backward_coeffs<acc_t>(s1[c], s2[c], w[c], is[c], static_cast<double>(count), true, gw, gb, k0[c], k1[c], k2[c]);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    backward_elementwise<scalar_t, acc_t>(xp, grad.data_ptr<scalar_t>(), mask_from_input ? xp : nullptr,
                                          grad_in.data_ptr<scalar_t>(), geometry(x), mmu.data(), msc.data(),
                                          msh.data(), mask_from_input ? static_cast<acc_t>(mask_thr) : acc_t(0),
                                          m.data(), k0.data(), k1.data(), k2.data());
  });
}

}  // namespace TORCHFAST_BN_ISA
}  // namespace torchfast
