// Fused BatchNorm + ReLU on CUDA: the straightforward, verifiable version.
//
// Memory passes (T = tensor bytes): training forward = statistics (read x) + normalise+ReLU (read x,
// write y): 2T read, 1T write; eval forward: 1T read, 1T write; backward = reduction (read x, dy)
// + elementwise (read x, dy, write dx): 4T read, 1T write, the ReLU mask recomputed from x with the
// forward's own formula x * scale + shift. Per-channel work goes through a [C, splits] partial
// table folded by a second kernel in a fixed order (deterministic, no atomics).
//
// Layouts: contiguous (N, C, S) and channels_last (N, S, C), addressed by index arithmetic; other
// stride patterns are made contiguous first. Not yet tuned (no vectorised loads, channels_last
// reductions are strided): issue 5 tracks the H100/H200 tuning.
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
  __device__ __forceinline__ int64_t channel(int64_t i) const { return channels_last ? i % C : (i / S) % C; }
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


template <typename scalar_t, typename acc_t>
__global__ void stats_partial_kernel(const scalar_t* x, Shape sh, int64_t splits, acc_t* ws) {
  __shared__ acc_t shared[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, M = sh.N * sh.S;
  const acc_t K = static_cast<acc_t>(x[sh.offset(c, 0)]);
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = split * blockDim.x + threadIdx.x; j < M; j += splits * blockDim.x) {
    const acc_t d = static_cast<acc_t>(x[sh.offset(c, j)]) - K;
    s1 += d;
    s2 += d * d;
  }
  const Add<acc_t> add;
  s1 = block_reduce(s1, add, shared);
  s2 = block_reduce(s2, add, shared);
  if (threadIdx.x == 0) {
    ws[(c * splits + split) * 2 + 0] = s1;
    ws[(c * splits + split) * 2 + 1] = s2;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void stats_finish_kernel(const scalar_t* x, Shape sh, int64_t splits, const acc_t* ws, const acc_t* w,
                                    const acc_t* b, double eps, acc_t* ch) {
  const int64_t C = sh.C;
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double S1 = 0, S2 = 0;
  for (int64_t s = 0; s < splits; ++s) {
    S1 += static_cast<double>(ws[(c * splits + s) * 2 + 0]);
    S2 += static_cast<double>(ws[(c * splits + s) * 2 + 1]);
  }
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

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* x, scalar_t* y, Shape sh, int64_t numel, const acc_t* ch) {
  const acc_t* scale = ch + kScale * sh.C;
  const acc_t* shift = ch + kShift * sh.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = sh.channel(i);
    const acc_t v = static_cast<acc_t>(x[i]) * scale[c] + shift[c];
    y[i] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_partial_kernel(const scalar_t* x, const scalar_t* dy, Shape sh, int64_t splits,
                                        const acc_t* ch, acc_t* ws) {
  __shared__ acc_t shared[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, M = sh.N * sh.S, C = sh.C;
  const acc_t sc = ch[kScale * C + c], sf = ch[kShift * C + c], mu = ch[kMean * C + c];
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = split * blockDim.x + threadIdx.x; j < M; j += splits * blockDim.x) {
    const int64_t o = sh.offset(c, j);
    const acc_t xv = static_cast<acc_t>(x[o]);
    const acc_t gm = (xv * sc + sf > acc_t(0)) ? static_cast<acc_t>(dy[o]) : acc_t(0);
    s1 += gm;
    s2 += gm * (xv - mu);
  }
  const Add<acc_t> add;
  s1 = block_reduce(s1, add, shared);
  s2 = block_reduce(s2, add, shared);
  if (threadIdx.x == 0) {
    ws[(c * splits + split) * 2 + 0] = s1;
    ws[(c * splits + split) * 2 + 1] = s2;
  }
}

template <typename acc_t>
__global__ void backward_finish_kernel(Shape sh, int64_t splits, const acc_t* ws, const acc_t* w, bool training,
                                       acc_t* ch, acc_t* grad_w, acc_t* grad_b) {
  const int64_t C = sh.C;
  const int64_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sum_dy = 0, sum_dy_xmu = 0;
  for (int64_t s = 0; s < splits; ++s) {
    sum_dy += static_cast<double>(ws[(c * splits + s) * 2 + 0]);
    sum_dy_xmu += static_cast<double>(ws[(c * splits + s) * 2 + 1]);
  }
  const double inv = static_cast<double>(ch[kInvstd * C + c]);
  const double wc = w ? static_cast<double>(w[c]) : 1.0;
  const double M = static_cast<double>(sh.N * sh.S);
  grad_b[c] = static_cast<acc_t>(sum_dy);
  grad_w[c] = static_cast<acc_t>(sum_dy_xmu * inv);
  ch[kK0 * C + c] = static_cast<acc_t>(wc * inv);
  ch[kK1 * C + c] = training && M > 0 ? static_cast<acc_t>(wc * inv * sum_dy / M) : acc_t(0);
  ch[kK2 * C + c] = training && M > 0 ? static_cast<acc_t>(wc * inv * inv * inv * sum_dy_xmu / M) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* x, const scalar_t* dy, scalar_t* dx, Shape sh, int64_t numel,
                                const acc_t* ch) {
  const int64_t C = sh.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = sh.channel(i);
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t gm = (xv * ch[kScale * C + c] + ch[kShift * C + c] > acc_t(0)) ? static_cast<acc_t>(dy[i]) : acc_t(0);
    dx[i] = static_cast<scalar_t>(gm * ch[kK0 * C + c] - ch[kK1 * C + c] - (xv - ch[kMean * C + c]) * ch[kK2 * C + c]);
  }
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

int64_t splits_for(const Shape& sh) {
  const int64_t M = sh.N * sh.S;
  const int64_t want = (M + kBnThreads * kElemsPerThread - 1) / (kBnThreads * kElemsPerThread);
  return std::max<int64_t>(1, std::min<int64_t>(want, std::min<int64_t>(kMaxSplits, 65535)));
}

int grid_for(int64_t numel) {
  const int64_t blocks = (numel + kBnThreads - 1) / kBnThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
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
      stats_partial_kernel<scalar_t, acc_t><<<dim3(C, splits), kBnThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), sh, splits, ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    forward_kernel<scalar_t, acc_t><<<grid_for(numel), kBnThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), sh, numel, chp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but input has ",
              input.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": grad_out is ", grad_out.scalar_type(),
              " but input is ", input.scalar_type());
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
      backward_partial_kernel<scalar_t, acc_t><<<dim3(C, splits), kBnThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), sh, splits, chp, ws.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    backward_finish_kernel<acc_t><<<cblocks, 128, 0, stream>>>(sh, splits, ws.data_ptr<acc_t>(), ptr_or_null<acc_t>(w),
                                                               training, chp, grad_w.data_ptr<acc_t>(),
                                                               grad_b.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (numel > 0) {
      backward_kernel<scalar_t, acc_t><<<grid_for(numel), kBnThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), sh, numel, chp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
