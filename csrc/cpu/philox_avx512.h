// AVX-512F version of philox_avx2.h: 32 Philox blocks (128 elements) per step, the same float32
// operation sequences (so every distribution's values stay bitwise equal to every other backend's).
// Chosen at run time when the CPU has
// AVX-512F (TORCHFAST_NO_AVX512=1 turns it off, for tests and comparisons).
#pragma once

#include "cpu/philox_avx2.h"

#ifdef TORCHFAST_HAVE_AVX2_PATH
namespace torchfast {
namespace avx512 {

#define TF_AVX512 __attribute__((target("avx512f")))

TF_AVX512 inline void mulhilo16(__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(c, m);
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

// Words w[g][0..3] of blocks blk0 + 16 g + l (lane l), g = 0, 1, interleaved for latency hiding.
TF_AVX512 inline void philox32(uint64_t seed, uint64_t blk0, uint64_t stream, __m512i w[2][4]) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i a0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0))), lane);
  __m512i b0 = _mm512_add_epi32(a0, _mm512_set1_epi32(16));
  __m512i a1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(blk0 >> 32))), b1 = a1;
  __m512i a2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream))), b2 = a2;
  __m512i a3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32))), b3 = a3;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(Philox4x32::M0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(Philox4x32::M1));
  for (int r = 0; r < 10; ++r) {
    const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(k0)), kk1 = _mm512_set1_epi32(static_cast<int>(k1));
    __m512i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
    mulhilo16(a0, m0, ahi0, alo0);
    mulhilo16(b0, m0, bhi0, blo0);
    mulhilo16(a2, m1, ahi1, alo1);
    mulhilo16(b2, m1, bhi1, blo1);
    a0 = _mm512_xor_si512(_mm512_xor_si512(ahi1, a1), kk0);
    b0 = _mm512_xor_si512(_mm512_xor_si512(bhi1, b1), kk0);
    a2 = _mm512_xor_si512(_mm512_xor_si512(ahi0, a3), kk1);
    b2 = _mm512_xor_si512(_mm512_xor_si512(bhi0, b3), kk1);
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

TF_AVX512 inline __m512 unit16(__m512i w) {
  const __m512i k = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), _mm512_set1_epi32(1));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(k), _mm512_set1_ps(5.9604644775390625e-08f));
}

TF_AVX512 inline __m512 mul16(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
TF_AVX512 inline __m512 add16(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
TF_AVX512 inline __m512 set16(float v) { return _mm512_set1_ps(v); }

// philox.h's horner: one fma per coefficient.
TF_AVX512 inline __m512 horner16(__m512 x, const float* c, int n) {
  __m512 p = set16(c[0]);
  for (int i = 1; i < n; ++i) p = _mm512_fmadd_ps(p, x, set16(c[i]));
  return p;
}

TF_AVX512 inline __m512 flip_sign(__m512 v, __m512i sign_bits) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign_bits));
}

// philox.h's log_f32 on 16 lanes.
TF_AVX512 inline __m512 log16(__m512 x) {
  static const float lq[9] = {TF_LOG_Q};
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i e = _mm512_srai_epi32(_mm512_sub_epi32(bits, _mm512_set1_epi32(0x3f3504f3)), 23);
  const __m512 m = _mm512_castsi512_ps(_mm512_sub_epi32(bits, _mm512_slli_epi32(e, 23)));
  const __m512 f = _mm512_sub_ps(m, set16(1.0f));
  const __m512 lm = _mm512_fmadd_ps(mul16(f, horner16(f, lq, 9)), f, f);
  const __m512 r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), set16(TF_LN2), lm);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ), r, set16(-INFINITY));
}

// philox.h's sincos_2pi_unit on 16 lanes.
TF_AVX512 inline void sincos16(__m512i w, __m512& s, __m512& c) {
  static const float sc[4] = {TF_SIN_PI};
  static const float cc[5] = {TF_COS_PI};
  const __m512i n = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), _mm512_set1_epi32(1));
  const __m512i q = _mm512_srli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(1 << 21)), 22);
  const __m512 r = mul16(_mm512_cvtepi32_ps(_mm512_sub_epi32(n, _mm512_slli_epi32(q, 22))), set16(0x1p-23f));
  const __m512 t = mul16(r, r);
  const __m512 sp = mul16(horner16(t, sc, 4), r);
  const __m512 cp = horner16(t, cc, 5);
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512 a = _mm512_mask_blend_ps(odd, sp, cp), b = _mm512_mask_blend_ps(odd, cp, sp);
  s = flip_sign(a, _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 30));
  c = flip_sign(b, _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30));
}

TF_AVX512 inline __m512 erfinv16(__m512 x) {
  static const float cc[9] = {TF_ERFINV_CENTRAL};
  static const float ct[9] = {TF_ERFINV_TAIL};
  const __m512 one = set16(1.0f);
  const __m512 w = _mm512_sub_ps(_mm512_setzero_ps(),
                                 log16(mul16(add16(one, _mm512_sub_ps(_mm512_setzero_ps(), x)), add16(one, x))));
  const __m512 pc = horner16(add16(w, set16(-2.5f)), cc, 9);
  const __mmask16 central = _mm512_cmp_ps_mask(w, set16(5.0f), _CMP_LT_OQ);
  if (central == 0xFFFF) return mul16(pc, x);
  const __m512 pt = horner16(add16(_mm512_sqrt_ps(w), set16(-3.0f)), ct, 9);
  return mul16(_mm512_mask_blend_ps(central, pt, pc), x);
}

// 16 blocks -> 64 consecutive elements in element order.
TF_AVX512 inline void group_values(const __m512i w[4], const InitParams& prm, float* out) {
  __m512 v[4];
  if (prm.kind == kUniform) {
    const __m512 lo = _mm512_set1_ps(prm.p0), span = _mm512_set1_ps(prm.p1 - prm.p0);
    for (int r = 0; r < 4; ++r) v[r] = _mm512_add_ps(lo, _mm512_mul_ps(span, unit16(w[r])));
  } else if (prm.kind == kNormal) {
    const __m512 mean = _mm512_set1_ps(prm.p0), std = _mm512_set1_ps(prm.p1);
    for (int r = 0; r < 4; r += 2) {
      const __m512 a = mul16(std, _mm512_sqrt_ps(mul16(set16(-2.0f), log16(unit16(w[r])))));
      __m512 s, c;
      sincos16(w[r + 1], s, c);
      v[r] = _mm512_fmadd_ps(a, c, mean);
      v[r + 1] = _mm512_fmadd_ps(a, s, mean);
    }
  } else {  // kTruncNormal
    const __m512 lo = _mm512_set1_ps(prm.p0), span = _mm512_set1_ps(prm.p1 - prm.p0);
    const __m512 a = _mm512_set1_ps(prm.p2), b = _mm512_set1_ps(prm.p3);
    const __m512 mean = _mm512_set1_ps(prm.p4), scale = _mm512_set1_ps(prm.p5);
    for (int r = 0; r < 4; ++r) {
      const __m512 z = _mm512_fmadd_ps(scale, erfinv16(_mm512_fmadd_ps(span, unit16(w[r]), lo)), mean);
      v[r] = _mm512_min_ps(_mm512_max_ps(z, a), b);
    }
  }
  // (word r of block l) -> element 4 l + r: the AVX2 transpose within 128-bit lanes, which leaves
  // lane k of u_j holding block 4 k + j, then a 4x4 transpose of 128-bit lanes.
  const __m512 t0 = _mm512_unpacklo_ps(v[0], v[1]), t1 = _mm512_unpackhi_ps(v[0], v[1]);
  const __m512 t2 = _mm512_unpacklo_ps(v[2], v[3]), t3 = _mm512_unpackhi_ps(v[2], v[3]);
  const __m512 u0 = _mm512_shuffle_ps(t0, t2, 0x44), u1 = _mm512_shuffle_ps(t0, t2, 0xEE);
  const __m512 u2 = _mm512_shuffle_ps(t1, t3, 0x44), u3 = _mm512_shuffle_ps(t1, t3, 0xEE);
  const __m512 x0 = _mm512_shuffle_f32x4(u0, u1, 0x44), x1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
  const __m512 x2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), x3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  _mm512_storeu_ps(out + 0, _mm512_shuffle_f32x4(x0, x1, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(x0, x1, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(x2, x3, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(x2, x3, 0xDD));
}

// Values of 32 blocks = 128 consecutive elements starting at element 4 * blk0.
TF_AVX512 inline void values128(uint64_t seed, uint64_t stream, uint64_t blk0, const InitParams& prm, float* out) {
  __m512i w[2][4];
  philox32(seed, blk0, stream, w);
  group_values(w[0], prm, out);
  group_values(w[1], prm, out + 64);
}

#undef TF_AVX512

}  // namespace avx512
}  // namespace torchfast
#endif
