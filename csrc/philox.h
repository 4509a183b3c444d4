// torchfast's counter-based random stream, shared by the CPU and CUDA kernels (the Triton kernel and
// the pure-PyTorch reference implement the same definition; docs/philox.md in the README spells it out).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block & 0xffffffff, block >> 32, stream & 0xffffffff, stream >> 32)
// where `stream` is the position of the tensor in the batch and `block = i / 4` for element i (in
// row-major logical order); element i takes 32-bit word i % 4 of that block's output.
//
// Every distribution is computed in float32, each operation rounded on its own; fma(a, b, c) is the
// fused multiply-add a * b + c rounded once (IEEE fusedMultiplyAdd, exact on every backend), and no
// other multiply and add is ever contracted into one:
//   uniform word w  -> u = ((w >> 9) * 2 + 1) * 2^-24, exactly representable, in (0, 1)
//   uniform(lo, hi) -> lo + (hi - lo) * u  (a multiply and an add)
//   normal          -> Box-Muller on the word pairs (0,1) and (2,3) of a block:
//                      r = sqrt(-2 log u_even), a = std * r, t = 2 pi u_odd,
//                      value_even = fma(a, cos t, mean), value_odd = fma(a, sin t, mean), with log,
//                      sin and cos the explicit float32 functions log_f32 and sincos_2pi_unit below
//                      (not libm's), so normal values too are the same bits on every backend
//   trunc normal    -> inverse CDF: t = fma(hi - lo, u, lo) with lo = 2 Phi(alpha) - 1 and
//                      hi = 2 Phi(beta) - 1, value = clamp(fma(std sqrt(2), erfinv(t), mean), a, b)
//                      (the algorithm of torch.nn.init.trunc_normal_, without rejection and so
//                      without any host synchronisation)
// float64 tensors take the full-precision variant at the end of this file (philox_values_f64): 53-bit
// uniforms, Box-Muller with libm's log and the stream's own float64 sin/cos, and a truncated normal
// whose erf-domain value is taken from its nearer end (erfc), precise in the tails.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace torchfast {

enum InitKind : int64_t { kUniform = 0, kNormal = 1, kTruncNormal = 2, kConstant = 3 };

// Parameters per tensor in philox_fill_'s list: six for the float32 stream (InitParams), eight for the
// float64 stream's truncated normal (InitParams64); the unused ones are 0.
constexpr int kInitParams = 8;

struct Philox4x32 {
  static constexpr uint32_t M0 = 0xD2511F53u;
  static constexpr uint32_t M1 = 0xCD9E8D57u;
  static constexpr uint32_t W0 = 0x9E3779B9u;
  static constexpr uint32_t W1 = 0xBB67AE85u;

  TF_HD static void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    lo = a * b;
    hi = __umulhi(a, b);
#else
    uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
    lo = static_cast<uint32_t>(p);
    hi = static_cast<uint32_t>(p >> 32);
#endif
  }

  // Ten rounds over counter c with key k; writes the four output words to out.
  TF_HD static void block(uint64_t seed, uint64_t blk, uint64_t stream, uint32_t out[4]) {
    uint32_t c0 = static_cast<uint32_t>(blk), c1 = static_cast<uint32_t>(blk >> 32);
    uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(M0, c0, hi0, lo0);
      mulhilo(M1, c2, hi1, lo1);
      uint32_t n0 = hi1 ^ c1 ^ k0;
      uint32_t n2 = hi0 ^ c3 ^ k1;
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      k0 += W0;
      k1 += W1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
  }
};

// Multiplication and addition each rounded to float32, never contracted into an FMA; fma_rn is the
// explicit fused multiply-add (std::fma is exact: one instruction where the CPU has FMA, glibc's
// correctly rounded fmaf elsewhere).
TF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the CPU sources are compiled with -ffp-contract=off
#endif
}
TF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

TF_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

TF_HD float word_to_unit(uint32_t w) {
  // (2k + 1) * 2^-24 with k < 2^23: exact in float32, strictly inside (0, 1).
  return static_cast<float>((w >> 9) * 2u + 1u) * 5.9604644775390625e-08f;
}

TF_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
TF_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}
TF_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// The transcendental functions of the float32 distributions, built from +, -, *, fma, sqrt and integer
// operations only, each rounded on its own: every backend (CPU scalar, AVX2, AVX-512, CUDA, Triton,
// the reference) evaluates them to the same bits, unlike libm's logf/sinf/cosf. No division and no
// slow path (sincosf's Payne-Hanek reduction needs a stack frame on the GPU); every polynomial is
// Horner's rule with one fma per coefficient.
//
// The coefficients, highest power first, one list each (also used by cpu/philox_avx2.h and avx512.h):
// log: Q(f) = (log(1 + f) - f) / f^2 on [sqrt(1/2) - 1, sqrt(2) - 1], minimax, degree 8;
#define TF_LOG_Q                                                                                      \
  -0x1.417a50p-4f, 0x1.06690cp-3f, -0x1.0c6052p-3f, 0x1.229ea6p-3f, -0x1.5487dep-3f, 0x1.99a394p-3f, \
      -0x1.000208p-2f, 0x1.55554ep-2f, -0x1.fffffep-2f
#define TF_LN2 0x1.62e430p-1f  // log(2) rounded to float32
// sin(pi r) = r P(r^2) and cos(pi r) = C(r^2) on |r| <= 1/4, minimax, degrees 7 and 8;
#define TF_SIN_PI -0x1.2d9bb8p-1f, 0x1.465ec6p+1f, -0x1.4abbbap+2f, 0x1.921fb6p+1f
#define TF_COS_PI 0x1.d9c366p-3f, -0x1.55c57cp+0f, 0x1.03c1dcp+2f, -0x1.3bd3ccp+2f, 1.0f
// Giles' single-precision erfinv, central (w < 5) and tail branches.
#define TF_ERFINV_CENTRAL                                                                                 \
  2.81022636e-08f, 3.43273939e-07f, -3.5233877e-06f, -4.39150654e-06f, 0.00021858087f, -0.00125372503f, \
      -0.00417768164f, 0.246640727f, 1.50140941f
#define TF_ERFINV_TAIL                                                                                   \
  -0.000200214257f, 0.000100950558f, 0.00134934322f, -0.00367342844f, 0.00573950773f, -0.0076224613f, \
      0.00943887047f, 1.00167406f, 2.83297682f

TF_HD float horner(float x, const float* c, int n) {
  float p = c[0];
  for (int i = 1; i < n; ++i) p = fma_rn(p, x, c[i]);
  return p;
}

// log_f32: natural log of 0 (-inf) or a positive normal float. With its bits b,
// e = (b - bits(sqrt(1/2))) >> 23 (arithmetic) and m = float(b - (e << 23)) in [sqrt(1/2), sqrt(2)),
// so x = 2^e m exactly; f = m - 1 (exact), log m = fma(f Q(f), f, f) with Q(f) = (log(1 + f) - f) / f^2
// a degree-8 minimax polynomial, log x = fma(e, ln 2, log m). At most 0.86 ulp off (measured against
// float64 over all 2^23 unit values the generator draws and 4M random floats in (0, 1]).
TF_HD float log_f32(float x) {
  constexpr float kQ[9] = {TF_LOG_Q};
  const uint32_t bits = float_bits(x);
  const int32_t e = static_cast<int32_t>(bits - 0x3f3504f3u) >> 23;
  const float m = bits_float(bits - (static_cast<uint32_t>(e) << 23));
  const float f = add_rn(m, -1.0f);
  const float r = fma_rn(static_cast<float>(e), TF_LN2, fma_rn(mul_rn(f, horner(f, kQ, 9)), f, f));
  return x == 0.0f ? -INFINITY : r;
}

// sin and cos of 2 pi u for the unit value u of word w (word_to_unit), computed from the word: with
// n = 2 (w >> 9) + 1, 2u = n 2^-23 = q / 2 + r, q = round(4u) in 0..4 and r = (n - q 2^22) 2^-23
// in [-1/4, 1/4], both exact (integers); then minimax polynomials sin(pi r) = r P(r^2) (degree 7) and
// cos(pi r) = C(r^2) (degree 8) and the quadrant q's swap and signs. At most 1.7 ulp (8.5e-8) off.
TF_HD void sincos_2pi_unit(uint32_t w, float& s, float& c) {
  constexpr float kSin[4] = {TF_SIN_PI};
  constexpr float kCos[5] = {TF_COS_PI};
  const int32_t n = static_cast<int32_t>((w >> 9) * 2u + 1u);
  const int32_t q = (n + (1 << 21)) >> 22;
  const float r = mul_rn(static_cast<float>(n - q * (1 << 22)), 0x1p-23f);
  const float t = mul_rn(r, r);
  const float sp = mul_rn(horner(t, kSin, 4), r);
  const float cp = horner(t, kCos, 5);
  const int quadrant = q & 3;  // angle = quadrant * pi/2 + pi r
  const float a = (quadrant & 1) ? cp : sp, b = (quadrant & 1) ? sp : cp;
  s = (quadrant & 2) ? -a : a;
  c = (quadrant == 1 || quadrant == 2) ? -b : b;
}

// erfinv in float32 (M. Giles, "Approximating the erfinv function", GPU Computing Gems, 2010), with
// log_f32, a correctly rounded sqrt and fma Horner steps.
TF_HD float erfinv_f32(float x) {
  constexpr float kCentral[9] = {TF_ERFINV_CENTRAL};
  constexpr float kTail[9] = {TF_ERFINV_TAIL};
  const float w = -log_f32(mul_rn(add_rn(1.0f, -x), add_rn(1.0f, x)));
  const float p = w < 5.0f ? horner(add_rn(w, -2.5f), kCentral, 9) : horner(add_rn(sqrt_rn(w), -3.0f), kTail, 9);
  return mul_rn(p, x);
}

// Parameters of one tensor's distribution, already rounded to float32 by the caller.
struct InitParams {
  int64_t kind;
  float p0, p1, p2, p3;  // uniform: lo, hi | normal: mean, std | trunc: lo, hi (erf domain), a, b
  float p4;              // trunc: mean; p5: std * sqrt(2)
  float p5;
};

// Values of the four elements of block `blk` of stream `stream`.
TF_HD void philox_values(uint64_t seed, uint64_t stream, uint64_t blk, const InitParams& prm, float v[4]) {
  if (prm.kind == kConstant) {
    v[0] = v[1] = v[2] = v[3] = prm.p0;
    return;
  }
  uint32_t w[4];
  Philox4x32::block(seed, blk, stream, w);
  if (prm.kind == kUniform) {
    float span = add_rn(prm.p1, -prm.p0);
    for (int r = 0; r < 4; ++r) v[r] = add_rn(prm.p0, mul_rn(span, word_to_unit(w[r])));
  } else if (prm.kind == kNormal) {
    for (int r = 0; r < 4; r += 2) {
      const float a = mul_rn(prm.p1, sqrt_rn(mul_rn(-2.0f, log_f32(word_to_unit(w[r])))));
      float s, c;
      sincos_2pi_unit(w[r + 1], s, c);
      v[r] = fma_rn(a, c, prm.p0);
      v[r + 1] = fma_rn(a, s, prm.p0);
    }
  } else {  // kTruncNormal
    float span = add_rn(prm.p1, -prm.p0);
    for (int r = 0; r < 4; ++r) {
      const float z = fma_rn(prm.p5, erfinv_f32(fma_rn(span, word_to_unit(w[r]), prm.p0)), prm.p4);
      v[r] = fminf(fmaxf(z, prm.p2), prm.p3);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float64 tensors: full precision (torchfast/reference/philox.py, values_f64, is the definition).
// Truncated-normal parameters extend the float32 stream's: (lo, span, a, b, mean, std sqrt(2), qlo, qhi)
// with alpha' = (a - mean) / (std sqrt(2)), beta' likewise, lo = erf(alpha'), span = erf(beta') - lo,
// qlo = erfc(-alpha') = 1 + lo and qhi = erfc(beta') = 1 - erf(beta'), each computed (by torchfast.init)
// so that it keeps its relative precision. The drawn point t = lo + span u is also known by its
// distances from -1 and 1, dl = qlo + span u and dh = qhi + span (1 - u): sums of positive terms,
// with nothing cancelling however deep in a tail, and the inverse takes t near 0 and min(dl, dh) near
// the poles (erfinv_f64).
// Element i takes block i / 2 and the word pair (2 (i % 2), 2 (i % 2) + 1) as W = w_even << 32 | w_odd;
// u = ((W >> 11) * 2 + 1) * 2^-54, exact, in (0, 1). Each float64 operation rounded on its own.

TF_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

TF_HD double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

TF_HD double word_pair_to_unit64(uint32_t hi, uint32_t lo) {
  const uint64_t k = (static_cast<uint64_t>(hi) << 21) | (lo >> 11);  // < 2^53
  return static_cast<double>(k * 2u + 1u) * 5.5511151231257827e-17;   // (2k + 1) 2^-54, exact
}

// sin and cos of 2 pi u for the float64 unit value u = (2k + 1) 2^-54 (word_pair_to_unit64's k),
// computed from k as sincos_2pi_unit does from its word: with n = 2k + 1, 2u = n 2^-53 = q / 2 + r,
// q = round(4u) in 0..4 and r = (n - q 2^52) 2^-53 in [-1/4, 1/4], both exact; then Taylor polynomials
// of sin(pi r) (to r^19) and cos(pi r) (to r^18) in float64 and the quadrant's swap and signs. Within
// 1.6 ulp of the exact values; only + - * on every backend, so the same bits everywhere (and no
// Payne-Hanek slow path with its stack frame on the GPU).
TF_HD void sincos_2pi_unit64(uint64_t k, double& s, double& c) {
  const int64_t n = static_cast<int64_t>(k * 2u + 1u);
  const int64_t q = (n + (int64_t{1} << 51)) >> 52;
  const double r = dmul_rn(static_cast<double>(n - q * (int64_t{1} << 52)), 0x1p-53);
  const double t = dmul_rn(r, r);
  const double sc[10] = {0x1.921fb54442d18p+1,  -0x1.4abbce625be53p+2, 0x1.466bc6775aae2p+1,
                         -0x1.32d2cce62bd86p-1, 0x1.50783487ee782p-4,  -0x1.e3074fde8871fp-8,
                         0x1.e8f434d018d63p-12, -0x1.6fadb9f155744p-16, 0x1.aaec32af93359p-21,
                         -0x1.8a404211f9547p-26};
  const double cc[10] = {0x1.0000000000000p+0,  -0x1.3bd3cc9be45dep+2, 0x1.03c1f081b5ac4p+2,
                         -0x1.55d3c7e3cbffap+0, 0x1.e1f506891babbp-3,  -0x1.a6d1f2a204a8cp-6,
                         0x1.f9d38a3763cc3p-10, -0x1.b6e24f44b128fp-14, 0x1.20c62c2f2d7f5p-18,
                         -0x1.2a0c591af8314p-23};
  double sp = sc[9], cp = cc[9];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 8; i >= 0; --i) {
    sp = dadd_rn(dmul_rn(sp, t), sc[i]);
    cp = dadd_rn(dmul_rn(cp, t), cc[i]);
  }
  sp = dmul_rn(sp, r);
  const int quadrant = static_cast<int>(q & 3);  // angle = quadrant * pi/2 + pi r
  const double a = (quadrant & 1) ? cp : sp, b = (quadrant & 1) ? sp : cp;
  s = (quadrant & 2) ? -a : a;
  c = (quadrant == 1 || quadrant == 2) ? -b : b;
}

// The float64 truncated normal's inverse: z with erf(z) = t, given t (exact near 0) and the distance d
// of t from the nearer of -1 and 1 (exact near the poles). In the body (d >= 1/2, so |t| <= 1/2) Newton
// runs on erf(z) = |t|; in the tails on erfc(z) = d, which keeps its relative precision however small d
// is, so the tails are as precise as the body. Start point: Giles' single-precision polynomial in
// float64 (w = -log((1 - x)(1 + x)), x = |t|) where w < 5, the asymptotic sqrt(-log(d sqrt(pi)
// sqrt(-log d))) beyond; then four Newton steps. Relative error below 1e-15 (to 1e-300 in the tails).
TF_HD double erfinv_f64(double t, double d) {
  const bool central = d >= 0.5;
  const double x = central ? fabs(t) : dadd_rn(1.0, -d);
  const double q = central ? dadd_rn(1.0, -x) : d;
  const double w = -log(dmul_rn(q, dadd_rn(1.0, x)));
  double z;
  if (w < 5.0) {
    const double c[9] = {2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                         -0.00125372503, -0.00417768164, 0.246640727, 1.50140941};
    double p = c[0];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 1; i < 9; ++i) p = dadd_rn(dmul_rn(p, dadd_rn(w, -2.5)), c[i]);
    z = dmul_rn(p, x);
  } else {
    z = sqrt(-log(dmul_rn(dmul_rn(q, sqrt(-log(q))), 1.7724538509055159)));
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 4; ++i) {
    const double r = central ? dadd_rn(erf(z), -x) : dadd_rn(q, -erfc(z));
    z = dadd_rn(z, -(r / dmul_rn(1.1283791670955126, exp(-dmul_rn(z, z)))));
  }
  return z;
}

// Parameters of one float64 tensor's distribution (as InitParams, unrounded).
struct InitParams64 {
  int64_t kind;
  double p[8];
};

// Values of the two elements of block `blk` of stream `stream` of a float64 tensor.
TF_HD void philox_values_f64(uint64_t seed, uint64_t stream, uint64_t blk, const InitParams64& prm, double v[2]) {
  if (prm.kind == kConstant) {
    v[0] = v[1] = prm.p[0];
    return;
  }
  uint32_t w[4];
  Philox4x32::block(seed, blk, stream, w);
  const double u0 = word_pair_to_unit64(w[0], w[1]), u1 = word_pair_to_unit64(w[2], w[3]);
  if (prm.kind == kUniform) {
    const double span = dadd_rn(prm.p[1], -prm.p[0]);
    v[0] = dadd_rn(prm.p[0], dmul_rn(span, u0));
    v[1] = dadd_rn(prm.p[0], dmul_rn(span, u1));
  } else if (prm.kind == kNormal) {
    const double rad = sqrt(dmul_rn(log(u0), -2.0));
    double s, c;
    sincos_2pi_unit64((static_cast<uint64_t>(w[2]) << 21) | (w[3] >> 11), s, c);
    v[0] = dadd_rn(prm.p[0], dmul_rn(prm.p[1], dmul_rn(rad, c)));
    v[1] = dadd_rn(prm.p[0], dmul_rn(prm.p[1], dmul_rn(rad, s)));
  } else {  // kTruncNormal: p = (lo, span, a, b, mean, std sqrt(2), qlo, qhi), see above
#if defined(__CUDA_ARCH__)
#pragma unroll  // v in registers: a run-time index would put it on the stack
#endif
    for (int r = 0; r < 2; ++r) {
      const double u = r == 0 ? u0 : u1;
      const double t = dadd_rn(prm.p[0], dmul_rn(prm.p[1], u));
      const double dl = dadd_rn(prm.p[6], dmul_rn(prm.p[1], u));
      const double dh = dadd_rn(prm.p[7], dmul_rn(prm.p[1], dadd_rn(1.0, -u)));
      const double d = fmin(dl, dh);
      const double z = erfinv_f64(t, d);
      const bool negative = d >= 0.5 ? t < 0.0 : dl < dh;
      v[r] = fmin(fmax(dadd_rn(prm.p[4], dmul_rn(prm.p[5], negative ? -z : z)), prm.p[2]), prm.p[3]);
    }
  }
}

}  // namespace torchfast
