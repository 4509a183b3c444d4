// The clipping loops compiled for AVX2 and for AVX-512 (chosen at run time by clip_grad.cpp). Every
// header is included before the target pragmas, so only the loops themselves use those instructions.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/clip_grad_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// Both sets also convert float16 with F16C and bfloat16 with AVX2 bit operations
// (TORCHFAST_CLIP_F16C); clip_grad.cpp takes them for float16 tensors only when the CPU has F16C.
#define TORCHFAST_CLIP_F16C 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define TORCHFAST_CLIP_ISA clip_avx2
#include "cpu/clip_grad_kernels.h"
#undef TORCHFAST_CLIP_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,f16c")
#define TORCHFAST_CLIP_ISA clip_avx512
#include "cpu/clip_grad_kernels.h"
#undef TORCHFAST_CLIP_ISA
#pragma GCC pop_options
#undef TORCHFAST_CLIP_F16C
#endif
