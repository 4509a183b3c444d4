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
#pragma GCC push_options
#pragma GCC target("avx2")
#define TORCHFAST_CLIP_ISA clip_avx2
#include "cpu/clip_grad_kernels.h"
#undef TORCHFAST_CLIP_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define TORCHFAST_CLIP_ISA clip_avx512
#include "cpu/clip_grad_kernels.h"
#undef TORCHFAST_CLIP_ISA
#pragma GCC pop_options
#endif
