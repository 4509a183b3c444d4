// Multi-tensor gradient clipping on CUDA.
// Both read and write 16-byte vectors wherever a chunk starts 16-byte aligned, four loads in flight
// per thread.
//   multi_tensor_norm:  chunk kernel(s) writing one partial per chunk (1 read of every tensor),
//                       then one single-block kernel folding the partials in chunk order: no
//                       atomics, so the result is deterministic; nothing is read by the host.
//   multi_tensor_clip_: chunk kernel(s) reading the total norm from device memory, computing
//                       min(max_norm / (total + 1e-6), 1) per block and returning early when it is
//                       exactly 1 (x * 1 == x); otherwise 1 read + 1 write.
// Graph-capturable: the chunk tables are kernel parameters and the workspace comes from the
// caching allocator.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>

#include "cuda/multi_tensor.cuh"
#include "disjoint.h"
#include "cuda/runtime.cuh"

namespace torchfast {
namespace cuda {
namespace {

enum NormKind : int { kOne = 0, kTwo = 1, kInf = 2, kP = 3 };

// 16-byte vectors each thread loads before using any (loads in flight; a chunk is 32 vectors per
// thread in fp32, 16 in half precision).
constexpr int kUnroll = 4;

template <typename acc_t>
struct Combine {
  int kind;
  __device__ acc_t operator()(acc_t a, acc_t b) const {
    if (kind == kInf) return (a != a || b != b) ? (a + b) : (a > b ? a : b);  // NaN propagates
    return a + b;
  }
};

// One element's contribution; KIND is a template parameter so the inner loops carry no branch on it.
template <int KIND, typename acc_t>
__device__ __forceinline__ void norm_add(acc_t p, const Combine<acc_t>& op, acc_t v, acc_t& acc) {
  const acc_t a = ::abs(v);
  if constexpr (KIND == kOne) acc += a;
  else if constexpr (KIND == kTwo) acc += a * a;
  else if constexpr (KIND == kInf) acc = op(acc, a);
  else acc += ::pow(a, p);
}

// One block per chunk. The chunk is read in 16-byte vectors when its start is 16-byte aligned (every
// chunk of an aligned tensor: kChunk is a multiple of the vector width), its last numel % V elements
// one at a time.
// Elements before the first 16-byte boundary of a chunk starting at p with n elements: 0 for an
// aligned chunk; n (no vector body at all) when p is not even element-aligned or the chunk ends first.
template <typename scalar_t>
__host__ __device__ inline int64_t head_elements(const scalar_t* p, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(scalar_t) != 0) return n;
  const int64_t head = static_cast<int64_t>((16 - a % 16) % 16 / sizeof(scalar_t));
  return head < n ? head : n;
}

template <typename scalar_t, typename acc_t, int KIND>
__global__ void norm_chunks_kernel(ChunkTable table, acc_t p, acc_t* partial) {
  constexpr int V = 16 / sizeof(scalar_t);
  __shared__ acc_t shared[32];
  const int slot = table.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[slot], begin + kChunk);
  const scalar_t* x = static_cast<const scalar_t*>(table.ptr[slot]);
  const Combine<acc_t> op{KIND};
  acc_t acc = 0;
  int64_t i = begin + threadIdx.x;
  const int64_t head = head_elements(x + begin, end - begin);
  if (head < end - begin) {
    // A misaligned tensor's first elements up to a 16-byte boundary one per thread, then vectors.
    if (threadIdx.x < head) norm_add<KIND>(p, op, static_cast<acc_t>(ld(x + begin + threadIdx.x)), acc);
    const scalar_t* body = x + begin + head;
    const int64_t nvec = (end - begin - head) / V, bd = blockDim.x;
    int64_t q = threadIdx.x;
    // kUnroll independent 16-byte loads in flight per thread, accumulated in the order the
    // one-at-a-time loop would (vector q, q + bd, ...): the same sum, bit for bit.
    for (; q + (kUnroll - 1) * bd < nvec; q += kUnroll * bd) {
      Vec<scalar_t, V> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<V>(body + (q + u * bd) * V);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k) norm_add<KIND>(p, op, static_cast<acc_t>(v[u].v[k]), acc);
    }
    for (; q < nvec; q += bd) {
      const Vec<scalar_t, V> v = load_vec<V>(body + q * V);
#pragma unroll
      for (int k = 0; k < V; ++k) norm_add<KIND>(p, op, static_cast<acc_t>(v.v[k]), acc);
    }
    i = begin + head + nvec * V + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) norm_add<KIND>(p, op, static_cast<acc_t>(ld(x + i)), acc);
  acc = block_reduce(acc, op, shared);
  if (threadIdx.x == 0) st(partial + table.first_block + blockIdx.x, acc);
}

template <typename acc_t>
__global__ void norm_finish_kernel(const acc_t* partial, int64_t n, int kind, acc_t p, acc_t* out) {
  __shared__ acc_t shared[32];
  Combine<acc_t> op{kind};
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc = op(acc, ld(partial + i));
  acc = block_reduce(acc, op, shared);
  if (threadIdx.x == 0) {
    if (kind == kTwo) acc = ::sqrt(acc);
    else if (kind == kP) acc = ::pow(acc, acc_t(1) / p);
    *out = acc;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void clip_chunks_kernel(ChunkTable table, const acc_t* total_norm, acc_t max_norm) {
  constexpr int V = 16 / sizeof(scalar_t);
  const acc_t coef = max_norm / (*total_norm + acc_t(1e-6));
  if (coef >= acc_t(1)) return;  // clamp(coef, max=1) == 1: nothing changes
  const int slot = table.tensor_of_block[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[slot], begin + kChunk);
  scalar_t* x = static_cast<scalar_t*>(table.ptr[slot]);
  int64_t i = begin + threadIdx.x;
  const int64_t head = head_elements(x + begin, end - begin);
  if (head < end - begin) {
    if (threadIdx.x < head) {  // a misaligned tensor's first elements, up to a 16-byte boundary
      scalar_t* e = x + begin + threadIdx.x;
      st(e, static_cast<scalar_t>(static_cast<acc_t>(ld(e)) * coef));
    }
    scalar_t* body = x + begin + head;
    const int64_t nvec = (end - begin - head) / V, bd = blockDim.x;
    int64_t q = threadIdx.x;
    for (; q + (kUnroll - 1) * bd < nvec; q += kUnroll * bd) {  // kUnroll loads in flight, then the stores
      Vec<scalar_t, V> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<V>(body + (q + u * bd) * V);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) v[u].v[k] = static_cast<scalar_t>(static_cast<acc_t>(v[u].v[k]) * coef);
        store_vec<V>(body + (q + u * bd) * V, v[u]);
      }
    }
    for (; q < nvec; q += bd) {
      Vec<scalar_t, V> v = load_vec<V>(body + q * V);
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = static_cast<scalar_t>(static_cast<acc_t>(v.v[k]) * coef);
      store_vec<V>(body + q * V, v);
    }
    i = begin + head + nvec * V + threadIdx.x;
  }
  for (; i < end; i += blockDim.x) st(x + i, static_cast<scalar_t>(static_cast<acc_t>(ld(x + i)) * coef));
}

void check_list(at::TensorList tensors, const char* op) {
  const auto& t0 = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensor ", i, " has layout ", t.layout(),
                "; sparse gradients are not supported, use torch.nn.utils.clip_grad_norm_");
    TORCH_CHECK(on_device(t) && t.device() == t0.device(), op, ": tensor ", i, " is on ", t.device(),
                " but tensor 0 is on ", t0.device(), "; group tensors by device first");
    TORCH_CHECK(t.scalar_type() == t0.scalar_type(), op, ": tensor ", i, " is ", t.scalar_type(),
                " but tensor 0 is ", t0.scalar_type(), "; group tensors by dtype first");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected floating-point tensors, got ",
                t.scalar_type());
  }
}

at::Tensor multi_tensor_norm_cuda(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "multi_tensor_norm: expected at least one tensor");
  TORCH_CHECK(norm_type > 0, "multi_tensor_norm: norm_type must be > 0 or inf, got ", norm_type);
  check_list(tensors, "multi_tensor_norm");
  for (const auto& t : tensors)  // torch.nn.utils.clip_grad_norm_ refuses this too, with this message
    TORCH_CHECK(!(std::isinf(norm_type) && t.numel() == 0), "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation does not have an identity");
  TF_DEVICE_GUARD(guard, tensors[0].device());
  std::vector<at::Tensor> dense;
  for (const auto& t : tensors) dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  const int kind = std::isinf(norm_type) ? kInf : norm_type == 1.0 ? kOne : norm_type == 2.0 ? kTwo : kP;
  const auto dtype = tensors[0].scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t nchunks = total_chunks(dense);
  at::Tensor partial = at::zeros({std::max<int64_t>(nchunks, 1)}, tensors[0].options().dtype(acc_type));
  at::Tensor out = at::empty({}, tensors[0].options().dtype(acc_type));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pp = partial.data_ptr<acc_t>();
    const acc_t p = static_cast<acc_t>(norm_type);
    for_each_table(dense, [&](const ChunkTable& table, int, int nb) {
      if (kind == kOne) TF_LAUNCH(nb, kThreads, 0, stream, norm_chunks_kernel<scalar_t, acc_t, kOne>)(table, p, pp);
      else if (kind == kTwo) TF_LAUNCH(nb, kThreads, 0, stream, norm_chunks_kernel<scalar_t, acc_t, kTwo>)(table, p, pp);
      else if (kind == kInf) TF_LAUNCH(nb, kThreads, 0, stream, norm_chunks_kernel<scalar_t, acc_t, kInf>)(table, p, pp);
      else TF_LAUNCH(nb, kThreads, 0, stream, norm_chunks_kernel<scalar_t, acc_t, kP>)(table, p, pp);
      TF_LAUNCH_CHECK();
    });
    TF_LAUNCH(1, 1024, 0, stream, norm_finish_kernel<acc_t>)(pp, nchunks, kind, static_cast<acc_t>(norm_type),
                                                      out.data_ptr<acc_t>());
    TF_LAUNCH_CHECK();
  });
  return out;
}

void multi_tensor_clip_cuda(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  if (tensors.empty()) return;
  check_list(tensors, "multi_tensor_clip_");
  TORCH_CHECK(total_norm.numel() == 1, "multi_tensor_clip_: total_norm must have one element, got ",
              total_norm.numel());
  TORCH_CHECK(total_norm.device() == tensors[0].device(), "multi_tensor_clip_: total_norm is on ",
              total_norm.device(), " but the tensors are on ", tensors[0].device());
  TF_DEVICE_GUARD(guard, tensors[0].device());
  std::vector<at::Tensor> dense, strided;
  for (const auto& t : tensors) (t.is_non_overlapping_and_dense() ? dense : strided).push_back(t);
  // An expanded (stride-0) tensor cannot be scaled in place: refused before anything is written.
  for (const auto& t : strided) at::assert_no_internal_overlap(t);
  const auto dtype = tensors[0].scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor total = total_norm.reshape({}).to(acc_type);  // device-side cast, no sync
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_clip_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* tp = total.data_ptr<acc_t>();
    // A gradient listed twice (or two views of one block) is scaled by separate launches, one after
    // another on the stream: the blocks of one launch write at once (disjoint.h).
    for (const auto& pass : disjoint_passes(dense))
      for_each_table(pass, [&](const ChunkTable& table, int, int nb) {
        TF_LAUNCH(nb, kThreads, 0, stream, clip_chunks_kernel<scalar_t, acc_t>)(table, tp, static_cast<acc_t>(max_norm));
        TF_LAUNCH_CHECK();
      });
  });
  if (!strided.empty()) {
    // Rare (gradients are dense): a plain multiply by the clamped coefficient, still on the device.
    at::Tensor coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);
    for (auto& t : strided) t.mul_(coef);
  }
}

at::Tensor clip_grad_norm_fused_cuda(at::TensorList tensors, double max_norm, double norm_type) {
  at::Tensor total = multi_tensor_norm_cuda(tensors, norm_type);
  // The coefficient from the norm as returned, rounded to the gradients' dtype (stock computes it there):
  // a float16 norm that overflows to inf clips the gradients to zero, as stock's does.
  multi_tensor_clip_cuda(tensors, total.to(tensors[0].scalar_type()), max_norm);
  return total;
}

}  // namespace
}  // namespace cuda

TF_REGISTER_KERNELS(m) {
  m.impl("multi_tensor_norm", &cuda::multi_tensor_norm_cuda);
  m.impl("multi_tensor_clip_", &cuda::multi_tensor_clip_cuda);
  m.impl("clip_grad_norm_fused_", &cuda::clip_grad_norm_fused_cuda);
}

}  // namespace torchfast
