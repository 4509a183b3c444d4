// AVX2 version of the Philox stream and its distributions: 16 Philox blocks (64 elements) per step.
// Compiled with a per-function target attribute and chosen at run time (cpu_features::has_avx2), so the
// extension still runs on x86-64 machines without AVX2 and builds on other architectures.
//
// Uniform values are bitwise identical to csrc/philox.h (the same float32 operations, each rounded,
// no FMA). Normal and truncated-normal values use vectorised log/sin/cos (Cephes-style minimax
// polynomials, about 1 ulp, evaluated with FMA) instead of libm, so they differ from the scalar path
// by a few ulp.
// Measured on the 2-core Xeon CI machine: uniform fill 0.2 -> ~1 G elements/s per core.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define TORCHFAST_HAVE_AVX2_PATH 1
#include <immintrin.h>

#include <cstdint>

#include "cpu/cpu_features.h"
#include "philox.h"

namespace torchfast {
namespace avx2 {

#define TF_AVX2 __attribute__((target("avx2,fma")))


// hi and lo 32-bit halves of M * c for 8 lanes.
TF_AVX2 inline void mulhilo8(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(c, m);                         // lanes 0,2,4,6 (64-bit)
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// Words w[g][0..3] of blocks blk0 + 8 g + l (lane l) for the two groups g = 0, 1, computed together
// so the two dependency chains of multiplies overlap. Requires the low 32 bits of the block index
// not to wrap inside the 16 blocks (checked by the caller).
TF_AVX2 inline void philox16(uint64_t seed, uint64_t blk0, uint64_t stream, __m256i w[2][4]) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0)));
  __m256i a0 = _mm256_add_epi32(base, lane);
  __m256i b0 = _mm256_add_epi32(a0, _mm256_set1_epi32(8));
  __m256i a1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0 >> 32))), b1 = a1;
  __m256i a2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream))), b2 = a2;
  __m256i a3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32))), b3 = a3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(Philox4x32::M0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(Philox4x32::M1));
  for (int r = 0; r < 10; ++r) {
    const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0)), kk1 = _mm256_set1_epi32(static_cast<int>(k1));
    __m256i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
    mulhilo8(a0, m0, ahi0, alo0);
    mulhilo8(b0, m0, bhi0, blo0);
    mulhilo8(a2, m1, ahi1, alo1);
    mulhilo8(b2, m1, bhi1, blo1);
    a0 = _mm256_xor_si256(_mm256_xor_si256(ahi1, a1), kk0);
    b0 = _mm256_xor_si256(_mm256_xor_si256(bhi1, b1), kk0);
    a2 = _mm256_xor_si256(_mm256_xor_si256(ahi0, a3), kk1);
    b2 = _mm256_xor_si256(_mm256_xor_si256(bhi0, b3), kk1);
    a1 = alo1;
    b1 = blo1;
    a3 = alo0;
    b3 = blo0;
    k0 += Philox4x32::W0;
    k1 += Philox4x32::W1;
  }
  w[0][0] = a0; w[0][1] = a1; w[0][2] = a2; w[0][3] = a3;
  w[1][0] = b0; w[1][1] = b1; w[1][2] = b2; w[1][3] = b3;
}

TF_AVX2 inline __m256 unit8(__m256i w) {
  const __m256i k = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(w, 9), 1), _mm256_set1_epi32(1));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(k), _mm256_set1_ps(5.9604644775390625e-08f));
}

// Horner with fused multiply-adds. Only the normal and truncated-normal paths use it; the uniform
// path is plain multiply then add (the sources are compiled with -ffp-contract=off, so those two
// intrinsics are never fused) and stays bitwise equal to the other backends.
TF_AVX2 inline __m256 poly(__m256 x, const float* c, int n) {
  __m256 p = _mm256_set1_ps(c[0]);
  for (int i = 1; i < n; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[i]));
  return p;
}

// Natural log of positive normal floats (Cephes logf).
TF_AVX2 inline __m256 log8(__m256 x) {
  static const float c[9] = {7.0376836292E-2f, -1.1514610310E-1f, 1.1676998740E-1f, -1.2420140846E-1f,
                             1.4249322787E-1f, -1.6668057665E-1f, 2.0000714765E-1f, -2.4999993993E-1f,
                             3.3333331174E-1f};
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(poly(m, c, 9), m), z);
  y = _mm256_add_ps(y, _mm256_mul_ps(e, _mm256_set1_ps(-2.12194440E-4f)));
  y = _mm256_sub_ps(y, _mm256_mul_ps(z, _mm256_set1_ps(0.5f)));
  return _mm256_add_ps(_mm256_add_ps(m, y), _mm256_mul_ps(e, _mm256_set1_ps(0.693359375f)));
}

// sin and cos of 0 <= x < 2 pi (Cephes sinf/cosf with the three-part pi/4 reduction).
TF_AVX2 inline void sincos8(__m256 x, __m256& s, __m256& c) {
  static const float sp[3] = {-1.9515295891E-4f, 8.3321608736E-3f, -1.6666654611E-1f};
  static const float cp[3] = {2.443315711809948E-5f, -1.388731625493765E-3f, 4.166664568298827E-2f};
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f)));  // x * 4/pi
  j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
  const __m256 y = _mm256_cvtepi32_ps(j);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(y, _mm256_set1_ps(0.78515625f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(y, _mm256_set1_ps(2.4187564849853515625e-4f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(y, _mm256_set1_ps(3.77489497744594108e-8f)));
  const __m256 z = _mm256_mul_ps(r, r);
  const __m256 ps = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(poly(z, sp, 3), z), r), r);
  const __m256 pc = _mm256_add_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_mul_ps(poly(z, cp, 3), z), z),
                                                _mm256_mul_ps(z, _mm256_set1_ps(0.5f))),
                                  _mm256_set1_ps(1.0f));
  const __m256i q = _mm256_and_si256(j, _mm256_set1_epi32(7));
  // Octants 2 and 6 (j & 2) swap the polynomials.
  const __m256 swap = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)),
                                                             _mm256_set1_epi32(2)));
  __m256 sv = _mm256_blendv_ps(ps, pc, swap);
  __m256 cv = _mm256_blendv_ps(pc, ps, swap);
  // sin is negative for octants 4..7; cos for octants 2..5.
  const __m256i sneg = _mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(4)), 29);
  const __m256i cneg = _mm256_slli_epi32(
      _mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(2)), _mm256_set1_epi32(4)), 29);
  s = _mm256_xor_ps(sv, _mm256_castsi256_ps(sneg));
  c = _mm256_xor_ps(cv, _mm256_castsi256_ps(cneg));
}

// erfinv in float32, Giles' approximation as in philox.h, on 8 lanes (both branches, blended).
TF_AVX2 inline __m256 erfinv8(__m256 x) {
  static const float cc[9] = {2.81022636e-08f, 3.43273939e-07f, -3.5233877e-06f, -4.39150654e-06f,
                              0.00021858087f, -0.00125372503f, -0.00417768164f, 0.246640727f, 1.50140941f};
  static const float ct[9] = {-0.000200214257f, 0.000100950558f, 0.00134934322f, -0.00367342844f,
                              0.00573950773f, -0.0076224613f, 0.00943887047f, 1.00167406f, 2.83297682f};
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 w = _mm256_sub_ps(_mm256_setzero_ps(), log8(_mm256_mul_ps(_mm256_sub_ps(one, x), _mm256_add_ps(one, x))));
  const __m256 pc = poly(_mm256_sub_ps(w, _mm256_set1_ps(2.5f)), cc, 9);
  const __m256 central = _mm256_cmp_ps(w, _mm256_set1_ps(5.0f), _CMP_LT_OQ);
  if (_mm256_movemask_ps(central) == 0xFF) return _mm256_mul_ps(pc, x);  // |x| < 0.9966: the usual case
  const __m256 pt = poly(_mm256_sub_ps(_mm256_sqrt_ps(w), _mm256_set1_ps(3.0f)), ct, 9);
  return _mm256_mul_ps(_mm256_blendv_ps(pt, pc, central), x);
}

// Distribution values of one group of 8 blocks, transposed to element order (32 floats).
TF_AVX2 inline void group_values(const __m256i w[4], const InitParams& prm, float* out) {
  __m256 v[4];
  if (prm.kind == kUniform) {
    const __m256 lo = _mm256_set1_ps(prm.p0), span = _mm256_set1_ps(prm.p1 - prm.p0);
    for (int r = 0; r < 4; ++r) v[r] = _mm256_add_ps(lo, _mm256_mul_ps(span, unit8(w[r])));
  } else if (prm.kind == kNormal) {
    const __m256 mean = _mm256_set1_ps(prm.p0), std = _mm256_set1_ps(prm.p1);
    for (int r = 0; r < 4; r += 2) {
      const __m256 rad = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(unit8(w[r]))));
      __m256 s, c;
      sincos8(_mm256_mul_ps(_mm256_set1_ps(6.2831854820251465f), unit8(w[r + 1])), s, c);
      v[r] = _mm256_add_ps(mean, _mm256_mul_ps(std, _mm256_mul_ps(rad, c)));
      v[r + 1] = _mm256_add_ps(mean, _mm256_mul_ps(std, _mm256_mul_ps(rad, s)));
    }
  } else {  // kTruncNormal (kConstant never reaches here)
    const __m256 lo = _mm256_set1_ps(prm.p0), span = _mm256_set1_ps(prm.p1 - prm.p0);
    const __m256 a = _mm256_set1_ps(prm.p2), b = _mm256_set1_ps(prm.p3);
    const __m256 mean = _mm256_set1_ps(prm.p4), scale = _mm256_set1_ps(prm.p5);
    for (int r = 0; r < 4; ++r) {
      const __m256 t = _mm256_add_ps(lo, _mm256_mul_ps(span, unit8(w[r])));
      const __m256 z = _mm256_add_ps(mean, _mm256_mul_ps(scale, erfinv8(t)));
      v[r] = _mm256_min_ps(_mm256_max_ps(z, a), b);
    }
  }
  // Transpose (word r of block l) -> element 4 l + r.
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

// Values of 16 blocks = 64 consecutive elements starting at element 4 * blk0, in element order.
TF_AVX2 inline void values64(uint64_t seed, uint64_t stream, uint64_t blk0, const InitParams& prm, float* out) {
  __m256i w[2][4];
  philox16(seed, blk0, stream, w);
  group_values(w[0], prm, out);
  group_values(w[1], prm, out + 32);
}

#undef TF_AVX2

}  // namespace avx2
}  // namespace torchfast

#endif
