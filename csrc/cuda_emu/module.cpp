// The CUDA kernels of csrc/cuda/, compiled for the CPU emulator (emulator.h) into one test-only
// module: tests/test_cuda_emulation.py builds it with g++ and calls torch.ops.torchfast_emu.* on
// CPU tensors. Never part of the installed package.
#ifndef TORCHFAST_CUDA_EMULATION
#error "build this file with -DTORCHFAST_CUDA_EMULATION"
#endif

#include <torch/extension.h>

#include "schemas.h"

#include "cuda/bn_relu.cu"
#include "cuda/clip_grad.cu"
#include "cuda/init.cu"

TORCH_LIBRARY(torchfast_emu, m) { torchfast::define_ops(m); }

namespace {

// The multiply-high division of runtime.cuh, checked against plain division by the tests.
std::vector<int64_t> fast_divmod(int64_t divisor, const std::vector<int64_t>& numerators) {
  const torchfast::cuda::FastDivmod d(static_cast<uint64_t>(divisor));
  std::vector<int64_t> out;
  for (int64_t n : numerators) {
    TORCH_CHECK(n >= 0, "fast_divmod: numerators must be >= 0");
    uint64_t q, r;
    d.divmod(static_cast<uint64_t>(n), q, r);
    out.push_back(static_cast<int64_t>(q));
    out.push_back(static_cast<int64_t>(r));
  }
  return out;
}

// Kernels that break the rules on purpose, to show the emulator reports them instead of passing.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();  // waits for thread 1, which waits for lane 0 at the shuffle
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  }
}

__global__ void half_warp_shuffle_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 8);
}

__global__ void misaligned_kernel(int* out) {
  const auto v = torchfast::cuda::load_vec<4>(reinterpret_cast<const float*>(out) + 1);  // 4 bytes past 16
  out[threadIdx.x] = static_cast<int>(v.v[0]);
}

__global__ void shuffle_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, 3);
}

std::vector<int> emulator_self_test(const std::string& which) {
  std::vector<int> out(64, -1);
  if (which == "deadlock") TF_LAUNCH(1, 64, 0, 0, deadlock_kernel)(out.data());
  else if (which == "half_warp") TF_LAUNCH(1, 32, 0, 0, half_warp_shuffle_kernel)(out.data());
  else if (which == "shuffle") TF_LAUNCH(1, 64, 0, 0, shuffle_kernel)(out.data());
  else if (which == "misaligned") TF_LAUNCH(1, 32, 0, 0, misaligned_kernel)(out.data());
  else if (which == "bad_block") TF_LAUNCH(1, 1025, 0, 0, shuffle_kernel)(out.data());
  else if (which == "bad_grid") TF_LAUNCH(dim3(1, 65536), 32, 0, 0, shuffle_kernel)(out.data());
  else TORCH_CHECK(false, "emulator_self_test: unknown case ", which);
  return out;
}

}  // namespace

void set_schedule(int schedule) {
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "set_schedule: 0 (thread order), 1 (reverse) or 2 (shuffled)");
  tfemu::g_schedule = schedule;
}

int64_t launch_count() { return tfemu::g_launches; }

// The 32-bit multiply-high division, checked like fast_divmod; and the switch that makes the kernels
// take their 64-bit index paths on small tensors.
std::vector<int64_t> fast_divmod32(int64_t divisor, const std::vector<int64_t>& numerators) {
  const torchfast::cuda::FastDivmod32 d(static_cast<uint64_t>(divisor));
  std::vector<int64_t> out;
  for (int64_t n : numerators) {
    TORCH_CHECK(n >= 0 && n < (int64_t(1) << 31), "fast_divmod32: numerators must be in [0, 2^31)");
    uint32_t q, r;
    d.divmod(static_cast<uint32_t>(n), q, r);
    out.push_back(q);
    out.push_back(r);
  }
  return out;
}

void force_index64(bool on) { torchfast::cuda::g_force_index64 = on; }

// The traffic model (emulator.h): on/off, and per launch since it was switched on
// (requests, sectors, useful bytes, distinct bytes read, distinct bytes written).
void set_traffic(bool on) {
  tfemu::g_traffic = on;
  tfemu::g_traffic_log.clear();
}

std::vector<std::vector<int64_t>> traffic_log() {
  std::vector<std::vector<int64_t>> out;
  for (const auto& t : tfemu::g_traffic_log)
    out.push_back({static_cast<int64_t>(t.requests), static_cast<int64_t>(t.sectors),
                   static_cast<int64_t>(t.useful_bytes), static_cast<int64_t>(t.read_bytes),
                   static_cast<int64_t>(t.write_bytes)});
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launch_count", &launch_count);
  m.def("set_traffic", &set_traffic);
  m.def("traffic_log", &traffic_log);
  m.def("fast_divmod", &fast_divmod);
  m.def("fast_divmod32", &fast_divmod32);
  m.def("force_index64", &force_index64);
  m.def("set_schedule", &set_schedule);
  m.def("emulator_self_test", &emulator_self_test);
}
