// torchfast's counter-based random stream, shared by the CPU and CUDA kernels (the Triton kernel and
// the pure-PyTorch reference implement the same definition; docs/philox.md in the README spells it out).
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block & 0xffffffff, block >> 32, stream & 0xffffffff, stream >> 32)
// where `stream` is the position of the tensor in the batch and `block = i / 4` for element i (in
// row-major logical order); element i takes 32-bit word i % 4 of that block's output.
//
// Every distribution is computed in float32 with each operation rounded separately (no FMA):
//   uniform word w  -> u = ((w >> 9) * 2 + 1) * 2^-24, exactly representable, in (0, 1)
//   uniform(lo, hi) -> lo + (hi - lo) * u
//   normal          -> Box-Muller on the word pairs (0,1) and (2,3) of a block:
//                      r = sqrt(-2 log u_even), t = 2 pi u_odd, z_even = r cos t, z_odd = r sin t,
//                      value = mean + std * z
//   trunc normal    -> inverse CDF: v = lo + (hi - lo) * u with lo = 2 Phi(alpha) - 1 and
//                      hi = 2 Phi(beta) - 1, value = clamp(mean + std * sqrt(2) * erfinv(v), a, b)
//                      (the algorithm of torch.nn.init.trunc_normal_, without rejection and so
//                      without any host synchronisation)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace torchfast {

enum InitKind : int64_t { kUniform = 0, kNormal = 1, kTruncNormal = 2, kConstant = 3 };

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

// Multiplication and addition each rounded to float32, never contracted into an FMA.
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

TF_HD float word_to_unit(uint32_t w) {
  // (2k + 1) * 2^-24 with k < 2^23: exact in float32, strictly inside (0, 1).
  return static_cast<float>((w >> 9) * 2u + 1u) * 5.9604644775390625e-08f;
}

// erfinv in float32 (M. Giles, "Approximating the erfinv function", GPU Computing Gems, 2010).
TF_HD float erfinv_f32(float x) {
  float w = -logf(mul_rn(add_rn(1.0f, -x), add_rn(1.0f, x)));
  float p;
  if (w < 5.0f) {
    w = add_rn(w, -2.5f);
    p = 2.81022636e-08f;
    p = add_rn(3.43273939e-07f, mul_rn(p, w));
    p = add_rn(-3.5233877e-06f, mul_rn(p, w));
    p = add_rn(-4.39150654e-06f, mul_rn(p, w));
    p = add_rn(0.00021858087f, mul_rn(p, w));
    p = add_rn(-0.00125372503f, mul_rn(p, w));
    p = add_rn(-0.00417768164f, mul_rn(p, w));
    p = add_rn(0.246640727f, mul_rn(p, w));
    p = add_rn(1.50140941f, mul_rn(p, w));
  } else {
    w = add_rn(sqrtf(w), -3.0f);
    p = -0.000200214257f;
    p = add_rn(0.000100950558f, mul_rn(p, w));
    p = add_rn(0.00134934322f, mul_rn(p, w));
    p = add_rn(-0.00367342844f, mul_rn(p, w));
    p = add_rn(0.00573950773f, mul_rn(p, w));
    p = add_rn(-0.0076224613f, mul_rn(p, w));
    p = add_rn(0.00943887047f, mul_rn(p, w));
    p = add_rn(1.00167406f, mul_rn(p, w));
    p = add_rn(2.83297682f, mul_rn(p, w));
  }
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
      float rad = sqrtf(mul_rn(-2.0f, logf(word_to_unit(w[r]))));
      float theta = mul_rn(6.2831854820251465f, word_to_unit(w[r + 1]));
      float s, c;
#if defined(__CUDA_ARCH__)
      sincosf(theta, &s, &c);
#else
      s = sinf(theta);
      c = cosf(theta);
#endif
      v[r] = add_rn(prm.p0, mul_rn(prm.p1, mul_rn(rad, c)));
      v[r + 1] = add_rn(prm.p0, mul_rn(prm.p1, mul_rn(rad, s)));
    }
  } else {  // kTruncNormal
    float span = add_rn(prm.p1, -prm.p0);
    for (int r = 0; r < 4; ++r) {
      float t = add_rn(prm.p0, mul_rn(span, word_to_unit(w[r])));
      float z = add_rn(prm.p4, mul_rn(prm.p5, erfinv_f32(t)));
      v[r] = fminf(fmaxf(z, prm.p2), prm.p3);
    }
  }
}

}  // namespace torchfast
