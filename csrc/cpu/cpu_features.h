// Run-time CPU feature checks for the kernels compiled with per-function target attributes
// (philox_avx2.h, philox_avx512.h, half_convert.h). Each can be turned off from the environment,
// which the tests use to check the fallback paths:
//   TORCHFAST_NO_AVX2=1    no AVX2 (+FMA) path      TORCHFAST_NO_AVX512=1  no AVX-512F path
//   TORCHFAST_NO_F16C=1    no F16C path
#pragma once

#include <cstdlib>

namespace torchfast {
namespace cpu_features {

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2 and FMA3 (every AVX2 processor from Intel and AMD has both; checked anyway).
inline bool has_avx2() {
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !std::getenv("TORCHFAST_NO_AVX2");
  return has;
}

inline bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && !std::getenv("TORCHFAST_NO_AVX512");
  return has;
}

inline bool has_f16c() {
  static const bool has =
      __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c") && !std::getenv("TORCHFAST_NO_F16C");
  return has;
}
#else
inline bool has_avx2() { return false; }
inline bool has_avx512() { return false; }
inline bool has_f16c() { return false; }
#endif

}  // namespace cpu_features
}  // namespace torchfast
