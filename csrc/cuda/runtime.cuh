// What the CUDA kernel files need from the CUDA runtime and ATen's CUDA layer, in one place, so the
// same sources build two ways:
//   - for the GPU (nvcc, the normal build): real launches, streams, device guards, registration for
//     the CUDA dispatch key of the `torchfast` library;
//   - for the CPU emulator (g++ with TORCHFAST_CUDA_EMULATION, tests/test_cuda_emulation.py): every
//     CUDA thread runs as a fiber (csrc/cuda_emu/emulator.h), the ops take CPU tensors and register
//     for the CPU key of a separate `torchfast_emu` library. That is how CI, which has no GPU,
//     executes the CUDA kernels' indexing, vector paths, barriers and shuffles.
#pragma once

#include <ATen/ATen.h>

#if defined(TORCHFAST_CUDA_EMULATION)

#include "cuda_emu/emulator.h"

namespace torchfast {
namespace cuda {
using Stream = int;
inline Stream current_stream() { return 0; }
inline int64_t multiprocessor_count() { return 3; }  // small, so grid-stride loops wrap in tests
// Resident blocks per SM of a kernel (the occupancy API's answer on a GPU): 2 here (with 3 SMs, few
// splits, so the reductions' unrolled loops run on the tests' small shapes).
template <typename Kernel>
int64_t blocks_per_sm(Kernel, int) {
  return 2;
}
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
}  // namespace cuda
}  // namespace torchfast

#define TF_LAUNCH(grid, block, smem, stream, ...) ::tfemu::Launch(grid, block, __VA_ARGS__)
#define TF_LAUNCH_CHECK() ((void)0)
#define TF_DEVICE_GUARD(name, device) ((void)(device))
#define TF_REGISTER_KERNELS(m) TORCH_LIBRARY_IMPL(torchfast_emu, CPU, m)

#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace torchfast {
namespace cuda {
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// Resident blocks per SM of `kernel` at `threads` threads per block (registers and shared memory
// decide), at least 1.
template <typename Kernel>
int64_t blocks_per_sm(Kernel kernel, int threads) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return n > 0 ? n : 1;
}
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
}  // namespace cuda
}  // namespace torchfast

#define TF_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define TF_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define TF_DEVICE_GUARD(name, device) c10::cuda::CUDAGuard name(device)
#define TF_REGISTER_KERNELS(m) TORCH_LIBRARY_IMPL(torchfast, CUDA, m)

#endif

namespace torchfast {
namespace cuda {

// n / d and n % d for a divisor fixed at launch, by multiply-high and shift (Granlund & Montgomery,
// "Division by invariant integers using multiplication", 1994, the round-up variant with an
// N+1-bit multiplier 2^64 + m). Exact for every n < 2^63. A 64-bit hardware division costs dozens of
// instructions on a GPU; this costs a 64-bit multiply-high and an add.
struct FastDivmod {
  using index_t = uint64_t;
  uint64_t d = 1, m = 1;
  int shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint64_t divisor) : d(divisor) {
    TORCH_CHECK(divisor >= 1 && divisor < (uint64_t(1) << 63), "FastDivmod: divisor out of range");
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;  // shift = ceil(log2(d))
    const unsigned __int128 one = 1;
    m = static_cast<uint64_t>(((one << 64) * ((one << shift) - d)) / d + 1);
  }
#if defined(__CUDACC__) || defined(TORCHFAST_CUDA_EMULATION)
  __host__ __device__ __forceinline__ uint64_t div(uint64_t n) const {
#if defined(__CUDA_ARCH__)
    const uint64_t t = __umul64hi(n, m);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(n) * m) >> 64);
#endif
    return (t + n) >> shift;
  }
  __host__ __device__ __forceinline__ void divmod(uint64_t n, uint64_t& q, uint64_t& r) const {
    q = div(n);
    r = n - q * d;
  }
#endif
};

// The same for 32-bit operands (a 32-bit multiply-high: one instruction), exact for every n < 2^31:
// for passes over tensors of fewer than 2^31 elements, whose index math then stays 32-bit.
struct FastDivmod32 {
  using index_t = uint32_t;
  uint32_t d = 1, m = 1;
  int shift = 0;

  FastDivmod32() = default;
  explicit FastDivmod32(uint64_t divisor) : d(static_cast<uint32_t>(divisor)) {
    TORCH_CHECK(divisor >= 1 && divisor < (uint64_t(1) << 31), "FastDivmod32: divisor out of range");
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
#if defined(__CUDACC__) || defined(TORCHFAST_CUDA_EMULATION)
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, m);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> 32);
#endif
    return (t + n) >> shift;  // t + n < 2^32 for n < 2^31
  }
  __host__ __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * d;
  }
#endif
};

#if defined(TORCHFAST_CUDA_EMULATION)
// Tests set this to run the 64-bit index paths on small tensors.
inline bool g_force_index64 = false;
inline bool use_index32(int64_t numel) { return !g_force_index64 && numel < (int64_t(1) << 31); }
#else
inline bool use_index32(int64_t numel) { return numel < (int64_t(1) << 31); }
#endif

// Whether a pointer can be read and written in 16-byte vectors.
__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// V elements of T read or written as one aligned 16-byte (or smaller) access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Every global access of an activation, gradient or workspace goes through these four, so that the
// emulator sees it (alignment faults and the traffic model, emulator.h); on the GPU they are plain
// loads and stores.
#if defined(TORCHFAST_CUDA_EMULATION)
#define TF_RECORD(p, bytes, align, write) ::tfemu::record_access(p, bytes, align, write)
#else
#define TF_RECORD(p, bytes, align, write) ((void)0)
#endif

#if defined(__CUDACC__) || defined(TORCHFAST_CUDA_EMULATION)
template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  TF_RECORD(p, sizeof(T) * V, sizeof(T) * V, false);
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  TF_RECORD(p, sizeof(T) * V, sizeof(T) * V, true);
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T>
__device__ __forceinline__ T ld(const T* p) {
  TF_RECORD(p, sizeof(T), sizeof(T), false);
  return *p;
}

template <typename T>
__device__ __forceinline__ void st(T* p, T v) {
  TF_RECORD(p, sizeof(T), sizeof(T), true);
  *p = v;
}
#endif

}  // namespace cuda
}  // namespace torchfast
