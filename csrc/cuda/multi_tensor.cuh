// The multi-tensor machinery shared by clipping and init on CUDA.
//
// A list of tensors is cut into chunks of kChunk elements; each CUDA block of a launch handles one
// chunk. The chunk table travels in the kernel's parameters (no host-to-device copy, so a launch
// can be captured in a CUDA graph and never waits for the host). With CUDA >= 12.1 a kernel may take
// 32 KB of parameters, so one launch covers up to kMaxTensors tensors and kMaxBlocks chunks; longer
// lists take several launches. Blocks are numbered globally (`first_block`) so a reduction can
// write one partial per chunk and fold them later in a fixed order.
#pragma once

#include <ATen/ATen.h>

#include "cuda/runtime.cuh"

#include <cstdint>
#include <vector>

namespace torchfast {
namespace cuda {

#if defined(TORCHFAST_CUDA_EMULATION)
// Small tables and chunks, so that the emulator tests reach table flushes, tensors split across
// launches and multi-chunk tensors with small inputs. The logic is the same for any values.
constexpr int kMaxTensors = 5;
constexpr int kMaxBlocks = 7;
constexpr int64_t kChunk = 1028;
#elif defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxTensors = 320;
constexpr int kMaxBlocks = 1024;
constexpr int64_t kChunk = 65536;  // elements per block; a multiple of 4 (Philox blocks)
#else  // the classic 4 KB parameter limit
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 96;
constexpr int64_t kChunk = 65536;
#endif
static_assert(kChunk % 4 == 0, "a chunk must hold whole Philox blocks");
#if defined(TORCHFAST_CUDA_EMULATION)
constexpr int kThreads = 32;  // one warp: the emulator's small chunks still give each thread several
                              // vectors, so the unrolled loops run (and their tails)
#else
constexpr int kThreads = 512;
#endif

struct ChunkTable {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t list_index[kMaxTensors];  // position of the slot's tensor in the caller's list
  int32_t tensor_of_block[kMaxBlocks];
  int32_t chunk_of_block[kMaxBlocks];
  int64_t first_block;  // global number of block 0 of this launch
};

// Per-tensor parameters of an init launch, indexed like ChunkTable::ptr.
struct InitTable {
  int64_t stream[kMaxTensors];
  int32_t kind[kMaxTensors];
  float param[kMaxTensors][6];
};

inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Total number of chunks (= blocks over all launches) for a list.
inline int64_t total_chunks(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += num_chunks(t.numel());
  return n;
}

// Calls launch(table, nslots, nblocks) for successive tables covering every chunk of every tensor, in
// list order. A tensor that does not fit the current table continues in the next one.
template <typename Launch>
void for_each_table(at::TensorList tensors, Launch&& launch) {
  ChunkTable table;
  table.first_block = 0;
  int nt = 0, nb = 0;
  int64_t launched = 0;
  auto flush = [&]() {
    if (nb > 0) launch(table, nt, nb);
    launched += nb;
    table.first_block = launched;
    nt = 0;
    nb = 0;
  };
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const at::Tensor& t = tensors[i];
    const int64_t n = t.numel();
    if (n == 0) continue;
    if (nt == kMaxTensors) flush();
    table.ptr[nt] = t.data_ptr();
    table.numel[nt] = n;
    table.list_index[nt] = static_cast<int32_t>(i);
    const int64_t chunks = num_chunks(n);
    for (int64_t c = 0; c < chunks; ++c) {
      if (nb == kMaxBlocks) {
        nt += 1;  // the current tensor's slot is part of the flushed table...
        flush();  // ...and moves to slot 0 of the next one
        table.ptr[0] = t.data_ptr();
        table.numel[0] = n;
        table.list_index[0] = static_cast<int32_t>(i);
      }
      table.tensor_of_block[nb] = nt;
      table.chunk_of_block[nb] = static_cast<int32_t>(c);
      ++nb;
    }
    ++nt;
  }
  flush();
}

// Block-wide sum (or max) of one value per thread; the result is valid in thread 0.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) / 32;
  v = threadIdx.x < nwarps ? shared[threadIdx.x] : shared[0];
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) {
      T other = __shfl_down_sync(0xffffffffu, v, o);
      if (lane + o < nwarps) v = op(v, other);
    }
  }
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace torchfast
