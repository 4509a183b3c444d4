// Batched Philox init on CUDA: one launch covers a whole batch (per 320 tensors / 1024 chunks of
// 64K elements); each thread makes one Philox call per 4 consecutive elements. Memory traffic: one
// write of each tensor, as one vector store per Philox call (16 bytes for fp32), also for views at odd
// element offsets (their vectors straddle two Philox blocks: warp shuffles, see philox_fill_kernel).
// Values follow csrc/philox.h exactly (bitwise equal to the CPU and reference backends: every float op
// is an explicit round-to-nearest intrinsic, never an FMA).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "cuda/runtime.cuh"
#include "philox.h"

namespace torchfast {
namespace cuda {
namespace {

// Stores w[0..3] to elements [i, i + 4) below `limit`: one 16-byte (fp32) or 8-byte (fp16/bf16) vector
// store when `vector` (out + i aligned) and all four are in range, else scalar stores.
template <typename scalar_t>
__device__ __forceinline__ void store4(scalar_t* out, int64_t i, int64_t limit, bool vector, const float w[4]) {
  if (vector && i + 4 <= limit) {
    Vec<scalar_t, 4> x;
#pragma unroll
    for (int r = 0; r < 4; ++r) x.v[r] = static_cast<scalar_t>(w[r]);
    store_vec<4>(out + i, x);
  } else {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (i + r < limit) st(out + i + r, static_cast<scalar_t>(w[r]));
  }
}

// Values for elements [e0, e0 + 4) of a tensor whose 16-byte-aligned vectors start H elements after
// its Philox blocks' starts: the last 4 - H values of one block (v) and the first H of the next (nx).
template <int H, typename scalar_t>
__device__ __forceinline__ void store_straddling(scalar_t* out, int64_t e0, int64_t n, const float v[4],
                                                 const float nx[4]) {
  float w[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) w[r] = r < 4 - H ? v[H + r] : nx[r - (4 - H)];
  store4(out, e0, n, true, w);
}

template <typename scalar_t>
__global__ void philox_fill_kernel(ChunkTable table, InitTable init, uint64_t seed) {
  const int slot = table.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[slot], begin + kChunk);
  scalar_t* out = static_cast<scalar_t*>(table.ptr[slot]);
  InitParams prm;
  prm.kind = init.kind[slot];
  prm.p0 = init.param[slot][0];
  prm.p1 = init.param[slot][1];
  prm.p2 = init.param[slot][2];
  prm.p3 = init.param[slot][3];
  prm.p4 = init.param[slot][4];
  prm.p5 = init.param[slot][5];
  const uint64_t stream = static_cast<uint64_t>(init.stream[slot]);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(out);
  if (addr % (4 * sizeof(scalar_t)) != 0 && addr % sizeof(scalar_t) == 0) {
    // A view at an odd element offset: its aligned vectors [4j + h, 4j + h + 4) straddle Philox blocks
    // j and j + 1. Each warp computes 32 consecutive blocks and stores 31 whole vectors, taking the
    // next block's first h values from the next lane, so a warp's stores stay one contiguous run of
    // full sectors (4 scalar stores per thread, 16 bytes apart, would use a quarter of each sector).
    // The chunk owns vectors j in [begin / 4, ceil(end / 4)); the tensor's first h elements (before its
    // first aligned one) are stored by the thread holding block 0.
    const int h = 4 - static_cast<int>((addr / sizeof(scalar_t)) % 4);
    const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
    const int64_t n = table.numel[slot], jend = (end + 3) / 4;
    for (int64_t j0 = begin / 4 + 31 * warp; j0 < jend; j0 += 31 * static_cast<int64_t>(blockDim.x / 32)) {
      const int64_t j = j0 + lane;  // warp-uniform loop: every lane takes part in the shuffle
      float v[4], nx[4];
      philox_values(seed, stream, static_cast<uint64_t>(j), prm, v);
#pragma unroll
      for (int r = 0; r < 4; ++r) nx[r] = __shfl_down_sync(0xffffffffu, v[r], 1);
      if (j == 0) {
#pragma unroll
        for (int r = 0; r < 3; ++r)
          if (r < h && r < n) st(out + r, static_cast<scalar_t>(v[r]));
      }
      const int64_t e0 = 4 * j + h;
      if (lane < 31 && j < jend && e0 < n) {
        if (h == 1)
          store_straddling<1>(out, e0, n, v, nx);
        else if (h == 2)
          store_straddling<2>(out, e0, n, v, nx);
        else
          store_straddling<3>(out, e0, n, v, nx);
      }
    }
    return;
  }
  const bool aligned = addr % (4 * sizeof(scalar_t)) == 0;
  for (int64_t i = begin + 4 * static_cast<int64_t>(threadIdx.x); i < end; i += 4 * static_cast<int64_t>(blockDim.x)) {
    float v[4];
    philox_values(seed, stream, static_cast<uint64_t>(i >> 2), prm, v);
    store4(out, i, end, aligned, v);  // i % 4 == 0: out + i is aligned when out is
  }
}

// float64 tensors: two elements per Philox block at full precision (philox_values_f64). Their unrounded
// parameters do not fit the kernel's parameter table beside the chunk table, so they come from a small
// device buffer indexed by the tensor's position in the caller's list.
__global__ void philox_fill_f64_kernel(ChunkTable table, InitTable init, const double* params, uint64_t seed) {
  const int slot = table.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[slot], begin + kChunk);
  double* out = static_cast<double*>(table.ptr[slot]);
  InitParams64 prm;
  prm.kind = init.kind[slot];
  const int64_t li = table.list_index[slot];
#pragma unroll
  for (int k = 0; k < kInitParams; ++k) prm.p[k] = params[kInitParams * li + k];
  const uint64_t stream = static_cast<uint64_t>(init.stream[slot]);
  for (int64_t i = begin + 2 * static_cast<int64_t>(threadIdx.x); i < end; i += 2 * static_cast<int64_t>(blockDim.x)) {
    double v[2];
    philox_values_f64(seed, stream, static_cast<uint64_t>(i >> 1), prm, v);
    st(out + i, v[0]);
    if (i + 1 < end) st(out + i + 1, v[1]);
  }
}

void philox_fill_cuda(at::TensorList tensors, int64_t seed, at::IntArrayRef streams, at::IntArrayRef kinds,
                      at::ArrayRef<double> params) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(static_cast<int64_t>(streams.size()) == n && static_cast<int64_t>(kinds.size()) == n &&
                  static_cast<int64_t>(params.size()) == kInitParams * n,
              "philox_fill_: expected one stream, one kind and ", kInitParams, " params per tensor");
  if (n == 0) return;
  const auto dtype = tensors[0].scalar_type();
  for (int64_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(on_device(t) && t.device() == tensors[0].device(), "philox_fill_: tensor ", i, " is on ",
                t.device(), " but tensor 0 is on ", tensors[0].device());
    TORCH_CHECK(t.scalar_type() == dtype, "philox_fill_: tensor ", i, " is ", t.scalar_type(), " but tensor 0 is ",
                dtype, "; group tensors by dtype first");
    TORCH_CHECK(t.is_contiguous(), "philox_fill_: tensor ", i, " must be contiguous");
    TORCH_CHECK(kinds[i] >= kUniform && kinds[i] <= kConstant, "philox_fill_: unknown kind ", kinds[i]);
  }
  TORCH_CHECK(at::isFloatingType(dtype), "philox_fill_: expected floating-point tensors, got ", dtype);
  TF_DEVICE_GUARD(guard, tensors[0].device());
  const Stream stream = current_stream();
  if (dtype == at::kDouble) {
    const at::Tensor prm = at::tensor(params, at::kDouble).to(tensors[0].device(), /*non_blocking=*/true);
    for_each_table(tensors, [&](const ChunkTable& table, int nslots, int nb) {
      InitTable init;
      for (int s = 0; s < nslots; ++s) {
        const int64_t li = table.list_index[s];
        init.stream[s] = streams[li];
        init.kind[s] = static_cast<int32_t>(kinds[li]);
      }
      TF_LAUNCH(nb, 256, 0, stream, philox_fill_f64_kernel)(table, init, prm.data_ptr<double>(),
                                                             static_cast<uint64_t>(seed));
      TF_LAUNCH_CHECK();
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "philox_fill_cuda", [&] {
    for_each_table(tensors, [&](const ChunkTable& table, int nslots, int nb) {
      InitTable init;  // per-slot parameters, from the slot's position in the caller's list
      for (int s = 0; s < nslots; ++s) {
        const int64_t li = table.list_index[s];
        init.stream[s] = streams[li];
        init.kind[s] = static_cast<int32_t>(kinds[li]);
        for (int k = 0; k < 6; ++k) init.param[s][k] = static_cast<float>(params[kInitParams * li + k]);
      }
      TF_LAUNCH(nb, 256, 0, stream, philox_fill_kernel<scalar_t>)(table, init, static_cast<uint64_t>(seed));
      TF_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cuda

TF_REGISTER_KERNELS(m) { m.impl("philox_fill_", &cuda::philox_fill_cuda); }

}  // namespace torchfast
