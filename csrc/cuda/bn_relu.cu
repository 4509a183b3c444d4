// Fused BatchNorm + ReLU on CUDA: the straightforward, verifiable version.
//
// Memory passes (T = tensor bytes): training forward = statistics (read x) + normalise+ReLU (read x,
// write y): 2T read, 1T write; eval forward: 1T read, 1T write; backward = reduction (read x, dy)
// + elementwise (read x, dy, write dx): 4T read, 1T write, the ReLU mask recomputed from x with the
// forward's own formula x * scale + shift. Per-channel work goes through a [C, splits] partial
// table folded by a second kernel in a fixed order (deterministic, no atomics).
//
// Layouts, each with its own access pattern (no per-element division or modulo):
//   contiguous (N, C, S): reductions walk whole (n, c) rows in tiles of kTile elements; elementwise
//     passes use a (N*C rows) x (tiles per row) grid, the channel's constants loaded once per block.
//   channels_last (N, S, C): 32 x 8 thread blocks, threadIdx.x along channels (coalesced), .y along
//     the N*S rows; reductions fold the 8 row-lanes of a channel in shared memory in a fixed order.
// Other stride patterns are made contiguous first. Not yet tuned on a GPU (no 16-byte vector loads
// yet): issue 5 tracks the H100/H200 measurements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "layout.h"

namespace torchfast {
namespace cuda {
namespace {

constexpr int kBnThreads = 256;
constexpr int64_t kElemsPerThread = 16;  // target work per thread of a reduction split
constexpr int64_t kMaxSplits = 1024;

struct Shape {
  int64_t N, C, S;
  bool channels_last;  // memory order (N, S, C)
  __device__ __forceinline__ int64_t offset(int64_t c, int64_t j) const {  // j-th element of channel c
    if (channels_last) return j * C + c;
    const int64_t n = j / S;
    return (n * C + c) * S + (j - n * S);
  }
};

// Per-channel table layout in `ch` (acc_t, 8 rows of C): 0 mean, 1 invstd, 2 var, 3 scale,
// 4 shift, 5 k0, 6 k1, 7 k2.
enum Row { kMean = 0, kInvstd, kVar, kScale, kShift, kK0, kK1, kK2, kRows };

template <typename T>
struct Add {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Fills the mean/invstd/var/scale/shift rows of channel c; scale/shift use the one formula the
// backward's mask recomputation also uses.
template <typename acc_t>
__device__ __forceinline__ void set_channel(int64_t C, int64_t c, acc_t mean, acc_t invstd, acc_t var, const acc_t* w,
                                            const acc_t* b, acc_t* ch) {
  ch[kMean * C + c] = mean;
  ch[kInvstd * C + c] = invstd;
  ch[kVar * C + c] = var;
  const acc_t scale = (w ? w[c] : acc_t(1)) * invstd;
  ch[kScale * C + c] = scale;
  ch[kShift * C + c] = (b ? b[c] : acc_t(0)) - mean * scale;
}


constexpr int64_t kTile = 1024;  // elements of one (n, c) row per reduction/elementwise step (contiguous)
constexpr int kLaneRows = 8;     // channels_last blocks: 32 channels x 8 rows

// Per-channel reduction "ops": constants of channel c, then accumulation of one element.
template <typename scalar_t, typename acc_t>
struct StatsOp {  // shifted sums sum(x - K), sum((x - K)^2), K = the channel's first element
  const scalar_t* x;
  Shape sh;
  static constexpr bool kNeedsDy = false;
  struct Channel { acc_t K; };
  __device__ Channel channel(int64_t c) const { return {static_cast<acc_t>(x[sh.offset(c, 0)])}; }
  __device__ void add(const Channel& p, acc_t xv, acc_t, acc_t& s1, acc_t& s2) const {
    const acc_t d = xv - p.K;
    s1 += d;
    s2 += d * d;
  }
};

template <typename acc_t>
struct BackwardSumsOp {  // sum(dy * mask), sum(dy * mask * (x - mean))
  const acc_t* ch;
  int64_t C;
  static constexpr bool kNeedsDy = true;
  struct Channel { acc_t sc, sf, mu; };
  __device__ Channel channel(int64_t c) const { return {ch[kScale * C + c], ch[kShift * C + c], ch[kMean * C + c]}; }
  __device__ void add(const Channel& p, acc_t xv, acc_t gv, acc_t& s1, acc_t& s2) const {
    const acc_t gm = xv * p.sc + p.sf > acc_t(0) ? gv : acc_t(0);
    s1 += gm;
    s2 += gm * (xv - p.mu);
  }
};

// Contiguous layout: grid (C, splits); split k takes tiles k, k + splits, ... of the channel's
// N * tiles_per_row tiles. Writes the two sums of (c, split) to ws.
template <typename scalar_t, typename acc_t, typename Op>
__global__ void reduce_ncs_kernel(const scalar_t* x, const scalar_t* dy, Shape sh, int64_t splits, Op op, acc_t* ws) {
  __shared__ acc_t shared[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, S = sh.S;
  const auto p = op.channel(c);
  const int64_t tiles_per_row = (S + kTile - 1) / kTile, tiles = sh.N * tiles_per_row;
  acc_t s1 = 0, s2 = 0;
  for (int64_t t = split; t < tiles; t += splits) {
    const int64_t n = t / tiles_per_row, s0 = (t - n * tiles_per_row) * kTile;
    const int64_t base = (n * sh.C + c) * S, s_end = min(S, s0 + kTile);
    for (int64_t s = s0 + threadIdx.x; s < s_end; s += blockDim.x) {
      const acc_t gv = Op::kNeedsDy ? static_cast<acc_t>(dy[base + s]) : acc_t(0);
      op.add(p, static_cast<acc_t>(x[base + s]), gv, s1, s2);
    }
  }
  const Add<acc_t> add;
  s1 = block_reduce(s1, add, shared);
  s2 = block_reduce(s2, add, shared);
  if (threadIdx.x == 0) {
    ws[(c * splits + split) * 2 + 0] = s1;
    ws[(c * splits + split) * 2 + 1] = s2;
  }
}

// channels_last: grid (ceil(C / 32), splits), block (32, kLaneRows). Thread (tx, ty) of split k
// takes channel 32 * blockIdx.x + tx over rows k * kLaneRows + ty + j * splits * kLaneRows.
template <typename scalar_t, typename acc_t, typename Op>
__global__ void reduce_nsc_kernel(const scalar_t* x, const scalar_t* dy, Shape sh, int64_t splits, Op op, acc_t* ws) {
  __shared__ acc_t p1[kLaneRows][33], p2[kLaneRows][33];
  const int64_t C = sh.C, R = sh.N * sh.S, split = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t s1 = 0, s2 = 0;
  if (c < C) {
    const auto p = op.channel(c);
    for (int64_t r = split * kLaneRows + threadIdx.y; r < R; r += splits * kLaneRows) {
      const acc_t gv = Op::kNeedsDy ? static_cast<acc_t>(dy[r * C + c]) : acc_t(0);
      op.add(p, static_cast<acc_t>(x[r * C + c]), gv, s1, s2);
    }
  }
  p1[threadIdx.y][threadIdx.x] = s1;
  p2[threadIdx.y][threadIdx.x] = s2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t1 = 0, t2 = 0;
    for (int k = 0; k < kLaneRows; ++k) {
      t1 += p1[k][threadIdx.x];
      t2 += p2[k][threadIdx.x];
    }
    ws[(c * splits + split) * 2 + 0] = t1;
    ws[(c * splits + split) * 2 + 1] = t2;
  }
}

// The two sums of channel c, folded over its splits in split order, in double.
template <typename acc_t>
__device__ __forceinline__ void fold_partials(const acc_t* ws, int64_t c, int64_t splits, double& a, double& b) {
  a = 0;
  b = 0;
  for (int64_t s = 0; s < splits; ++s) {
    a += static_cast<double>(ws[(c * splits + s) * 2 + 0]);
    b += static_cast<double>(ws[(c * splits + s) * 2 + 1]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void stats_finish_kernel(const scalar_t* x, Shape sh, int64_t splits, const acc_t* ws, const acc_t* w,
                                    const acc_t* b, double eps, acc_t* ch) {
  const int64_t C = sh.C;
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double S1, S2;
  fold_partials(ws, c, splits, S1, S2);
  const double M = static_cast<double>(sh.N * sh.S);
  const double K = static_cast<double>(static_cast<acc_t>(x[sh.offset(c, 0)]));
  const double m1 = S1 / M;
  const double var = fmax(0.0, S2 / M - m1 * m1);
  set_channel(C, c, static_cast<acc_t>(K + m1), static_cast<acc_t>(1.0 / sqrt(var + eps)), static_cast<acc_t>(var),
              w, b, ch);
}

// Eval forward: statistics from the running buffers.
template <typename acc_t>
__global__ void eval_prepare_kernel(int64_t C, const acc_t* rm, const acc_t* rv, const acc_t* w, const acc_t* b,
                                    double eps, acc_t* ch) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  set_channel(C, c, rm[c], static_cast<acc_t>(1.0 / sqrt(static_cast<double>(rv[c]) + eps)), rv[c], w, b, ch);
}

// Backward: statistics saved by the forward.
template <typename acc_t>
__global__ void saved_prepare_kernel(int64_t C, const acc_t* mean, const acc_t* invstd, const acc_t* w,
                                     const acc_t* b, acc_t* ch) {
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  set_channel(C, c, mean[c], invstd[c], acc_t(0), w, b, ch);
}

// Elementwise "ops": constants of channel c, then one output element.
template <typename acc_t>
struct ForwardOp {  // y = relu(x * scale + shift)
  const acc_t* ch;
  int64_t C;
  static constexpr bool kNeedsDy = false;
  struct Channel { acc_t sc, sf; };
  __device__ Channel channel(int64_t c) const { return {ch[kScale * C + c], ch[kShift * C + c]}; }
  __device__ acc_t apply(const Channel& p, acc_t xv, acc_t) const {
    const acc_t v = xv * p.sc + p.sf;
    return v < acc_t(0) ? acc_t(0) : v;  // NaN propagates, as in torch.relu
  }
};

template <typename acc_t>
struct BackwardOp {  // dx = gm * k0 - k1 - (x - mean) * k2, gm the ReLU-masked gradient
  const acc_t* ch;
  int64_t C;
  static constexpr bool kNeedsDy = true;
  struct Channel { acc_t sc, sf, mu, k0, k1, k2; };
  __device__ Channel channel(int64_t c) const {
    return {ch[kScale * C + c], ch[kShift * C + c], ch[kMean * C + c], ch[kK0 * C + c], ch[kK1 * C + c],
            ch[kK2 * C + c]};
  }
  __device__ acc_t apply(const Channel& p, acc_t xv, acc_t gv) const {
    const acc_t gm = xv * p.sc + p.sf > acc_t(0) ? gv : acc_t(0);
    return gm * p.k0 - p.k1 - (xv - p.mu) * p.k2;
  }
};

// Contiguous layout: grid (N * C rows, tiles per row); one channel per block.
template <typename scalar_t, typename acc_t, typename Op>
__global__ void elementwise_ncs_kernel(const scalar_t* x, const scalar_t* dy, scalar_t* out, Shape sh, Op op) {
  const int64_t row = blockIdx.x, S = sh.S;
  const auto p = op.channel(row % sh.C);
  const int64_t base = row * S, s0 = static_cast<int64_t>(blockIdx.y) * kTile, s_end = min(S, s0 + kTile);
  for (int64_t s = s0 + threadIdx.x; s < s_end; s += blockDim.x) {
    const acc_t gv = Op::kNeedsDy ? static_cast<acc_t>(dy[base + s]) : acc_t(0);
    out[base + s] = static_cast<scalar_t>(op.apply(p, static_cast<acc_t>(x[base + s]), gv));
  }
}

// channels_last: grid (ceil(N * S / kLaneRows)), block (32, kLaneRows); threads walk a row's channels.
template <typename scalar_t, typename acc_t, typename Op>
__global__ void elementwise_nsc_kernel(const scalar_t* x, const scalar_t* dy, scalar_t* out, Shape sh, Op op) {
  const int64_t C = sh.C, R = sh.N * sh.S;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kLaneRows + threadIdx.y;
  if (r >= R) return;
  for (int64_t c = threadIdx.x; c < C; c += 32) {
    const int64_t i = r * C + c;
    const acc_t gv = Op::kNeedsDy ? static_cast<acc_t>(dy[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(op.apply(op.channel(c), static_cast<acc_t>(x[i]), gv));
  }
}

// Launchers for both layouts.
template <typename scalar_t, typename acc_t, typename Op>
void launch_reduce(const scalar_t* x, const scalar_t* dy, const Shape& sh, int64_t splits, const Op& op, acc_t* ws,
                   cudaStream_t stream) {
  if (sh.channels_last) {
    reduce_nsc_kernel<scalar_t, acc_t, Op><<<dim3((sh.C + 31) / 32, splits), dim3(32, kLaneRows), 0, stream>>>(
        x, dy, sh, splits, op, ws);
  } else {
    reduce_ncs_kernel<scalar_t, acc_t, Op><<<dim3(sh.C, splits), kBnThreads, 0, stream>>>(x, dy, sh, splits, op, ws);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename Op>
void launch_elementwise(const scalar_t* x, const scalar_t* dy, scalar_t* out, const Shape& sh, const Op& op,
                        cudaStream_t stream) {
  if (sh.channels_last) {
    const int64_t blocks = (sh.N * sh.S + kLaneRows - 1) / kLaneRows;
    elementwise_nsc_kernel<scalar_t, acc_t, Op><<<blocks, dim3(32, kLaneRows), 0, stream>>>(x, dy, out, sh, op);
  } else {
    const int64_t tiles = (sh.S + kTile - 1) / kTile;
    TORCH_CHECK(tiles <= 65535, "bn_relu: spatial size ", sh.S, " too large for one (n, c) row");
    elementwise_ncs_kernel<scalar_t, acc_t, Op><<<dim3(sh.N * sh.C, tiles), kBnThreads, 0, stream>>>(x, dy, out, sh, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
__global__ void backward_finish_kernel(Shape sh, int64_t splits, const acc_t* ws, const acc_t* w, bool training,
                                       acc_t* ch, acc_t* grad_w, acc_t* grad_b) {
  const int64_t C = sh.C;
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sum_dy, sum_dy_xmu;
  fold_partials(ws, c, splits, sum_dy, sum_dy_xmu);
  const double inv = static_cast<double>(ch[kInvstd * C + c]);
  const double wc = w ? static_cast<double>(w[c]) : 1.0;
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
  sh.channels_last = !x.is_contiguous();  // native_layout() held, so this means channels_last
  return sh;
}

// Reduction splits per channel: enough that each thread folds about kElemsPerThread elements, at most
// kMaxSplits (and, for contiguous inputs, at most the number of row tiles).
int64_t splits_for(const Shape& sh) {
  const int64_t M = sh.N * sh.S;
  int64_t want;
  if (sh.channels_last) {
    want = (M + kLaneRows * kElemsPerThread - 1) / (kLaneRows * kElemsPerThread);
  } else {
    want = (M + kBnThreads * kElemsPerThread - 1) / (kBnThreads * kElemsPerThread);
    want = std::min<int64_t>(want, sh.N * ((sh.S + kTile - 1) / kTile));
  }
  return std::max<int64_t>(1, std::min<int64_t>(want, kMaxSplits));
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
  TORCH_CHECK(input.is_cuda(), op, ": input is on ", input.device(), ", expected a CUDA device");
  TORCH_CHECK(input.dim() >= 2, op, ": input must have at least 2 dimensions (N, C, ...), got ", input.dim());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
              input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_relu_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, bool training,
    double eps) {
  const char* op = "bn_relu_fwd";
  check_input(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = channel_vector(weight, acc_type, input, op, "weight");
  const at::Tensor b = channel_vector(bias, acc_type, input, op, "bias");
  const at::Tensor rm = channel_vector(running_mean, acc_type, input, op, "running_mean");
  const at::Tensor rv = channel_vector(running_var, acc_type, input, op, "running_var");
  TORCH_CHECK(training || (rm.defined() && rv.defined()), op, ": eval mode needs running_mean and running_var");
  const bool native = native_layout(input);
  const at::Tensor x = native ? input : input.contiguous();
  at::Tensor out = at::empty_like(input);
  at::Tensor y = native ? out : at::empty_like(x);
  const int64_t C = input.size(1), numel = x.numel();
  at::Tensor ch = at::empty({kRows, C}, input.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shape sh = shape_of(x);
    acc_t* chp = ch.data_ptr<acc_t>();
    const int cblocks = static_cast<int>((C + 127) / 128);
    if (training) {
      if (numel == 0) {
        ch.fill_(std::numeric_limits<double>::quiet_NaN());
        return;
      }
      const int64_t splits = splits_for(sh);
      at::Tensor ws = at::empty({C * splits * 2}, input.options().dtype(acc_type));
      launch_reduce<scalar_t, acc_t>(x.data_ptr<scalar_t>(), nullptr, sh, splits,
                                     StatsOp<scalar_t, acc_t>{x.data_ptr<scalar_t>(), sh}, ws.data_ptr<acc_t>(), stream);
      stats_finish_kernel<scalar_t, acc_t><<<cblocks, 128, 0, stream>>>(
          x.data_ptr<scalar_t>(), sh, splits, ws.data_ptr<acc_t>(), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), eps,
          chp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      eval_prepare_kernel<acc_t><<<cblocks, 128, 0, stream>>>(C, rm.data_ptr<acc_t>(), rv.data_ptr<acc_t>(),
                                                              ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), eps, chp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (numel == 0) return;
    launch_elementwise<scalar_t, acc_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), sh,
                                        ForwardOp<acc_t>{chp, C}, stream);
  });
  if (!native) out.copy_(y);
  return {out, ch[kMean].clone(), ch[kInvstd].clone(), ch[kVar].clone()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                                bool training) {
  const char* op = "bn_relu_bwd";
  check_input(input, op);
  check_grad_out(grad_out, input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = channel_vector(weight, acc_type, input, op, "weight");
  const at::Tensor b = channel_vector(bias, acc_type, input, op, "bias");
  const at::Tensor m = channel_vector(mean, acc_type, input, op, "mean");
  const at::Tensor is = channel_vector(invstd, acc_type, input, op, "invstd");
  const bool native = native_layout(input) && grad_out.strides() == input.strides();
  const at::Tensor x = native ? input : input.contiguous();
  const at::Tensor dy = native ? grad_out : grad_out.contiguous();
  at::Tensor grad_in = at::empty_like(input);
  at::Tensor dx = native ? grad_in : at::empty_like(x);
  const int64_t C = input.size(1), numel = x.numel();
  at::Tensor ch = at::zeros({kRows, C}, input.options().dtype(acc_type));
  at::Tensor grad_w = at::empty({C}, input.options().dtype(acc_type));
  at::Tensor grad_b = at::empty({C}, input.options().dtype(acc_type));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Shape sh = shape_of(x);
    acc_t* chp = ch.data_ptr<acc_t>();
    const int cblocks = static_cast<int>((C + 127) / 128);
    saved_prepare_kernel<acc_t><<<cblocks, 128, 0, stream>>>(C, m.data_ptr<acc_t>(), is.data_ptr<acc_t>(),
                                                             ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), chp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t splits = numel > 0 ? splits_for(sh) : 1;
    at::Tensor ws = at::zeros({C * splits * 2}, input.options().dtype(acc_type));
    if (numel > 0) {
      launch_reduce<scalar_t, acc_t>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), sh, splits,
                                     BackwardSumsOp<acc_t>{chp, C}, ws.data_ptr<acc_t>(), stream);
    }
    backward_finish_kernel<acc_t><<<cblocks, 128, 0, stream>>>(sh, splits, ws.data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
                                                               training, chp, grad_w.data_ptr<acc_t>(),
                                                               grad_b.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (numel > 0) {
      launch_elementwise<scalar_t, acc_t>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), sh,
                                          BackwardOp<acc_t>{chp, C}, stream);
    }
  });
  if (!native) grad_in.copy_(dx);
  return {grad_in, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(torchfast, CUDA, m) {
  m.impl("bn_relu_fwd", &cuda::bn_relu_fwd_cuda);
  m.impl("bn_relu_bwd", &cuda::bn_relu_bwd_cuda);
}

}  // namespace torchfast
