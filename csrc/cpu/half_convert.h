// float16 / bfloat16 <-> float32 conversion of whole blocks, for the CPU BatchNorm+ReLU kernels'
// half-precision paths: rows are converted in blocks to float32 buffers, run through the float32 row
// kernels, and converted back.
//   float16: F16C (8 values per instruction), chosen at run time (cpu_features::has_f16c); without it the
//     caller takes its float32-copy path instead.
//   bfloat16: AVX2 when the CPU has it (chosen at run time), else a portable loop of the same bit
//     operations; identical results either way.
// Compiled with per-function target attributes, so the extension still runs on x86-64 machines
// without these extensions and builds on other architectures.
//
// Results: round-to-nearest-even, exact for every finite value and infinity, NaN stays NaN (its
// payload may differ from c10's canonical 0x7E00 / 0x7FC0); the same values as c10 otherwise.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/cpu_features.h"

namespace torchfast {
namespace f16c {

// Portable bfloat16 conversions (the bit operations of c10, written so that loops vectorise).
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t rounded = static_cast<uint16_t>((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
  return v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
}

inline void bf16_to_float_portable(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i].x);
}

inline void float_to_bf16_portable(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(float_to_bf16_bits(src[i]), c10::BFloat16::from_bits());
}

}  // namespace f16c
}  // namespace torchfast

#if defined(__x86_64__) && defined(__GNUC__)
#define TORCHFAST_HAVE_F16C_PATH 1
#include <immintrin.h>

namespace torchfast {
namespace f16c {

#define TF_F16C __attribute__((target("avx,f16c")))
#define TF_AVX2_CVT __attribute__((target("avx2")))

TF_AVX2_CVT inline void bf16_to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_bits_to_float(src[i].x);
}

// Round to nearest even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16, NaN -> 0x7FC0, as c10.
TF_AVX2_CVT inline void float_to_bf16_avx2(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), qnan = _mm256_set1_epi32(0x7FC0);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, bias), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // 8 x 32-bit lanes (each < 65536) -> 8 x 16-bit: pack within the 128-bit halves, then join them
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) dst[i] = c10::BFloat16(float_to_bf16_bits(src[i]), c10::BFloat16::from_bits());
}

TF_F16C inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) {  // the last n % 8 values through a zero-padded vector
    alignas(16) uint16_t in[8] = {0};
    alignas(32) float out[8];
    for (int64_t k = 0; k < n - i; ++k) in[k] = src[i + k].x;
    _mm256_store_ps(out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(in))));
    for (int64_t k = 0; k < n - i; ++k) dst[i + k] = out[k];
  }
}

TF_F16C inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (i < n) {
    alignas(32) float in[8] = {0};
    alignas(16) uint16_t out[8];
    for (int64_t k = 0; k < n - i; ++k) in[k] = src[i + k];
    _mm_store_si128(reinterpret_cast<__m128i*>(out),
                    _mm256_cvtps_ph(_mm256_load_ps(in), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (int64_t k = 0; k < n - i; ++k) dst[i + k] = c10::Half(out[k], c10::Half::from_bits());
  }
}

inline void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  if (cpu_features::has_avx2()) bf16_to_float_avx2(src, dst, n);
  else bf16_to_float_portable(src, dst, n);
}

inline void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  if (cpu_features::has_avx2()) float_to_bf16_avx2(src, dst, n);
  else float_to_bf16_portable(src, dst, n);
}

}  // namespace f16c
}  // namespace torchfast

#else

namespace torchfast {
namespace f16c {
inline void half_to_float(const c10::Half*, float*, int64_t) {}
inline void float_to_half(const float*, c10::Half*, int64_t) {}
inline void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) { bf16_to_float_portable(src, dst, n); }
inline void float_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) { float_to_bf16_portable(src, dst, n); }
}  // namespace f16c
}  // namespace torchfast

#endif

namespace torchfast {
namespace f16c {
// Overloads by element type, for the kernels' templates.
inline void to_float(const c10::Half* src, float* dst, int64_t n) { half_to_float(src, dst, n); }
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) { bf16_to_float(src, dst, n); }
inline void from_float(const float* src, c10::Half* dst, int64_t n) { float_to_half(src, dst, n); }
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) { float_to_bf16(src, dst, n); }
}  // namespace f16c
}  // namespace torchfast
