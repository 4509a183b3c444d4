// Fused BatchNorm + ReLU, and BatchNorm + residual add + ReLU, on CUDA.
//
// Memory passes (T = activation bytes):
//   bn_relu: training forward = statistics (read x) + normalise+ReLU (read x, write y): 2T read,
//     1T write; eval forward: 1T read, 1T write; backward = reduction (read x, dy) + elementwise (read
//     x, dy, write dx): 4T read, 1T write, the ReLU mask recomputed from x with the forward's own
//     expression bn_pre_relu (below), compared with ReluOutput<scalar_t>::kZeroMax rather than 0 so
//     that it is the forward's rounded output > 0.
//   bn_add_relu: training forward = statistics (read x) + normalise+add+ReLU (read x and the
//     residual, write y): 3T read, 1T write; eval forward: 2T read, 1T write. Backward: the mask is
//     y > 0 on the saved output; training = reduction (read dy, y, x; write gm = the masked dy, which
//     is grad_residual) + elementwise (read gm, x; write dx): 5T read, 2T write; eval = the reduction
//     alone, which also writes dx = gm * weight * invstd: 3T read, 2T write.
// The normalisation is fma(x - mean, scale, bias), scale = weight * invstd (bn_pre_relu), not
// x * scale + (bias - mean * scale): when |mean| >> std (late ResNet/DenseNet layers) the folded
// shift cancels catastrophically against x * scale. The fma is explicit so that the forward and
// the bn_relu backward's recomputed mask round identically whatever the compiler contracts.
// Per-channel work goes through a [splits][2][C] partial table folded by a second kernel in a fixed
// order, in double (deterministic, no atomics). The number of splits comes from the reduction
// kernel's occupancy: about kWaves waves of resident blocks, fewer when a thread would get less than
// kVecsPerThread vectors (contiguous) or kRowsPerThread rows (channels_last) to add.
//
// Every pass reads and writes 16-byte vectors (4 fp32, 8 fp16/bf16) when the pointers are 16-byte
// aligned and the layout allows it, 8-byte vectors when only half the width fits (e.g. 14x14 maps in
// bf16), and one element at a time otherwise (same kernels, V = 1):
//   contiguous (N, C, S):
//     reductions: grid (C, splits); a block walks its channel's N rows of S as one flat sequence of
//       vectors (needs S % V == 0), one multiply-high division per vector to find the row;
//     elementwise: the tensor as one flat sequence of vectors, grid-stride; the channel of a vector
//       comes from two multiply-high divisions; a vector that straddles two (n, c) rows (S % V != 0,
//       e.g. 7x7 maps) takes each element's constants from the right one, so odd spatial sizes keep
//       full-width accesses (needs S >= V).
//   channels_last (N, S, C), and contiguous (N, C) which is the same memory:
//     threadIdx.x walks channel vectors (coalesced, constants hoisted out of the row loop), .y rows;
//     reductions fold the row lanes of a block in shared memory in a fixed order (needs C % V == 0).
// Other stride patterns are made contiguous first; a second activation (grad_out, residual, saved
// output) whose strides differ from the input's is copied into the input's layout. fp64 is correct
// but not tuned (V = 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <initializer_list>
#include <numeric>
#include <type_traits>

#include "cuda/multi_tensor.cuh"
#include "cuda/runtime.cuh"
#include "layout.h"

namespace torchfast {
namespace cuda {
namespace {

#if defined(TORCHFAST_CUDA_EMULATION)
constexpr int kBnThreads = 64;  // the test shapes are small: with 64-thread blocks they reach the unrolled loops
#else
constexpr int kBnThreads = 256;
#endif
#if defined(TORCHFAST_CUDA_EMULATION)
// Under emulation (small test shapes): a split per few vectors or rows, so the tests run reductions
// with more splits than a finish kernel has lanes.
constexpr int64_t kVecsPerThread = 1;
constexpr int64_t kRowsPerThread = 1;
#else
constexpr int64_t kVecsPerThread = 8;  // target vectors per thread of a contiguous-layout reduction split
constexpr int64_t kRowsPerThread = 16;  // target rows per thread of a channels_last reduction split
#endif
constexpr int64_t kMaxSplits = 2048;
constexpr int64_t kWaves = 3;  // target waves of a reduction grid
#if defined(TORCHFAST_CUDA_EMULATION)
constexpr int64_t kBlocksPerSM = 1;  // small grids under emulation: the grid-stride and unrolled loops wrap
#else
constexpr int64_t kBlocksPerSM = 16;  // grid cap of the grid-stride elementwise kernels
#endif
constexpr int kRowUnroll = 4;  // rows in flight per thread in the channels_last elementwise pass
constexpr int kReduceUnroll = 4;  // vectors (contiguous) or rows (channels_last) in flight in a reduction

// The widest vector for a dtype: 16 bytes, except fp64 (not tuned: one element).
template <typename scalar_t>
constexpr int max_vec() {
  return sizeof(scalar_t) >= 8 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

struct Shape {
  int64_t N, C, S;
  bool channels_last;  // memory order (N, S, C)
  __device__ __forceinline__ int64_t first(int64_t c) const { return channels_last ? c : c * S; }
};

// Per-channel table layout in `ch` (acc_t, 8 rows of C): 0 mean, 1 invstd, 2 var, 3 scale =
// weight * invstd, 4 bias (0 without one), 5 k0, 6 k1, 7 k2.
enum Row { kMean = 0, kInvstd, kVar, kScale, kBias, kK0, kK1, kK2, kRows };

template <typename T>
struct Add {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// a * b + c rounded once: an explicit fma, never left to the compiler's contraction choices.
__device__ __forceinline__ float fused_madd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_madd(double a, double b, double c) { return fma(a, b, c); }

// BatchNorm's value before the residual and the ReLU: t = x - mean (rounded in acc_t), then
// fma(t, scale, bias). The one expression of the forward and of bn_relu's backward mask, so the
// mask the backward recomputes is the forward's exactly.
template <typename acc_t>
__device__ __forceinline__ acc_t bn_pre_relu(acc_t x, acc_t mean, acc_t scale, acc_t bias) {
  return fused_madd(x - mean, scale, bias);
}

// The forward stores relu(v) rounded to scalar_t (round to nearest even), so a positive v up to
// kZeroMax, the largest acc_t value that rounds to 0 in scalar_t, gives an output of exactly 0; the
// mask bn_relu's backward recomputes is v > kZeroMax, the forward's output > 0 (as stock PyTorch's
// mask), not v > 0. kZeroMax is itself a tie between 0 and scalar_t's smallest subnormal, and rounds
// to even, 0. NaN v: false, no gradient.
template <typename scalar_t>
struct ReluOutput {  // float, double: every positive acc_t value is a positive output
  static constexpr at::opmath_type<scalar_t> kZeroMax = 0;
};
template <>
struct ReluOutput<at::Half> {  // half the smallest float16 subnormal 2^-24
  static constexpr float kZeroMax = 0x1p-25f;
};
template <>
struct ReluOutput<at::BFloat16> {  // half the smallest bfloat16 subnormal 2^-133 (a float32 subnormal)
  static constexpr float kZeroMax = 0x1p-134f;
};

// bn_relu's backward mask: whether the forward's output at v = bn_pre_relu(x) is nonzero (positive).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool relu_output_positive(acc_t v) {
  return v > acc_t(ReluOutput<scalar_t>::kZeroMax);
}

// The forward's (mean, invstd, var) outputs, written by its finish kernel (three separate tensors: the
// op's outputs must not alias, and clones of rows of the channel table were three more launches).
template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* invstd;
  acc_t* var;
};

// Fills the mean/invstd/var/scale/bias rows of channel c (and the forward's outputs, when given).
template <typename acc_t>
__device__ __forceinline__ void set_channel(int64_t C, int64_t c, acc_t mean, acc_t invstd, acc_t var, const acc_t* w,
                                            const acc_t* b, acc_t* ch, StatsOut<acc_t> out = {nullptr, nullptr, nullptr}) {
  if (out.mean != nullptr) {
    out.mean[c] = mean;
    out.invstd[c] = invstd;
    out.var[c] = var;
  }
  ch[kMean * C + c] = mean;
  ch[kInvstd * C + c] = invstd;
  ch[kVar * C + c] = var;
  const acc_t scale = (w ? w[c] : acc_t(1)) * invstd;
  ch[kScale * C + c] = scale;
  ch[kBias * C + c] = b ? b[c] : acc_t(0);
}

// Where a backward pass takes the ReLU mask from.
enum class Mask {
  kRecompute,   // bn_relu: relu_output_positive(bn_pre_relu(x)), the forward's expression on the saved input
  kFromOutput,  // bn_add_relu's reduction: y > 0 on the saved output; the masked dy is stored (gm)
  kApplied,     // bn_add_relu's elementwise pass: its gradient input is gm, already masked
};

// The activation-size tensors of a reduction pass; the op's flags say which it touches.
template <typename scalar_t>
struct ReduceIO {
  const scalar_t* x;
  const scalar_t* dy = nullptr;  // Op::kNeedsDy: grad_out
  const scalar_t* y = nullptr;   // Op::kMaskFromOutput: the saved forward output
  scalar_t* gm = nullptr;        // Op::kMaskFromOutput: dy masked by y > 0 (grad_residual), written
  scalar_t* dx = nullptr;        // Op::kMaskFromOutput, eval only (else null): dx = gm * k0, written
};

// Per-channel reduction "ops": constants of channel c, then accumulation of one element.
template <typename scalar_t, typename acc_t>
struct StatsOp {  // shifted sums sum(x - K), sum((x - K)^2), K = the channel's first element
  const scalar_t* x;
  Shape sh;
  static constexpr bool kNeedsDy = false;
  static constexpr bool kMaskFromOutput = false;
  struct Channel { acc_t K; };
  __device__ Channel channel(int64_t c) const { return {static_cast<acc_t>(x[sh.first(c)])}; }
  __device__ void add(const Channel& p, acc_t xv, acc_t, acc_t& s1, acc_t& s2) const {
    const acc_t d = xv - p.K;
    s1 += d;
    s2 += d * d;
  }
};

// The statistics the forward saved and the affine parameters (w, b may be null), read directly by
// the backward's reduction and finish kernels: no prepare launch.
template <typename acc_t>
struct SavedStats {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* w;
  const acc_t* b;
  // The forward's scale, by set_channel's expression (so bn_relu's recomputed mask is the forward's).
  __device__ __forceinline__ acc_t scale(int64_t c) const { return (w ? w[c] : acc_t(1)) * invstd[c]; }
  __device__ __forceinline__ acc_t bias(int64_t c) const { return b ? b[c] : acc_t(0); }
};

template <typename scalar_t, typename acc_t, Mask kMask>
struct BackwardSumsOp {  // sum(gm), sum(gm * (x - mean)), gm = dy * mask
  static_assert(kMask != Mask::kApplied, "a reduction masks grad_out itself");
  SavedStats<acc_t> st;
  static constexpr bool kNeedsDy = true;
  static constexpr bool kMaskFromOutput = kMask == Mask::kFromOutput;  // the kernel masks dy before add()
  struct Channel { acc_t sc, bi, mu; };
  __device__ Channel channel(int64_t c) const { return {st.scale(c), st.bias(c), st.mean[c]}; }
  __device__ void add(const Channel& p, acc_t xv, acc_t gv, acc_t& s1, acc_t& s2) const {
    const acc_t gm =
        kMask == Mask::kFromOutput || relu_output_positive<scalar_t>(bn_pre_relu(xv, p.mu, p.sc, p.bi)) ? gv : acc_t(0);
    s1 += gm;
    s2 += gm * (xv - p.mu);
  }
  // The eval backward's dx, written by the reduction: gm * k0, k0 = weight * invstd = scale.
  __device__ acc_t eval_dx(const Channel& p, acc_t gm) const { return gm * p.sc; }
};

// Op::kMaskFromOutput: g := dy where y > 0, else 0 (y NaN: 0, as the reference's `out > 0`),
// stored to io.gm; in eval also dx = op.eval_dx(channel, g), stored to io.dx. The reductions call
// this on each vector before accumulating; channel_of(k) gives element k's channel constants.
template <int V, typename scalar_t, typename acc_t, typename Op, typename ChannelOf>
__device__ __forceinline__ void mask_from_output(const ReduceIO<scalar_t>& io, int64_t off, const Op& op,
                                                 ChannelOf channel_of, Vec<scalar_t, V>& g) {
  const Vec<scalar_t, V> yv = load_vec<V>(io.y + off);
#pragma unroll
  for (int k = 0; k < V; ++k)
    if (!(static_cast<acc_t>(yv.v[k]) > acc_t(0))) g.v[k] = scalar_t(0);
  store_vec<V>(io.gm + off, g);
  if (io.dx != nullptr) {  // uniform over the launch: eval mode
    Vec<scalar_t, V> d;
#pragma unroll
    for (int k = 0; k < V; ++k) d.v[k] = static_cast<scalar_t>(op.eval_dx(channel_of(k), static_cast<acc_t>(g.v[k])));
    store_vec<V>(io.dx + off, d);
  }
}

// Contiguous layout: grid (C, splits). Channel c is N rows of S elements, walked as one sequence
// of N * S / V vectors (S % V == 0); split k takes vectors k * blockDim + t, stepping by
// splits * blockDim. Writes the two sums of (c, split) to ws.
template <typename scalar_t, typename acc_t, typename Op, int V, typename Div>
__global__ void reduce_ncs_kernel(ReduceIO<scalar_t> io, Shape sh, Div rows, int64_t splits, Op op,
                                  acc_t* ws) {
  __shared__ acc_t shared[32];
  const int64_t c = blockIdx.x, split = blockIdx.y;
  // Index math in Div's width: 32-bit below 2^31 elements (see launch_reduce_v).
  using index_t = typename Div::index_t;
  const index_t total = static_cast<index_t>(sh.N * (sh.S / V)), C = static_cast<index_t>(sh.C),
                S = static_cast<index_t>(sh.S), step = static_cast<index_t>(splits) * blockDim.x;
  const auto p = op.channel(c);
  acc_t s1 = 0, s2 = 0;
  index_t j = static_cast<index_t>(split) * blockDim.x + threadIdx.x;
  if constexpr (!Op::kMaskFromOutput) {
    // kReduceUnroll vectors' loads in flight, added in the order of the plain loop below (vector j,
    // j + step, ...): the same sums, bit for bit. (The mask-from-output reductions also store.)
    for (; j + (kReduceUnroll - 1) * step < total; j += kReduceUnroll * step) {
      Vec<scalar_t, V> xv[kReduceUnroll], gv[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        index_t n, v;
        rows.divmod(j + u * step, n, v);
        const index_t off = (n * C + static_cast<index_t>(c)) * S + v * V;
        xv[u] = load_vec<V>(io.x + off);
        if (Op::kNeedsDy) gv[u] = load_vec<V>(io.dy + off);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k)
          op.add(p, static_cast<acc_t>(xv[u].v[k]), Op::kNeedsDy ? static_cast<acc_t>(gv[u].v[k]) : acc_t(0), s1,
                 s2);
    }
  }
  for (; j < total; j += step) {
    index_t n, v;
    rows.divmod(j, n, v);  // rows divides by S / V
    const index_t off = (n * C + static_cast<index_t>(c)) * S + v * V;
    const Vec<scalar_t, V> xv = load_vec<V>(io.x + off);
    Vec<scalar_t, V> gv;
    if (Op::kNeedsDy) gv = load_vec<V>(io.dy + off);
    if constexpr (Op::kMaskFromOutput) mask_from_output<V, scalar_t, acc_t>(io, off, op, [&](int) { return p; }, gv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      op.add(p, static_cast<acc_t>(xv.v[k]), Op::kNeedsDy ? static_cast<acc_t>(gv.v[k]) : acc_t(0), s1, s2);
  }
  const Add<acc_t> add;
  s1 = block_reduce(s1, add, shared);
  s2 = block_reduce(s2, add, shared);
  if (threadIdx.x == 0) {
    st(ws + (split * 2 + 0) * sh.C + c, s1);
    st(ws + (split * 2 + 1) * sh.C + c, s2);
  }
}

// Adds the V-element vectors at offset_of(i) for i = i0, i0 + step, ... < end to s1, s2, component k of
// every vector in channel ch[k] (the channels_last and the channel-group reductions): kReduceUnroll
// vectors' loads in flight, added in the plain loop's order (the mask-from-output ops also store, and
// take the plain loop).
template <typename scalar_t, typename acc_t, typename Op, int V, typename OffsetOf>
__device__ __forceinline__ void add_vectors(const ReduceIO<scalar_t>& io, const Op& op,
                                            const typename Op::Channel (&ch)[V], int64_t i, int64_t end,
                                            int64_t step, OffsetOf offset_of, acc_t (&s1)[V], acc_t (&s2)[V]) {
  if constexpr (!Op::kMaskFromOutput) {
    for (; i + (kReduceUnroll - 1) * step < end; i += kReduceUnroll * step) {
      Vec<scalar_t, V> xv[kReduceUnroll], gv[kReduceUnroll];
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int64_t off = offset_of(i + u * step);
        xv[u] = load_vec<V>(io.x + off);
        if (Op::kNeedsDy) gv[u] = load_vec<V>(io.dy + off);
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u)
#pragma unroll
        for (int k = 0; k < V; ++k)
          op.add(ch[k], static_cast<acc_t>(xv[u].v[k]), Op::kNeedsDy ? static_cast<acc_t>(gv[u].v[k]) : acc_t(0),
                 s1[k], s2[k]);
    }
  }
  for (; i < end; i += step) {
    const int64_t off = offset_of(i);
    const Vec<scalar_t, V> xv = load_vec<V>(io.x + off);
    Vec<scalar_t, V> gv;
    if (Op::kNeedsDy) gv = load_vec<V>(io.dy + off);
    if constexpr (Op::kMaskFromOutput) mask_from_output<V, scalar_t, acc_t>(io, off, op, [&](int k) { return ch[k]; }, gv);
#pragma unroll
    for (int k = 0; k < V; ++k)
      op.add(ch[k], static_cast<acc_t>(xv.v[k]), Op::kNeedsDy ? static_cast<acc_t>(gv.v[k]) : acc_t(0), s1[k], s2[k]);
  }
}

// Contiguous layout with rows that are not whole vectors (S % V != 0 at the full width V: 7x7 maps),
// so that reduce_ncs_kernel would read one element per load and a warp's run would cross row ends
// mid-sector. Instead a block takes a group of G consecutive channels, G * S % V == 0: for each n their
// G rows are one contiguous, 16-byte-aligned span of PV = G * S / V vectors. Thread t takes span
// vector p = t % PV of rows lane, lane + lanes, ... (lane = t / PV, lanes = blockDim / PV, split k
// starting at row k * lanes), so a warp reads whole sectors and every element of a thread's vector
// stays in one channel, (p V + k) / S, for the whole loop: V pairs of sums per thread. At the end each
// channel's sums are added from shared memory in a fixed order (element, then lane). grid (C / G,
// splits); writes the two sums of (channel, split) to ws like reduce_ncs_kernel.
template <typename scalar_t, typename acc_t, typename Op, int V>
__global__ void reduce_ncs_group_kernel(ReduceIO<scalar_t> io, Shape sh, int G, int64_t splits, Op op, acc_t* ws) {
  __shared__ acc_t r1[kBnThreads * V], r2[kBnThreads * V];
  const int S = static_cast<int>(sh.S), PV = G * S / V, lanes = static_cast<int>(blockDim.x) / PV;
  const int t = static_cast<int>(threadIdx.x), p = t % PV, lane = t / PV;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * G, split = blockIdx.y, C = sh.C, N = sh.N;
  acc_t s1[V], s2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s1[k] = s2[k] = acc_t(0);
  if (lane < lanes) {
    typename Op::Channel ch[V];
#pragma unroll
    for (int k = 0; k < V; ++k) ch[k] = op.channel(c0 + (p * V + k) / S);
    add_vectors<scalar_t, acc_t, Op, V>(io, op, ch, split * lanes + lane, N, splits * lanes,
                                        [&](int64_t n) { return (n * C + c0) * S + static_cast<int64_t>(p) * V; },
                                        s1, s2);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    r1[t * V + k] = s1[k];
    r2[t * V + k] = s2[k];
  }
  __syncthreads();
  // Fold, in two parallel steps of a fixed order: the S elements of each (channel g, lane l) pair, in
  // element order, by one thread each, into that pair's first slot (the pairs' slots are disjoint);
  // then each channel's lanes, in lane order.
  for (int i = t; i < G * lanes; i += static_cast<int>(blockDim.x)) {
    const int g = i % G, base = (i / G) * PV * V + g * S;
    acc_t a = 0, b = 0;
    for (int e = 0; e < S; ++e) {
      a += r1[base + e];
      b += r2[base + e];
    }
    r1[base] = a;
    r2[base] = b;
  }
  __syncthreads();
  if (t < G) {  // channel c0 + t
    acc_t a = 0, b = 0;
    for (int l = 0; l < lanes; ++l) {
      a += r1[l * PV * V + t * S];
      b += r2[l * PV * V + t * S];
    }
    st(ws + (split * 2 + 0) * C + c0 + t, a);
    st(ws + (split * 2 + 1) * C + c0 + t, b);
  }
}

// channels_last: grid (splits), block (bx, by) with bx = min(C / V, 256). Thread (tx, ty) of split
// k takes channel vectors tx, tx + bx, ... over rows k * by + ty, stepping by splits * by; the by
// row lanes of each channel are then folded in shared memory in lane order.
template <typename scalar_t, typename acc_t, typename Op, int V>
__global__ void reduce_nsc_kernel(ReduceIO<scalar_t> io, Shape sh, int64_t splits, Op op, acc_t* ws) {
  __shared__ acc_t p1[kBnThreads * V], p2[kBnThreads * V];
  const int64_t C = sh.C, CV = C / V, R = sh.N * sh.S, split = blockIdx.x;
  const int bx = blockDim.x, by = blockDim.y, tid = threadIdx.y * bx + threadIdx.x;
  for (int64_t cv0 = 0; cv0 < CV; cv0 += bx) {  // the same trip count in every thread: barriers inside
    const int64_t cv = cv0 + threadIdx.x;
    acc_t s1[V], s2[V];
#pragma unroll
    for (int k = 0; k < V; ++k) s1[k] = s2[k] = acc_t(0);
    if (cv < CV) {
      typename Op::Channel p[V];
#pragma unroll
      for (int k = 0; k < V; ++k) p[k] = op.channel(cv * V + k);
      add_vectors<scalar_t, acc_t, Op, V>(io, op, p, split * by + threadIdx.y, R, splits * by,
                                          [&](int64_t r) { return r * C + cv * V; }, s1, s2);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      p1[tid * V + k] = s1[k];
      p2[tid * V + k] = s2[k];
    }
    __syncthreads();
    if (threadIdx.y == 0 && cv < CV) {
      Vec<acc_t, V> t1, t2;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        t1.v[k] = t2.v[k] = acc_t(0);
        for (int y = 0; y < by; ++y) {
          t1.v[k] += p1[(y * bx + threadIdx.x) * V + k];
          t2.v[k] += p2[(y * bx + threadIdx.x) * V + k];
        }
      }
      // [split][2][C]: the thread's V channels are adjacent, a warp's stores one contiguous run
      store_vec<V>(ws + (split * 2 + 0) * C + cv * V, t1);
      store_vec<V>(ws + (split * 2 + 1) * C + cv * V, t2);
    }
    __syncthreads();
  }
}

// The partial sums are stored [split][2][C] (the channels_last reduction's warps store 32 consecutive
// channels at once). The finish kernels fold them with blocks of kFoldChannels channels x kFoldLanes
// split lanes: thread (tx, ty) adds splits ty, ty + kFoldLanes, ... of channel blockIdx.x *
// kFoldChannels + tx in double (a warp reads 32 consecutive channels of one split: coalesced), then
// the lanes are added in lane order (deterministic, no atomics).
constexpr int kFoldChannels = 32;
constexpr int kFoldLanes = 16;

// Folds channel c's partials into (a, b); true in the one thread per channel that then holds them
// (ty == 0, c < C). Every thread of the block must call it (it has a barrier).
template <typename acc_t>
__device__ __forceinline__ bool fold_partials(const acc_t* ws, int64_t C, int64_t splits, int64_t& c, double& a,
                                              double& b) {
  __shared__ double f1[kFoldLanes * kFoldChannels], f2[kFoldLanes * kFoldChannels];
  c = static_cast<int64_t>(blockIdx.x) * kFoldChannels + threadIdx.x;
  double s1 = 0, s2 = 0;
  if (c < C) {
    for (int64_t s = threadIdx.y; s < splits; s += kFoldLanes) {
      s1 += static_cast<double>(ld(ws + (s * 2 + 0) * C + c));
      s2 += static_cast<double>(ld(ws + (s * 2 + 1) * C + c));
    }
  }
  f1[threadIdx.y * kFoldChannels + threadIdx.x] = s1;
  f2[threadIdx.y * kFoldChannels + threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return false;
  a = 0;
  b = 0;
  for (int y = 0; y < kFoldLanes; ++y) {
    a += f1[y * kFoldChannels + threadIdx.x];
    b += f2[y * kFoldChannels + threadIdx.x];
  }
  return true;
}

// Grid and block of a finish kernel.
inline unsigned fold_grid(int64_t C) { return static_cast<unsigned>((C + kFoldChannels - 1) / kFoldChannels); }
inline dim3 fold_block() { return dim3(kFoldChannels, kFoldLanes); }

template <typename scalar_t, typename acc_t>
__global__ void stats_finish_kernel(const scalar_t* x, Shape sh, int64_t splits, const acc_t* ws, const acc_t* w,
                                    const acc_t* b, double eps, acc_t* ch, StatsOut<acc_t> out) {
  const int64_t C = sh.C;
  int64_t c;
  double S1, S2;
  if (!fold_partials(ws, C, splits, c, S1, S2)) return;
  const double M = static_cast<double>(sh.N * sh.S);
  const double K = static_cast<double>(static_cast<acc_t>(x[sh.first(c)]));
  const double m1 = S1 / M;
  const double var = fmax(0.0, S2 / M - m1 * m1);
  set_channel(C, c, static_cast<acc_t>(K + m1), static_cast<acc_t>(1.0 / sqrt(var + eps)), static_cast<acc_t>(var),
              w, b, ch, out);
}

// Eval forward: statistics from the running buffers.
template <typename acc_t>
__global__ void eval_prepare_kernel(int64_t C, const acc_t* rm, const acc_t* rv, const acc_t* w, const acc_t* b,
                                    double eps, acc_t* ch, StatsOut<acc_t> out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  set_channel(C, c, rm[c], static_cast<acc_t>(1.0 / sqrt(static_cast<double>(rv[c]) + eps)), rv[c], w, b, ch, out);
}

// Elementwise "ops": constants of channel c, then one output element from x and, when kNeedsAux,
// the second input (the gradient, or the residual).
template <typename acc_t, bool kResidual>
struct ForwardOp {  // y = relu(fma(x - mean, scale, bias) [+ residual]) in acc_t, one rounding to scalar_t
  const acc_t* ch;
  int64_t C;
  static constexpr bool kNeedsAux = kResidual;
  struct Channel { acc_t mu, sc, bi; };
  __device__ Channel channel(int64_t c) const { return {ch[kMean * C + c], ch[kScale * C + c], ch[kBias * C + c]}; }
  __device__ acc_t apply(const Channel& p, acc_t xv, acc_t rv) const {
    acc_t v = bn_pre_relu(xv, p.mu, p.sc, p.bi);
    if (kResidual) v = v + rv;
    return v < acc_t(0) ? acc_t(0) : v;  // NaN propagates, as in torch.relu
  }
};

template <typename scalar_t, typename acc_t, Mask kMask>
struct BackwardOp {  // dx = gm * k0 - k1 - (x - mean) * k2, gm the ReLU-masked gradient
  static_assert(kMask != Mask::kFromOutput, "the elementwise pass does not read the saved output");
  const acc_t* ch;
  int64_t C;
  static constexpr bool kNeedsAux = true;
  struct Channel { acc_t sc, bi, mu, k0, k1, k2; };
  __device__ Channel channel(int64_t c) const {
    return {ch[kScale * C + c], ch[kBias * C + c], ch[kMean * C + c], ch[kK0 * C + c], ch[kK1 * C + c],
            ch[kK2 * C + c]};
  }
  __device__ acc_t apply(const Channel& p, acc_t xv, acc_t gv) const {
    const acc_t gm =
        kMask == Mask::kApplied || relu_output_positive<scalar_t>(bn_pre_relu(xv, p.mu, p.sc, p.bi)) ? gv : acc_t(0);
    return gm * p.k0 - p.k1 - (xv - p.mu) * p.k2;
  }
};

// Contiguous layout: the tensor as numel / V vectors, grid-stride. Element i is in row i / S, whose
// channel is row % C. A vector that runs past the end of its row (S % V != 0; S >= V, so it reaches
// at most the next row) takes the next channel's constants for its last elements. The numel % V
// tail elements go to the first threads of block 0, one each. aux: the op's second input.
template <typename scalar_t, typename acc_t, typename Op, int V, typename Div>
__global__ void elementwise_ncs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ aux,
                                       scalar_t* __restrict__ out, int64_t numel_, Shape sh, Div div_s, Div div_c,
                                       Op op) {
  // Index math in Div's width: 32-bit (one multiply-high per division) below 2^31 elements.
  using index_t = typename Div::index_t;
  const index_t numel = static_cast<index_t>(numel_), nvec = numel / V, S = static_cast<index_t>(sh.S);
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nvec; q += step) {
    const index_t i = q * V;
    index_t row, pos, n, c;
    div_s.divmod(i, row, pos);
    div_c.divmod(row, n, c);
    const auto p = op.channel(static_cast<int64_t>(c));
    const Vec<scalar_t, V> xv = load_vec<V>(x + i);
    Vec<scalar_t, V> gv, o;
    if (Op::kNeedsAux) gv = load_vec<V>(aux + i);
    const index_t in_row = S - pos;  // elements of this vector still in row `row`
    if (V == 1 || in_row >= V) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        o.v[k] = static_cast<scalar_t>(
            op.apply(p, static_cast<acc_t>(xv.v[k]), Op::kNeedsAux ? static_cast<acc_t>(gv.v[k]) : acc_t(0)));
    } else {
      // Both channels' results, then a select: choosing between the two Channel structs instead
      // (k < in_row ? p : p_next) put them in local memory (a 48-byte stack frame, sm_90, fp16).
      const auto p_next = op.channel(static_cast<int64_t>(c) + 1 == sh.C ? 0 : static_cast<int64_t>(c) + 1);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t xk = static_cast<acc_t>(xv.v[k]), gk = Op::kNeedsAux ? static_cast<acc_t>(gv.v[k]) : acc_t(0);
        const acc_t here = op.apply(p, xk, gk), next = op.apply(p_next, xk, gk);
        o.v[k] = static_cast<scalar_t>(static_cast<index_t>(k) < in_row ? here : next);
      }
    }
    store_vec<V>(out + i, o);
  }
  if (V > 1 && blockIdx.x == 0) {
    const index_t i = nvec * V + threadIdx.x;
    if (i < numel) {
      index_t row, pos, n, c;
      div_s.divmod(i, row, pos);
      div_c.divmod(row, n, c);
      const acc_t gv = Op::kNeedsAux ? static_cast<acc_t>(ld(aux + i)) : acc_t(0);
      st(out + i, static_cast<scalar_t>(op.apply(op.channel(static_cast<int64_t>(c)), static_cast<acc_t>(ld(x + i)), gv)));
    }
  }
}

// channels_last: block (bx, by) with bx = min(C / V, 256); thread (tx, ty) loads the constants of
// channel vectors tx, tx + bx, ... once, then walks rows blockIdx.x * by + ty, grid-stride.
template <typename scalar_t, typename acc_t, typename Op, int V>
__global__ void elementwise_nsc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ aux,
                                       scalar_t* __restrict__ out, Shape sh, Op op) {
  const int64_t C = sh.C, CV = C / V, R = sh.N * sh.S;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t cv = threadIdx.x; cv < CV; cv += blockDim.x) {
    typename Op::Channel p[V];
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = op.channel(cv * V + k);
    const auto apply = [&](const Vec<scalar_t, V>& xv, const Vec<scalar_t, V>& gv) {
      Vec<scalar_t, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k)
        o.v[k] = static_cast<scalar_t>(
            op.apply(p[k], static_cast<acc_t>(xv.v[k]), Op::kNeedsAux ? static_cast<acc_t>(gv.v[k]) : acc_t(0)));
      return o;
    };
    int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    // kRowUnroll rows' loads in flight before their stores (grid-stride rows r, r + step, ...).
    for (; r + (kRowUnroll - 1) * step < R; r += kRowUnroll * step) {
      Vec<scalar_t, V> xv[kRowUnroll], gv[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        xv[u] = load_vec<V>(x + (r + u * step) * C + cv * V);
        if (Op::kNeedsAux) gv[u] = load_vec<V>(aux + (r + u * step) * C + cv * V);
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) store_vec<V>(out + (r + u * step) * C + cv * V, apply(xv[u], gv[u]));
    }
    for (; r < R; r += step) {
      const int64_t i = r * C + cv * V;
      Vec<scalar_t, V> gv;
      if (Op::kNeedsAux) gv = load_vec<V>(aux + i);
      store_vec<V>(out + i, apply(load_vec<V>(x + i), gv));
    }
  }
}

// Block shape of the channels_last kernels: bx threads along C / V channel vectors, by along rows.
dim3 nsc_block(int64_t CV) {
  const int64_t bx = std::min<int64_t>(std::max<int64_t>(CV, 1), kBnThreads);
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(kBnThreads / bx));
}

// Reduction splits: about kWaves waves of the reduction kernel's resident blocks (`resident`: blocks per
// SM from the occupancy API times the SM count), fewer when a thread would get less than
// kVecsPerThread vectors (contiguous) or kRowsPerThread rows (channels_last), at most kMaxSplits. The
// contiguous kernel's grid is (C, splits), so its waves count C blocks per split.
int64_t splits_for(const Shape& sh, int V, int64_t resident) {
  const int64_t target = std::max<int64_t>(1, kWaves * resident);
  int64_t work, occupancy;
  if (sh.channels_last) {
    const int64_t by = nsc_block(sh.C / V).y;
    work = (sh.N * sh.S + by * kRowsPerThread - 1) / (by * kRowsPerThread);
    occupancy = target;
  } else {
    const int64_t vecs = sh.N * (sh.S / V);
    work = (vecs + kBnThreads * kVecsPerThread - 1) / (kBnThreads * kVecsPerThread);
    occupancy = (target + sh.C - 1) / std::max<int64_t>(sh.C, 1);
  }
  return std::max<int64_t>(1, std::min<int64_t>({work, occupancy, kMaxSplits}));
}

// The vector width a pass can use: 16 bytes (max_vec), else 8 bytes, else one element; the widest
// that every pointer's alignment and the layout allow. Reductions need whole vectors per row or
// channel group (contiguous: S % V == 0); elementwise passes on contiguous tensors only S >= V.
// ptrs: every activation-size pointer of the pass (null ones are not used by it).
template <typename scalar_t>
int pick_vec(const Shape& sh, bool reduction, std::initializer_list<const void*> ptrs) {
  constexpr int kV = max_vec<scalar_t>();
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  for (int V = kV; V > 1 && V >= kV / 2; V /= 2) {
    const bool ok = sh.channels_last ? sh.C % V == 0 : reduction ? sh.S % V == 0 : sh.S >= V;
    if (ok) return V;
  }
  return 1;
}

// The channel group of reduce_ncs_group_kernel for a reduction over this shape and these pointers, or
// 0 where the plain kernels apply. Contiguous rows take it when reduce_ncs_kernel would waste sector
// bytes: rows that are not whole vectors at the full width V (S % V != 0: 7x7 maps), and short rows
// whose length is not a whole number of 32-byte sectors (2x2 maps in fp32: 16 bytes, so a warp's
// loads from N different rows used half of each sector; 3x4: 48 bytes). Every pointer must be 16-byte
// aligned. G is a multiple of G0 = V / gcd(S, V) (so a group's rows form whole vectors) that divides C:
// the smallest whose span of G rows is at least kGroupSpanBytes, else the largest below it, with the
// span (G * S / V vectors) and G itself within one block.
constexpr int64_t kGroupSpanBytes = 128;  // four sectors: 8 lanes' 16-byte loads, contiguous

template <typename scalar_t>
int reduce_group(const Shape& sh, std::initializer_list<const void*> ptrs) {
  constexpr int kV = max_vec<scalar_t>();
  const int64_t row_bytes = sh.S * static_cast<int64_t>(sizeof(scalar_t));
  const bool short_row = sh.S % kV == 0 && row_bytes % 32 != 0 && row_bytes < 2 * kGroupSpanBytes;
  if (sh.channels_last || kV == 1 || (sh.S % kV == 0 && !short_row) || sh.S >= static_cast<int64_t>(kBnThreads) * kV)
    return 0;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 0;
  const int S = static_cast<int>(sh.S), G0 = kV / std::gcd(S, kV);
  const auto fits = [&](int64_t G) { return G <= kBnThreads && G * S / kV <= kBnThreads; };
  const auto valid = [&](int64_t G) { return sh.C % G == 0 && fits(G); };
  const int64_t want = std::max<int64_t>(1, (kGroupSpanBytes + G0 * row_bytes - 1) / (G0 * row_bytes));
  int64_t m = want;
  while (fits(G0 * m) && !valid(G0 * m)) ++m;  // the smallest wide-enough group dividing C
  if (!valid(G0 * m))
    for (m = want - 1; m > 1 && !valid(G0 * m); --m) {  // else the widest narrower one
    }
  if (m <= 1 && !valid(G0)) return 0;
  const int G = static_cast<int>(G0 * std::max<int64_t>(m, 1));
  return short_row && G == G0 ? 0 : G;  // a group of one row per channel gains nothing over the plain kernel
}

// f(std::integral_constant<int, V>) for the V pick_vec returned: one instantiation per width.
template <typename scalar_t, typename F>
void with_vec(int V, F&& f) {
  constexpr int kV = max_vec<scalar_t>();
  constexpr int kHalf = kV >= 4 ? kV / 2 : 1;
  if (V == kV) f(std::integral_constant<int, kV>{});
  else if (V == kHalf) f(std::integral_constant<int, kHalf>{});
  else f(std::integral_constant<int, 1>{});
}

template <typename scalar_t, typename acc_t, typename Op, int V>
void launch_reduce_v(const ReduceIO<scalar_t>& io, const Shape& sh, int64_t splits, const Op& op, acc_t* ws,
                     Stream stream) {
  if (sh.channels_last) {
    TF_LAUNCH(static_cast<unsigned>(splits), nsc_block(sh.C / V), 0, stream,
              reduce_nsc_kernel<scalar_t, acc_t, Op, V>)(io, sh, splits, op, ws);
  } else {
    const dim3 grid(static_cast<unsigned>(sh.C), static_cast<unsigned>(splits));
    if (use_index32(sh.N * sh.C * sh.S)) {
      TF_LAUNCH(grid, kBnThreads, 0, stream, reduce_ncs_kernel<scalar_t, acc_t, Op, V, FastDivmod32>)(
          io, sh, FastDivmod32(sh.S / V), splits, op, ws);
    } else {
      TF_LAUNCH(grid, kBnThreads, 0, stream, reduce_ncs_kernel<scalar_t, acc_t, Op, V, FastDivmod>)(
          io, sh, FastDivmod(sh.S / V), splits, op, ws);
    }
  }
  TF_LAUNCH_CHECK();
}

// V: pick_vec over every pointer of io, with reduction = true; G: reduce_group over them.
// The splits for a reduction with Op at vector width V (see splits_for), or of the channel-group kernel
// when G > 0 (grid (C / G, splits), lanes rows per block step); the occupancy of the kernel
// instantiation that will run is asked once per instantiation.
template <typename scalar_t, typename acc_t, typename Op>
int64_t reduce_splits(const Shape& sh, int V, int G) {
  if (G > 0) {
    constexpr int kV = max_vec<scalar_t>();
    static const int64_t n = blocks_per_sm(reduce_ncs_group_kernel<scalar_t, acc_t, Op, kV>, kBnThreads);
    const int64_t target = std::max<int64_t>(1, kWaves * n * multiprocessor_count());
    const int64_t lanes = kBnThreads / (G * sh.S / kV);
    const int64_t work = (sh.N + lanes * kVecsPerThread - 1) / (lanes * kVecsPerThread);
    const int64_t groups = sh.C / G;
    const int64_t occupancy = (target + groups - 1) / std::max<int64_t>(groups, 1);
    return std::max<int64_t>(1, std::min<int64_t>({work, occupancy, kMaxSplits}));
  }
  int64_t per_sm = 1;
  with_vec<scalar_t>(V, [&](auto v) {
    constexpr int W = decltype(v)::value;
    if (sh.channels_last) {
      static const int64_t n = blocks_per_sm(reduce_nsc_kernel<scalar_t, acc_t, Op, W>, kBnThreads);
      per_sm = n;
    } else {
      static const int64_t n = blocks_per_sm(reduce_ncs_kernel<scalar_t, acc_t, Op, W, FastDivmod32>, kBnThreads);
      per_sm = n;
    }
  });
  return splits_for(sh, V, per_sm * multiprocessor_count());
}

template <typename scalar_t, typename acc_t, typename Op>
void launch_reduce(const ReduceIO<scalar_t>& io, const Shape& sh, int V, int G, int64_t splits, const Op& op,
                   acc_t* ws, Stream stream) {
  if (G > 0) {
    const dim3 grid(static_cast<unsigned>(sh.C / G), static_cast<unsigned>(splits));
    TF_LAUNCH(grid, kBnThreads, 0, stream, reduce_ncs_group_kernel<scalar_t, acc_t, Op, max_vec<scalar_t>()>)(
        io, sh, G, splits, op, ws);
    TF_LAUNCH_CHECK();
    return;
  }
  with_vec<scalar_t>(V, [&](auto v) {
    launch_reduce_v<scalar_t, acc_t, Op, decltype(v)::value>(io, sh, splits, op, ws, stream);
  });
}

template <typename scalar_t, typename acc_t, typename Op, int V>
void launch_elementwise_v(const scalar_t* x, const scalar_t* aux, scalar_t* out, const Shape& sh, const Op& op,
                          Stream stream) {
  const int64_t cap = multiprocessor_count() * kBlocksPerSM;
  if (sh.channels_last) {
    const dim3 block = nsc_block(sh.C / V);
    const int64_t blocks = std::min<int64_t>(cap, (sh.N * sh.S + block.y - 1) / block.y);
    TF_LAUNCH(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), block, 0, stream,
              elementwise_nsc_kernel<scalar_t, acc_t, Op, V>)(x, aux, out, sh, op);
  } else {
    const int64_t numel = sh.N * sh.C * sh.S;
    const unsigned blocks =
        static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(cap, (numel / V + kBnThreads - 1) / kBnThreads)));
    if (use_index32(numel)) {
      TF_LAUNCH(blocks, kBnThreads, 0, stream, elementwise_ncs_kernel<scalar_t, acc_t, Op, V, FastDivmod32>)(
          x, aux, out, numel, sh, FastDivmod32(sh.S), FastDivmod32(sh.C), op);
    } else {
      TF_LAUNCH(blocks, kBnThreads, 0, stream, elementwise_ncs_kernel<scalar_t, acc_t, Op, V, FastDivmod>)(
          x, aux, out, numel, sh, FastDivmod(sh.S), FastDivmod(sh.C), op);
    }
  }
  TF_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename Op>
void launch_elementwise(const scalar_t* x, const scalar_t* aux, scalar_t* out, const Shape& sh, const Op& op,
                        Stream stream) {
  with_vec<scalar_t>(pick_vec<scalar_t>(sh, false, {x, aux, out}), [&](auto v) {
    launch_elementwise_v<scalar_t, acc_t, Op, decltype(v)::value>(x, aux, out, sh, op, stream);
  });
}

// Folds the reduction's partial sums into grad_weight, grad_bias and the elementwise pass's constants
// k0, k1, k2, and writes the saved statistics' rows of the channel table that pass reads (the
// backward's three launches: reduction, this, elementwise).
template <typename acc_t>
__global__ void backward_finish_kernel(Shape sh, int64_t splits, const acc_t* ws, SavedStats<acc_t> st,
                                       bool training, acc_t* ch, acc_t* grad_w, acc_t* grad_b) {
  const int64_t C = sh.C;
  int64_t c;
  double sum_dy, sum_dy_xmu;
  if (!fold_partials(ws, C, splits, c, sum_dy, sum_dy_xmu)) return;
  set_channel(C, c, st.mean[c], st.invstd[c], acc_t(0), st.w, st.b, ch);
  const double inv = static_cast<double>(st.invstd[c]);
  const double wc = st.w ? static_cast<double>(st.w[c]) : 1.0;
  const double M = static_cast<double>(sh.N * sh.S);
  grad_b[c] = static_cast<acc_t>(sum_dy);
  grad_w[c] = static_cast<acc_t>(sum_dy_xmu * inv);
  ch[kK0 * C + c] = static_cast<acc_t>(wc * inv);
  ch[kK1 * C + c] = training && M > 0 ? static_cast<acc_t>(wc * inv * sum_dy / M) : acc_t(0);
  ch[kK2 * C + c] = training && M > 0 ? static_cast<acc_t>(wc * inv * inv * inv * sum_dy_xmu / M) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------

Shape shape_of(const at::Tensor& x) {
  Shape sh;
  sh.N = x.size(0);
  sh.C = x.size(1);
  sh.S = x.numel() / std::max<int64_t>(1, sh.N * sh.C);
  // native_layout() held, so "not contiguous" means channels_last; a contiguous (N, C) tensor (or
  // S == 1) has the same memory as channels_last and takes its kernels, vectorised along C.
  sh.channels_last = !x.is_contiguous() || sh.S == 1;
  return sh;
}

at::Tensor channel_vector(const c10::optional<at::Tensor>& t, at::ScalarType acc, const at::Tensor& input,
                          const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), op, ": ", name, " must have shape (", input.size(1),
              ",), got ", t->sizes());
  return t->to(acc).contiguous();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(on_device(input), op, ": input is on ", input.device(), ", expected a CUDA device");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have at least 2 dimensions (N, C, ...), got ", input.dim());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
}

// An activation-size argument (residual, grad_out, saved output) must match the input.
void check_activation(const at::Tensor& t, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(t.sizes() == input.sizes(), op, ": ", name, " has shape ", t.sizes(), " but input has ",
              input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but input is ",
              input.scalar_type());
}

// The forward of bn_relu_fwd (residual undefined) and of bn_add_relu_fwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const char* op, const at::Tensor& input, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  check_input(input, op);
  if (residual.defined()) check_activation(residual, input, op, "residual");
  TF_DEVICE_GUARD(guard, input.device());
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = channel_vector(weight, acc_type, input, op, "weight");
  const at::Tensor b = channel_vector(bias, acc_type, input, op, "bias");
  const at::Tensor rm = channel_vector(running_mean, acc_type, input, op, "running_mean");
  const at::Tensor rv = channel_vector(running_var, acc_type, input, op, "running_var");
  TORCH_CHECK(training || (rm.defined() && rv.defined()), op, ": eval mode needs running_mean and running_var");
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor res = residual.defined() ? in_layout_of(residual, x) : at::Tensor();
  at::Tensor out = at::empty_like(input);
  at::Tensor y = native ? out : at::empty_like(x);
  const int64_t C = input.size(1), numel = x.numel();
  at::Tensor ch = at::empty({kRows, C}, input.options().dtype(acc_type));
  at::Tensor mean = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor invstd = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor var = at::empty({C}, input.options().dtype(acc_type));
  if (C == 0) return {out, mean, invstd, var};  // no channel: no launch
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shape sh = shape_of(x);
    acc_t* chp = ch.data_ptr<acc_t>();
    const StatsOut<acc_t> stats{mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), var.data_ptr<acc_t>()};
    const int cblocks = static_cast<int>((C + 127) / 128);
    if (training) {
      if (numel == 0) {  // an empty batch: NaN statistics, as stock
        for (at::Tensor* t : {&mean, &invstd, &var}) t->fill_(std::numeric_limits<double>::quiet_NaN());
        return;
      }
      const int V = pick_vec<scalar_t>(sh, true, {x.data_ptr()}), G = reduce_group<scalar_t>(sh, {x.data_ptr()});
      const int64_t splits = reduce_splits<scalar_t, acc_t, StatsOp<scalar_t, acc_t>>(sh, V, G);
      at::Tensor ws = at::empty({C * splits * 2}, input.options().dtype(acc_type));
      launch_reduce<scalar_t, acc_t>(ReduceIO<scalar_t>{x.data_ptr<scalar_t>()}, sh, V, G, splits,
                                     StatsOp<scalar_t, acc_t>{x.data_ptr<scalar_t>(), sh}, ws.data_ptr<acc_t>(), stream);
      TF_LAUNCH(fold_grid(C), fold_block(), 0, stream, stats_finish_kernel<scalar_t, acc_t>)(
          x.data_ptr<scalar_t>(), sh, splits, ws.data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), eps,
          chp, stats);
      TF_LAUNCH_CHECK();
    } else {
      TF_LAUNCH(cblocks, 128, 0, stream, eval_prepare_kernel<acc_t>)(C, rm.data_ptr<acc_t>(), rv.data_ptr<acc_t>(),
                                                              ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), eps, chp,
                                                              stats);
      TF_LAUNCH_CHECK();
    }
    if (numel == 0) return;
    if (res.defined()) {
      launch_elementwise<scalar_t, acc_t>(x.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sh,
                                          ForwardOp<acc_t, true>{chp, C}, stream);
    } else {
      launch_elementwise<scalar_t, acc_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), sh,
                                          ForwardOp<acc_t, false>{chp, C}, stream);
    }
  });
  if (!native) out.copy_(y);
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  return forward("bn_relu_fwd", input, at::Tensor(), weight, bias, running_mean, running_var, training, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_fwd_cuda(
    const at::Tensor& input, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double eps) {
  return forward("bn_add_relu_fwd", input, residual, weight, bias, running_mean, running_var, training, eps);
}

// The backward of bn_relu_bwd (out undefined: the mask recomputed from the input with the
// forward's formula) and of bn_add_relu_bwd (the mask read from the saved output, out > 0). Returns
// (grad_input, grad_residual, grad_weight, grad_bias); grad_residual, defined for bn_add_relu only,
// comes back in x's layout: input's when that is native, else contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& input,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& invstd, bool training) {
  const bool add = out.defined();
  check_input(input, op);
  check_activation(grad_out, input, op, "grad_out");
  if (add) check_activation(out, input, op, "out");
  TF_DEVICE_GUARD(guard, input.device());
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = channel_vector(weight, acc_type, input, op, "weight");
  const at::Tensor b = channel_vector(bias, acc_type, input, op, "bias");
  const at::Tensor m = channel_vector(mean, acc_type, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, acc_type, input, op, "invstd");
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor dy = in_layout_of(grad_out, x);
  const at::Tensor y = add ? in_layout_of(out, x) : at::Tensor();
  at::Tensor grad_in = at::empty_like(input);
  at::Tensor dx = native ? grad_in : at::empty_like(x);
  at::Tensor grad_res = add ? at::empty_like(x) : at::Tensor();
  const int64_t C = input.size(1), numel = x.numel();
  at::Tensor grad_w = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor grad_b = at::empty({C}, input.options().dtype(acc_type));
  if (C == 0 || numel == 0) {  // no launch; an empty batch has zero parameter gradients
    grad_w.zero_();
    grad_b.zero_();
    return {grad_in, grad_res, grad_w, grad_b};
  }
  at::Tensor ch = at::empty({kRows, C}, input.options().dtype(acc_type));
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shape sh = shape_of(x);
    acc_t* chp = ch.data_ptr<acc_t>();
    const SavedStats<acc_t> st{m.data_ptr<acc_t>(), is.data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
                               ptr_or_null<acc_t>(b)};
    // bn_add_relu's reduction masks grad_out by out > 0 and writes it (grad_residual); in eval it
    // also writes dx = gm * k0, which needs no sums: the whole backward in one pass.
    const ReduceIO<scalar_t> io =
        add ? ReduceIO<scalar_t>{x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                 grad_res.data_ptr<scalar_t>(), training ? nullptr : dx.data_ptr<scalar_t>()}
            : ReduceIO<scalar_t>{x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>()};
    const int V = pick_vec<scalar_t>(sh, true, {io.x, io.dy, io.y, io.gm, io.dx});
    const int G = reduce_group<scalar_t>(sh, {io.x, io.dy, io.y, io.gm, io.dx});
    // the two backward ops have the same loads and registers: the occupancy of either
    const int64_t splits =
        reduce_splits<scalar_t, acc_t, BackwardSumsOp<scalar_t, acc_t, Mask::kRecompute>>(sh, V, G);
    at::Tensor ws = at::empty({C * splits * 2}, input.options().dtype(acc_type));
    if (add) {
      launch_reduce<scalar_t, acc_t>(io, sh, V, G, splits, BackwardSumsOp<scalar_t, acc_t, Mask::kFromOutput>{st},
                                     ws.data_ptr<acc_t>(), stream);
    } else {
      launch_reduce<scalar_t, acc_t>(io, sh, V, G, splits, BackwardSumsOp<scalar_t, acc_t, Mask::kRecompute>{st},
                                     ws.data_ptr<acc_t>(), stream);
    }
    TF_LAUNCH(fold_grid(C), fold_block(), 0, stream, backward_finish_kernel<acc_t>)(
        sh, splits, ws.data_ptr<acc_t>(), st, training, chp, grad_w.data_ptr<acc_t>(),
        grad_b.data_ptr<acc_t>());
    TF_LAUNCH_CHECK();
    if (!add) {
      launch_elementwise<scalar_t, acc_t>(io.x, io.dy, dx.data_ptr<scalar_t>(), sh,
                                          BackwardOp<scalar_t, acc_t, Mask::kRecompute>{chp, C}, stream);
    } else if (training) {
      launch_elementwise<scalar_t, acc_t>(io.x, io.gm, dx.data_ptr<scalar_t>(), sh,
                                          BackwardOp<scalar_t, acc_t, Mask::kApplied>{chp, C}, stream);
    }
  });
  if (!native) grad_in.copy_(dx);
  return {grad_in, grad_res, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                                bool training) {
  const auto grads = backward("bn_relu_bwd", grad_out, at::Tensor(), input, weight, bias, mean, invstd, training);
  return {std::get<0>(grads), std::get<2>(grads), std::get<3>(grads)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training) {
  return backward("bn_add_relu_bwd", grad_out, out, input, weight, c10::nullopt, mean, invstd, training);
}

// running = (1 - momentum) * running + momentum * batch (unbiased variance: var * count / (count - 1)),
// in double and rounded once, as the CPU op: one thread per channel, both statistics in one launch
// (the composite form was four launches).
template <typename run_t, typename acc_t>
__global__ void update_running_stats_kernel(run_t* rm, int64_t rm_stride, run_t* rv, int64_t rv_stride,
                                            const acc_t* mean, const acc_t* var, int64_t C, double momentum,
                                            double unbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (rm != nullptr) {
    run_t& r = rm[c * rm_stride];
    r = static_cast<run_t>(momentum * static_cast<double>(mean[c]) + (1.0 - momentum) * static_cast<double>(r));
  }
  if (rv != nullptr) {
    run_t& r = rv[c * rv_stride];
    r = static_cast<run_t>(momentum * (static_cast<double>(var[c]) * unbias) +
                           (1.0 - momentum) * static_cast<double>(r));
  }
}

void bn_update_running_stats_cuda(const c10::optional<at::Tensor>& running_mean,
                                  const c10::optional<at::Tensor>& running_var, const at::Tensor& mean,
                                  const at::Tensor& var, double momentum, int64_t count) {
  const bool has_m = running_mean.has_value() && running_mean->defined();
  const bool has_v = running_var.has_value() && running_var->defined();
  const int64_t C = mean.numel();
  for (const auto* t : {has_m ? &*running_mean : nullptr, has_v ? &*running_var : nullptr}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 1 && t->numel() == C, "bn_update_running_stats_: running statistics must have ", C,
                " elements, got shape ", t->sizes());
    TORCH_CHECK(t->device() == mean.device(), "bn_update_running_stats_: a running statistic is on ", t->device(),
                " but the batch statistics are on ", mean.device());
    TORCH_CHECK(t->is_floating_point(), "bn_update_running_stats_: running statistics must be floating point");
  }
  TORCH_CHECK(var.numel() == C && var.scalar_type() == mean.scalar_type() && mean.is_contiguous() &&
                  var.is_contiguous(), "bn_update_running_stats_: mean and var must be contiguous, alike, of ", C,
              " elements");
  if (count <= 0 || C == 0 || !(has_m || has_v)) return;
  TORCH_CHECK(!has_m || !has_v || running_mean->scalar_type() == running_var->scalar_type(),
              "bn_update_running_stats_: running_mean and running_var must share a dtype");
  TF_DEVICE_GUARD(guard, mean.device());
  const Stream stream = current_stream();
  const double unbias = static_cast<double>(count) / static_cast<double>(count > 1 ? count - 1 : 1);
  const at::ScalarType run_type = has_m ? running_mean->scalar_type() : running_var->scalar_type();
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_type, "bn_update_running_stats_cuda", [&] {
    using run_t = scalar_t;
    run_t* rm = has_m ? running_mean->data_ptr<run_t>() : nullptr;
    run_t* rv = has_v ? running_var->data_ptr<run_t>() : nullptr;
    const int64_t sm = has_m ? running_mean->stride(0) : 0, sv = has_v ? running_var->stride(0) : 0;
    if (mean.scalar_type() == at::kDouble) {
      TF_LAUNCH(blocks, kThreads, 0, stream, update_running_stats_kernel<run_t, double>)(
          rm, sm, rv, sv, mean.data_ptr<double>(), var.data_ptr<double>(), C, momentum, unbias);
    } else {
      const at::Tensor m32 = mean.to(at::kFloat), v32 = var.to(at::kFloat);
      TF_LAUNCH(blocks, kThreads, 0, stream, update_running_stats_kernel<run_t, float>)(
          rm, sm, rv, sv, m32.data_ptr<float>(), v32.data_ptr<float>(), C, momentum, unbias);
    }
    TF_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TF_REGISTER_KERNELS(m) {
  m.impl("bn_update_running_stats_", &cuda::bn_update_running_stats_cuda);
  m.impl("bn_relu_fwd", &cuda::bn_relu_fwd_cuda);
  m.impl("bn_relu_bwd", &cuda::bn_relu_bwd_cuda);
  m.impl("bn_add_relu_fwd", &cuda::bn_add_relu_fwd_cuda);
  m.impl("bn_add_relu_bwd", &cuda::bn_add_relu_bwd_cuda);
}

}  // namespace torchfast
