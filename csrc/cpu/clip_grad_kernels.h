// The multi-tensor clipping loops (the norm partials of a range of chunks, the scaling of a range),
// compiled once per instruction set: clip_base in clip_grad.cpp, clip_avx2 / clip_avx512 in
// clip_grad_isa.cpp under `#pragma GCC target`. clip_grad.cpp picks a set at run time (cpu_features);
// all sets compute the same sums in the same order (the lanes are fixed, not the vector width), so the
// norm does not depend on which set runs. No include guard: included once per set, with
// TORCHFAST_CLIP_ISA naming it.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/clip_grad_isa.h"

#ifndef TORCHFAST_CLIP_ISA
#error "define TORCHFAST_CLIP_ISA (the namespace) before including clip_grad_kernels.h"
#endif

// The loops pass 32-byte GCC vectors by value between inline functions of this file only; the
// baseline build (no AVX) warns that such a call's ABI differs from an AVX build's, which no caller
// outside this file ever sees.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace torchfast {
namespace TORCHFAST_CLIP_ISA {
namespace {

// A chunk's norm partial is kept in kLanes lanes: element i + j of every group of kLanes goes to lane j
// (lanes of sum |x|^p, or of max |x| and a NaN flag for inf), and the lanes are combined in a fixed
// order at the end of the chunk, so the partial depends only on the chunk's elements: not on the
// thread count, not on the instruction set, not on how its walk is interleaved with other chunks'.
constexpr int64_t kLanes = 16;

// Each thread walks its range of chunks as `streams` interleaved streams: the range is cut into that
// many contiguous parts of about equal elements, and each step takes kLanes elements from every part
// in turn, the parts' lanes held in registers. With one sequential stream a core keeps too few misses
// in flight for the VM's memory; several streams keep more. A standalone 500 MB float32 sum of squares
// on the 2-core VM (interleaved runs): 4 streams of one cache line a step read 28-30 % faster than one
// stream on 1 and 2 threads, 2 streams 16 %; software prefetch was 20 % slower; with the lanes
// reloaded from memory every step the gain was gone. 4 streams of 16 float lanes are 8 AVX2
// registers (kLanes 16, not 32, leaves room for them); double lanes take two streams. Every element is
// still read exactly once.
template <typename acc_t>
constexpr int kNormStreams = sizeof(acc_t) == 4 ? 4 : 2;

// NaN flags of inf-norm lanes: an integer of the lane's width (what a vector comparison gives)
template <typename acc_t>
using flag_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;

template <typename acc_t>
struct NormLanes {
  acc_t v[kLanes];  // sum |x|^p, or max |x| for inf
  flag_t<acc_t> nan[kLanes];  // inf only: nonzero where a NaN was seen
  void reset() {
    for (int64_t j = 0; j < kLanes; ++j) {
      v[j] = 0;
      nan[j] = 0;
    }
  }
};

template <typename acc_t, NormKind K>
inline void accumulate(acc_t& lane, flag_t<acc_t>& nan, acc_t x, acc_t p) {
  const acc_t a = std::abs(x);
  if constexpr (K == NormKind::kOne) lane += a;
  else if constexpr (K == NormKind::kTwo) lane += a * a;
  else if constexpr (K == NormKind::kP) lane += std::pow(a, p);
  else {
    nan = a != a ? 1 : nan;
    lane = a > lane ? a : lane;
  }
}

// The lanes in GCC vector types: 32-byte vectors (an AVX2 register; two SSE registers in the baseline
// build), so the accumulators of every stream stay in registers (as plain arrays GCC kept them on the
// stack, and four streams were 60 % slower than one). Element-wise the same operations as accumulate().
constexpr int64_t kVecBytes = 32;
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename acc_t>
constexpr int kVecs = kLanes * sizeof(acc_t) / kVecBytes;  // vectors per group of lanes

// One vector of elements from x (kVecBytes / sizeof(acc_t) of them), widened exactly to acc_t. Returned
// by value, not through an array: through arrays GCC kept the float64 lanes on the stack.
template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type load_vec(const scalar_t* x) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, x, kVecBytes);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // c10's conversion: the bits, shifted
#if defined(TORCHFAST_CLIP_F16C)  // the vector sets have AVX2 (GCC's generic widening took 0.7x the time)
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16);
#else
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    u16x8 h;
    std::memcpy(&h, x, 16);
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
#endif
    std::memcpy(&v, &w, kVecBytes);
  } else {
#if defined(TORCHFAST_CLIP_F16C)  // float16 with F16C: c10's element-wise conversion does not vectorise
    const __m256 w = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    std::memcpy(&v, &w, kVecBytes);
#else
    for (int j = 0; j < 8; ++j) v[j] = static_cast<acc_t>(x[j]);
#endif
  }
  return v;
}

// `run` elements (a multiple of kLanes) from each of NS streams, a group of kLanes from each in turn.
template <int NS, typename scalar_t, typename acc_t, NormKind K>
void norm_run(const scalar_t* const* xs, int64_t run, acc_t p, NormLanes<acc_t>* const* lanes) {
  if constexpr (K == NormKind::kP) {  // pow: compute-bound, no interleaving needed
    for (int q = 0; q < NS; ++q)
      for (int64_t o = 0; o < run; o += kLanes)
        for (int64_t j = 0; j < kLanes; ++j)
          accumulate<acc_t, K>(lanes[q]->v[j], lanes[q]->nan[j], static_cast<acc_t>(xs[q][o + j]), p);
  } else {
    using V = typename Vec<acc_t>::type;
    using F = typename Vec<flag_t<acc_t>>::type;
    constexpr int kV = kVecs<acc_t>;
    const F abs_mask = F{} + std::numeric_limits<flag_t<acc_t>>::max();  // all bits but the sign
    V v[NS][kV];
    F nan[NS][kV];
    for (int q = 0; q < NS; ++q) {
      std::memcpy(v[q], lanes[q]->v, sizeof(v[q]));
      std::memcpy(nan[q], lanes[q]->nan, sizeof(nan[q]));
    }
    for (int64_t o = 0; o < run; o += kLanes) {
#pragma GCC unroll 4
      for (int q = 0; q < NS; ++q) {
#pragma GCC unroll 4
        for (int i = 0; i < kV; ++i) {
          const V x = load_vec<scalar_t, acc_t>(xs[q] + o + i * (kLanes / kV));
          const V a = reinterpret_cast<V>(reinterpret_cast<F>(x) & abs_mask);  // std::abs
          if constexpr (K == NormKind::kOne) v[q][i] += a;
          else if constexpr (K == NormKind::kTwo) v[q][i] += a * a;
          else {
            nan[q][i] |= (a != a);
            v[q][i] = a > v[q][i] ? a : v[q][i];
          }
        }
      }
    }
    for (int q = 0; q < NS; ++q) {
      std::memcpy(lanes[q]->v, v[q], sizeof(v[q]));
      std::memcpy(lanes[q]->nan, nan[q], sizeof(nan[q]));
    }
  }
}

// The partial of a chunk whose body is in `lanes`: its last n < kLanes elements, then the lanes in order.
template <typename scalar_t, typename acc_t, NormKind K>
double finish_chunk(NormLanes<acc_t>& lanes, const scalar_t* tail, int64_t n, acc_t p) {
  for (int64_t i = 0; i < n; ++i) accumulate<acc_t, K>(lanes.v[i], lanes.nan[i], static_cast<acc_t>(tail[i]), p);
  if constexpr (K == NormKind::kInf) {
    acc_t m = 0;
    bool nan = false;
    for (int64_t j = 0; j < kLanes; ++j) {
      m = lanes.v[j] > m ? lanes.v[j] : m;
      nan = nan || lanes.nan[j] != 0;
    }
    return nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m);
  } else {
    double s = 0.0;
    for (int64_t j = 0; j < kLanes; ++j) s += static_cast<double>(lanes.v[j]);
    return s;
  }
}

struct Cursor {
  int64_t chunk, end, off;  // the current chunk, one past the part's last, the offset in the chunk
};

// Cuts [0, count) into NS contiguous parts of about equal elements (some may be empty); returns how
// many are not.
template <int NS>
int start_streams(const Span* spans, int64_t count, Cursor (&cur)[NS]) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) total += spans[i].n;
  int64_t bound[NS + 1];
  bound[0] = 0;
  for (int s = 1; s <= NS; ++s) bound[s] = count;
  int64_t before = 0;
  int s = 1;
  for (int64_t i = 0; i < count && s < NS; ++i) {
    while (s < NS && before * NS >= total * s) bound[s++] = i;
    before += spans[i].n;
  }
  int active = 0;
  for (int q = 0; q < NS; ++q) {
    cur[q] = {bound[q], bound[q + 1], 0};
    active += bound[q] < bound[q + 1];
  }
  return active;
}

template <typename scalar_t, typename acc_t, NormKind K>
void norm_streams(const Span* spans, int64_t count, acc_t p, double* partial) {
  constexpr int NS = kNormStreams<acc_t>;
  Cursor cur[NS];
  NormLanes<acc_t> lanes[NS];
  for (auto& l : lanes) l.reset();
  int active = start_streams(spans, count, cur);
  while (active > 0) {
    // The active streams, each from where it is to the end of its chunk's body (its whole groups of
    // kLanes), walked together until the first of them gets there.
    const scalar_t* xs[NS];
    NormLanes<acc_t>* ls[NS];
    int na = 0;
    int64_t run = std::numeric_limits<int64_t>::max();
    for (int q = 0; q < NS; ++q) {
      const Cursor& u = cur[q];
      if (u.chunk == u.end) continue;
      const int64_t n = spans[u.chunk].n;
      run = std::min(run, n - n % kLanes - u.off);
      xs[na] = static_cast<const scalar_t*>(spans[u.chunk].data) + u.off;
      ls[na++] = &lanes[q];
    }
    if (run > 0) {
      if constexpr (NS == 4) {
        if (na == 4) norm_run<4, scalar_t, acc_t, K>(xs, run, p, ls);
        else if (na == 3) norm_run<3, scalar_t, acc_t, K>(xs, run, p, ls);
      }
      if (na == 2) norm_run<2, scalar_t, acc_t, K>(xs, run, p, ls);
      else if (na == 1) norm_run<1, scalar_t, acc_t, K>(xs, run, p, ls);
    }
    // Then the chunks whose bodies are done take their tails and move on.
    for (int q = 0; q < NS; ++q) {
      Cursor& u = cur[q];
      if (u.chunk == u.end) continue;
      u.off += run;
      const int64_t n = spans[u.chunk].n, body = n - n % kLanes;
      if (u.off < body) continue;
      const scalar_t* x = static_cast<const scalar_t*>(spans[u.chunk].data);
      partial[u.chunk] = finish_chunk<scalar_t, acc_t, K>(lanes[q], x + body, n - body, p);
      lanes[q].reset();
      u.off = 0;
      if (++u.chunk == u.end) --active;
    }
  }
}

// x *= coef over the vectors of [0, n): returns where they end (n, when n is a multiple of 32).
template <typename scalar_t, typename acc_t>
int64_t scale_vectors(scalar_t* x, int64_t n, acc_t coef) {
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
  return i;
}

template <typename scalar_t, typename acc_t>
void scale_range(scalar_t* x, int64_t n, acc_t coef) {
  const int64_t i = scale_vectors<scalar_t, acc_t>(x, n, coef);
#pragma omp simd
  for (int64_t j = i; j < n; ++j) x[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * coef);
}

// The scaling pass walks a thread's chunks as 4 interleaved streams too (see kNormStreams), 256 bytes
// a step: in place, 5-20 % faster than one stream on the 2-core VM.
constexpr int kScaleStreams = 4;
constexpr int64_t kScaleStepBytes = 256;  // whole vectors of every loop in scale_vectors

template <typename scalar_t, typename acc_t>
void scale_streams(const Span* spans, int64_t count, acc_t coef) {
  constexpr int64_t step = kScaleStepBytes / sizeof(scalar_t);
  constexpr int NS = kScaleStreams;
  Cursor cur[NS];
  int active = start_streams(spans, count, cur);
  while (active > 0) {
    scalar_t* xs[NS];  // as in norm_streams: together until the first stream nears its chunk's end
    int na = 0;
    int64_t run = std::numeric_limits<int64_t>::max();
    for (int q = 0; q < NS; ++q) {
      const Cursor& u = cur[q];
      if (u.chunk == u.end) continue;
      run = std::min(run, spans[u.chunk].n - u.off);
      xs[na++] = static_cast<scalar_t*>(spans[u.chunk].data) + u.off;
    }
    run -= run % step;
    for (int64_t o = 0; o < run; o += step)
      for (int q = 0; q < na; ++q) scale_vectors<scalar_t, acc_t>(xs[q] + o, step, coef);
    // Then the streams within a step of their chunk's end finish it and move on.
    for (int q = 0; q < NS; ++q) {
      Cursor& u = cur[q];
      if (u.chunk == u.end) continue;
      u.off += run;
      const int64_t n = spans[u.chunk].n;
      if (n - u.off >= step) continue;
      scale_range<scalar_t, acc_t>(static_cast<scalar_t*>(spans[u.chunk].data) + u.off, n - u.off, coef);
      u.off = 0;
      if (++u.chunk == u.end) --active;
    }
  }
}

}  // namespace

template <typename scalar_t>
void norm_partials(NormKind kind, const Span* spans, int64_t count, double p, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pp = static_cast<acc_t>(p);
  switch (kind) {
    case NormKind::kOne: return norm_streams<scalar_t, acc_t, NormKind::kOne>(spans, count, pp, partial);
    case NormKind::kTwo: return norm_streams<scalar_t, acc_t, NormKind::kTwo>(spans, count, pp, partial);
    case NormKind::kInf: return norm_streams<scalar_t, acc_t, NormKind::kInf>(spans, count, pp, partial);
    default: return norm_streams<scalar_t, acc_t, NormKind::kP>(spans, count, pp, partial);
  }
}

template <typename scalar_t>
void scale_spans(const Span* spans, int64_t count, double coef) {
  using acc_t = at::opmath_type<scalar_t>;
  scale_streams<scalar_t, acc_t>(spans, count, static_cast<acc_t>(coef));
}

#define TORCHFAST_CLIP_INSTANTIATE(T)                                                 \
  template void norm_partials<T>(NormKind, const Span*, int64_t, double, double*); \
  template void scale_spans<T>(const Span*, int64_t, double);
TORCHFAST_CLIP_INSTANTIATE(float)
TORCHFAST_CLIP_INSTANTIATE(double)
TORCHFAST_CLIP_INSTANTIATE(c10::Half)
TORCHFAST_CLIP_INSTANTIATE(c10::BFloat16)
#undef TORCHFAST_CLIP_INSTANTIATE

}  // namespace TORCHFAST_CLIP_ISA
}  // namespace torchfast

#pragma GCC diagnostic pop
