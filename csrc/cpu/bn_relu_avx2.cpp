// The CPU BatchNorm(+add)+ReLU kernels compiled for AVX2 (8-float vectors), chosen at run time by
// bn_relu.cpp. Every header is included before the target pragma, so only the kernels themselves
// (namespace bn_cpu_avx2) are AVX2 code; nothing here runs on a CPU without AVX2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <unistd.h>

#if defined(__SSE2__)
#include <immintrin.h>
#define TORCHFAST_STREAM_STORES 1
#endif

#include "cpu/half_convert.h"
#include "layout.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define TORCHFAST_BN_ISA bn_cpu_avx2
#define TORCHFAST_BN_AVX2 1
#include "cpu/bn_relu_kernels.h"
#undef TORCHFAST_BN_AVX2
#undef TORCHFAST_BN_ISA
#pragma GCC pop_options
#endif
