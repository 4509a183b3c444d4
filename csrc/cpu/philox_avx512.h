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

// Horner, each multiply and add rounded on its own (never fused): philox.h's order, bit for bit.
TF_AVX512 inline __m512 horner16(__m512 x, const float* c, int n) {
  __m512 p = set16(c[0]);
  for (int i = 1; i < n; ++i) p = add16(mul16(p, x), set16(c[i]));
  return p;
}

TF_AVX512 inline __m512 flip_sign(__m512 v, __m512i sign_bits) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign_bits));
}

// philox.h's log_f32 on 16 lanes.
TF_AVX512 inline __m512 log16(__m512 x) {
  static const float lg[4] = {0x1.c71c72p-3f, 0x1.24924ap-2f, 0x1.99999ap-2f, 0x1.555556p-1f};
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i mant = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffff));
  const __mmask16 big = _mm512_cmpgt_epi32_mask(mant, _mm512_set1_epi32(0x3504f3));  // m > sqrt(2)
  const __m512 m = _mm512_castsi512_ps(
      _mm512_or_si512(mant, _mm512_mask_blend_epi32(big, _mm512_set1_epi32(0x3f800000), _mm512_set1_epi32(0x3f000000))));
  const __m512i e0 =
      _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff)), _mm512_set1_epi32(127));
  const __m512i ei = _mm512_mask_add_epi32(e0, big, e0, _mm512_set1_epi32(1));
  const __m512 e = _mm512_cvtepi32_ps(ei);
  const __m512 f = _mm512_sub_ps(m, set16(1.0f));
  const __m512 s = _mm512_div_ps(f, add16(f, set16(2.0f)));
  const __m512 z = mul16(s, s);
  const __m512 R = mul16(horner16(z, lg, 4), z);
  const __m512 hfsq = mul16(mul16(f, f), set16(0.5f));
  const __m512 t = add16(mul16(s, add16(hfsq, R)), mul16(e, set16(0x1.2fefa2p-17f)));
  const __m512 r = _mm512_sub_ps(mul16(e, set16(0x1.62e3p-1f)), _mm512_sub_ps(_mm512_sub_ps(hfsq, t), f));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ), r, set16(-INFINITY));
}

// philox.h's sincos_2pi_unit on 16 lanes.
TF_AVX512 inline void sincos16(__m512i w, __m512& s, __m512& c) {
  static const float sc[5] = {0x1.507834p-4f, -0x1.32d2ccp-1f, 0x1.466bc6p+1f, -0x1.4abbcep+2f, 0x1.921fb6p+1f};
  static const float cc[6] = {-0x1.a6d1f2p-6f, 0x1.e1f506p-3f, -0x1.55d3c8p+0f, 0x1.03c1f0p+2f, -0x1.3bd3ccp+2f,
                              1.0f};
  const __m512i n = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(w, 9), 1), _mm512_set1_epi32(1));
  const __m512i q = _mm512_srli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(1 << 21)), 22);
  const __m512 r = mul16(_mm512_cvtepi32_ps(_mm512_sub_epi32(n, _mm512_slli_epi32(q, 22))), set16(0x1p-23f));
  const __m512 t = mul16(r, r);
  const __m512 sp = mul16(horner16(t, sc, 5), r);
  const __m512 cp = horner16(t, cc, 6);
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512 a = _mm512_mask_blend_ps(odd, sp, cp), b = _mm512_mask_blend_ps(odd, cp, sp);
  s = flip_sign(a, _mm512_slli_epi32(_mm512_and_si512(q, _mm512_set1_epi32(2)), 30));
  c = flip_sign(b, _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2)), 30));
}

TF_AVX512 inline __m512 erfinv16(__m512 x) {
  static const float cc[9] = {2.81022636e-08f, 3.43273939e-07f, -3.5233877e-06f, -4.39150654e-06f,
                              0.00021858087f, -0.00125372503f, -0.00417768164f, 0.246640727f, 1.50140941f};
  static const float ct[9] = {-0.000200214257f, 0.000100950558f, 0.00134934322f, -0.00367342844f,
                              0.00573950773f, -0.0076224613f, 0.00943887047f, 1.00167406f, 2.83297682f};
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
      const __m512 rad = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(unit16(w[r]))));
      __m512 s, c;
      sincos16(w[r + 1], s, c);
      v[r] = _mm512_add_ps(mean, _mm512_mul_ps(std, _mm512_mul_ps(rad, c)));
      v[r + 1] = _mm512_add_ps(mean, _mm512_mul_ps(std, _mm512_mul_ps(rad, s)));
    }
  } else {  // kTruncNormal
    const __m512 lo = _mm512_set1_ps(prm.p0), span = _mm512_set1_ps(prm.p1 - prm.p0);
    const __m512 a = _mm512_set1_ps(prm.p2), b = _mm512_set1_ps(prm.p3);
    const __m512 mean = _mm512_set1_ps(prm.p4), scale = _mm512_set1_ps(prm.p5);
    for (int r = 0; r < 4; ++r) {
      const __m512 t = _mm512_add_ps(lo, _mm512_mul_ps(span, unit16(w[r])));
      const __m512 z = _mm512_add_ps(mean, _mm512_mul_ps(scale, erfinv16(t)));
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
