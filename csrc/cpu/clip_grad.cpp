// Multi-tensor gradient clipping on the CPU (the loops are in clip_grad_kernels.h).
//   multi_tensor_norm:  one parallel pass reading every tensor once (1 read).
//   multi_tensor_clip_: one parallel pass (one per set of tensors sharing no memory, disjoint.h),
//                       read + write, skipped entirely when the clip coefficient is exactly 1
//                       (x * 1 == x, so skipping is exact).
// Both walk the fixed chunk table of common.h; per-chunk partial results are combined serially in
// chunk order, so the norm is bitwise identical for any torch.get_num_threads().
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/cpu_features.h"
#include "disjoint.h"

#define TORCHFAST_CLIP_ISA clip_base
#include "cpu/clip_grad_kernels.h"
#undef TORCHFAST_CLIP_ISA

namespace torchfast {
namespace {

// The loops for the running CPU: AVX-512, AVX2 or the build's baseline (see clip_grad_kernels.h).
template <typename scalar_t>
struct Loops {
  decltype(&clip_base::norm_partials<scalar_t>) norm;
  decltype(&clip_base::scale_spans<scalar_t>) scale;
};

template <typename scalar_t>
Loops<scalar_t> loops() {
#if defined(__x86_64__) && defined(__GNUC__)
  // the vector sets convert float16 with F16C (clip_grad_isa.cpp)
  if (std::is_same_v<scalar_t, c10::Half> && !cpu_features::has_f16c())
    return {&clip_base::norm_partials<scalar_t>, &clip_base::scale_spans<scalar_t>};
  if (cpu_features::has_avx512()) return {&clip_avx512::norm_partials<scalar_t>, &clip_avx512::scale_spans<scalar_t>};
  if (cpu_features::has_avx2()) return {&clip_avx2::norm_partials<scalar_t>, &clip_avx2::scale_spans<scalar_t>};
#endif
  return {&clip_base::norm_partials<scalar_t>, &clip_base::scale_spans<scalar_t>};
}

// The memory block of a dense tensor (any dimension order), or a contiguous copy of it.
at::Tensor dense_view(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// The chunk table as the loops take it: each chunk's first element and length.
template <typename scalar_t>
std::vector<Span> spans_of(const std::vector<at::Tensor>& dense, const std::vector<Chunk>& chunks) {
  std::vector<Span> spans;
  spans.reserve(chunks.size());
  for (const Chunk& ch : chunks)
    spans.push_back({static_cast<scalar_t*>(dense[ch.tensor].data_ptr()) + ch.begin, ch.end - ch.begin});
  return spans;
}

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "multi_tensor_norm: expected at least one tensor");
  TORCH_CHECK(norm_type > 0, "multi_tensor_norm: norm_type must be > 0 or inf, got ", norm_type);
  const auto dtype = tensors[0].scalar_type();
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "multi_tensor_norm: tensor ", i, " has layout ",
                tensors[i].layout(), "; sparse gradients are not supported, use torch.nn.utils.clip_grad_norm_");
    TORCH_CHECK(tensors[i].device().is_cpu(), "multi_tensor_norm: tensor ", i, " is on ", tensors[i].device());
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "multi_tensor_norm: tensor ", i, " is ",
                tensors[i].scalar_type(), " but tensor 0 is ", dtype, "; group tensors by dtype first");
    TORCH_CHECK(at::isFloatingType(dtype), "multi_tensor_norm: expected floating-point tensors, got ", dtype);
    // torch.nn.utils.clip_grad_norm_ refuses this too, with this message.
    TORCH_CHECK(!(std::isinf(norm_type) && tensors[i].numel() == 0), "_foreach_norm cannot compute the infinity norm on an empty tensor because the operation does not have an identity");
    dense.push_back(dense_view(tensors[i]));
  }
  const std::vector<Chunk> chunks = make_chunks(dense, kChunkElems);
  std::vector<double> partial(chunks.size(), 0.0);
  const bool is_inf = std::isinf(norm_type);
  const NormKind kind = is_inf ? NormKind::kInf
                        : norm_type == 1.0 ? NormKind::kOne
                        : norm_type == 2.0 ? NormKind::kTwo
                                           : NormKind::kP;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Loops<scalar_t> k = loops<scalar_t>();
    const std::vector<Span> spans = spans_of<scalar_t>(dense, chunks);
    parallel_over_chunks(chunks, [&](int64_t cb, int64_t ce) {
      k.norm(kind, spans.data() + cb, ce - cb, norm_type, partial.data() + cb);
    });
    double total = 0.0;
    if (kind == NormKind::kInf) {
      for (double v : partial) {
        if (std::isnan(v) || std::isnan(total)) total = std::numeric_limits<double>::quiet_NaN();
        else total = v > total ? v : total;
      }
    } else {
      for (double v : partial) total += v;
      if (kind == NormKind::kTwo) total = std::sqrt(total);
      else if (kind == NormKind::kP) total = std::pow(total, 1.0 / norm_type);
    }
    out = at::scalar_tensor(static_cast<acc_t>(total),
                            at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return out;
}

void multi_tensor_clip_cpu(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  if (tensors.empty()) return;
  TORCH_CHECK(total_norm.numel() == 1, "multi_tensor_clip_: total_norm must have one element, got ",
              total_norm.numel());
  TORCH_CHECK(total_norm.device().is_cpu(), "multi_tensor_clip_: total_norm is on ", total_norm.device(),
              " but the tensors are on cpu");
  const auto dtype = tensors[0].scalar_type();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "multi_tensor_clip_: tensor ", i, " has layout ",
                tensors[i].layout(), "; sparse gradients are not supported, use torch.nn.utils.clip_grad_norm_");
    TORCH_CHECK(tensors[i].device().is_cpu(), "multi_tensor_clip_: tensor ", i, " is on ", tensors[i].device());
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "multi_tensor_clip_: tensor ", i, " is ",
                tensors[i].scalar_type(), " but tensor 0 is ", dtype);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_tensor_clip_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t total = total_norm.to(c10::CppTypeToScalarType<acc_t>::value).item<acc_t>();
    acc_t coef = static_cast<acc_t>(max_norm) / (total + static_cast<acc_t>(1e-6));
    if (coef >= acc_t(1)) return;  // clamp(coef, max=1) == 1 and x * 1 == x: nothing to write
    // NaN coef falls through and poisons the gradients, as torch.nn.utils.clip_grad_norm_ does.
    std::vector<at::Tensor> strided;
    std::vector<at::Tensor> dense;
    for (const auto& t : tensors) (t.is_non_overlapping_and_dense() ? dense : strided).push_back(t);
    // An expanded (stride-0) tensor cannot be scaled in place: refuse it with stock's error before
    // anything is written, not after the dense tensors were scaled.
    for (const auto& t : strided) at::assert_no_internal_overlap(t);
    const Loops<scalar_t> k = loops<scalar_t>();
    // A gradient listed twice (or two views of one block) is scaled in separate passes: within a
    // pass the threads write at once (disjoint.h).
    for (const auto& pass : disjoint_passes(dense)) {
      const std::vector<Chunk> chunks = make_chunks(pass, kChunkElems);
      // Each thread walks its range forwards (as interleaved streams, see clip_grad_kernels.h). Starting
      // on the chunks the norm pass read last, still in cache, measured 4-7 % slower on one thread on the
      // 2-core VM with one stream (a descending walk the prefetchers follow less well), and no faster
      // with four (norm pass walking its chunks backwards, the scaling forwards; ResNet-50's and GPT-2's
      // gradients, interleaved, 1 and 2 threads): the few MB of cache a thread gets there save too little.
      const std::vector<Span> spans = spans_of<scalar_t>(pass, chunks);
      parallel_over_chunks(chunks, [&](int64_t cb, int64_t ce) {
        k.scale(spans.data() + cb, ce - cb, static_cast<double>(coef));
      });
    }
    for (auto& t : strided) t.mul_(static_cast<double>(coef));
  });
}

at::Tensor clip_grad_norm_fused_cpu(at::TensorList tensors, double max_norm, double norm_type) {
  at::Tensor total = multi_tensor_norm_cpu(tensors, norm_type);
  // The coefficient from the norm as returned, rounded to the gradients' dtype (stock computes it there):
  // a float16 norm that overflows to inf clips the gradients to zero, as stock's does.
  multi_tensor_clip_cpu(tensors, total.to(tensors[0].scalar_type()), max_norm);
  return total;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
  m.impl("multi_tensor_clip_", &multi_tensor_clip_cpu);
  m.impl("clip_grad_norm_fused_", &clip_grad_norm_fused_cpu);
}

}  // namespace torchfast
