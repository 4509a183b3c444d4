// Batched Philox init on the CPU: one parallel pass over every tensor of the batch (float64 tensors take
// the full-precision variant of the stream, philox_values_f64).
// Memory traffic: one write of each tensor, nothing read. Values depend only on (seed, stream,
// element index), so the result is bitwise the same for any thread count and chunking.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "cpu/common.h"
#include "cpu/philox_avx2.h"
#include "cpu/philox_avx512.h"
#include "cpu/half_convert.h"

namespace torchfast {
namespace {

// Fills whole steps of STEP elements from `values(blk0, float* dst)` (a vector path) starting at i,
// stopping before a step whose STEP / 4 blocks would wrap the low 32-bit counter word; returns where
// it stopped. Non-float tensors go through a float buffer.
// float values to the tensor's dtype, rounded as static_cast rounds them (nearest even): bfloat16
// through half_convert.h's AVX2 bit operations, float16 through F16C where the CPU has it (c10's
// conversion operators keep the loop scalar: float16 normal_ took 2.9x float32's time).
template <typename scalar_t>
inline void store_converted(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    f16c::float_to_bf16(src, dst, n);
    return;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (cpu_features::has_f16c()) {
      f16c::float_to_half(src, dst, n);
      return;
    }
  }
  for (int64_t r = 0; r < n; ++r) dst[r] = static_cast<scalar_t>(src[r]);
}

template <int STEP, typename scalar_t, typename Values>
int64_t fill_steps(scalar_t* out, int64_t i, int64_t end, Values&& values) {
  alignas(64) float buf[STEP];
  for (; i + STEP <= end; i += STEP) {
    const uint64_t blk0 = static_cast<uint64_t>(i >> 2);
    if (static_cast<uint32_t>(blk0) > 0xFFFFFFFFu - (STEP / 4 - 1)) break;
    if constexpr (std::is_same_v<scalar_t, float>) {
      values(blk0, out + i);
    } else {
      values(blk0, buf);
      store_converted(buf, out + i, STEP);
    }
  }
  return i;
}

// float64 tensors: two elements per Philox block, at full precision (philox.h, philox_values_f64).
void fill_range_f64(double* out, int64_t begin, int64_t end, uint64_t seed, uint64_t stream,
                    const InitParams64& prm) {
  double v[2];
  for (int64_t i = begin; i < end; i += 2) {  // begin is even (chunks are block aligned)
    philox_values_f64(seed, stream, static_cast<uint64_t>(i >> 1), prm, v);
    out[i] = v[0];
    if (i + 1 < end) out[i + 1] = v[1];
  }
}

template <typename scalar_t>
void fill_range(scalar_t* out, int64_t begin, int64_t end, uint64_t seed, uint64_t stream, const InitParams& prm) {
  // begin is a multiple of 4 (chunks are block aligned); the last block may be partial.
  if (prm.kind == kConstant) {
    std::fill(out + begin, out + end, static_cast<scalar_t>(prm.p0));
    return;
  }
  int64_t i = begin;
#ifdef TORCHFAST_HAVE_AVX2_PATH
  if (cpu_features::has_avx512() && cpu_features::has_avx2())
    i = fill_steps<128>(out, i, end, [&](uint64_t blk0, float* dst) { avx512::values128(seed, stream, blk0, prm, dst); });
  if (cpu_features::has_avx2())
    i = fill_steps<64>(out, i, end, [&](uint64_t blk0, float* dst) { avx2::values64(seed, stream, blk0, prm, dst); });
#endif
  float v[4];
  for (; i < end; i += 4) {
    philox_values(seed, stream, static_cast<uint64_t>(i >> 2), prm, v);
    const int64_t n = std::min<int64_t>(4, end - i);
    for (int64_t r = 0; r < n; ++r) out[i + r] = static_cast<scalar_t>(v[r]);
  }
}

void philox_fill_cpu(at::TensorList tensors, int64_t seed, at::IntArrayRef streams, at::IntArrayRef kinds,
                     at::ArrayRef<double> params) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(static_cast<int64_t>(streams.size()) == n && static_cast<int64_t>(kinds.size()) == n &&
                  static_cast<int64_t>(params.size()) == kInitParams * n,
              "philox_fill_: expected one stream, one kind and ", kInitParams, " params per tensor, got ", n,
              " tensors, ",
              streams.size(), " streams, ", kinds.size(), " kinds and ", params.size(), " params");
  std::vector<InitParams> prm(n);
  std::vector<InitParams64> prm64(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu(), "philox_fill_: tensor ", i, " is on ", t.device(), ", expected cpu");
    TORCH_CHECK(t.is_contiguous(), "philox_fill_: tensor ", i, " must be contiguous");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "philox_fill_: tensor ", i,
                " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(kinds[i] >= kUniform && kinds[i] <= kConstant, "philox_fill_: unknown kind ", kinds[i]);
    prm[i] = InitParams{kinds[i],
                        static_cast<float>(params[kInitParams * i + 0]),
                        static_cast<float>(params[kInitParams * i + 1]),
                        static_cast<float>(params[kInitParams * i + 2]),
                        static_cast<float>(params[kInitParams * i + 3]),
                        static_cast<float>(params[kInitParams * i + 4]),
                        static_cast<float>(params[kInitParams * i + 5])};
    prm64[i].kind = kinds[i];
    for (int k = 0; k < kInitParams; ++k) prm64[i].p[k] = params[kInitParams * i + k];
  }
  const std::vector<Chunk> chunks = make_chunks(tensors, kChunkElems);
  const uint64_t useed = static_cast<uint64_t>(seed);
  parallel_over_chunks(chunks, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = tensors[ch.tensor];
      if (t.scalar_type() == at::kDouble) {
        fill_range_f64(t.data_ptr<double>(), ch.begin, ch.end, useed, static_cast<uint64_t>(streams[ch.tensor]),
                       prm64[ch.tensor]);
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "philox_fill_cpu", [&] {
        fill_range<scalar_t>(t.data_ptr<scalar_t>(), ch.begin, ch.end, useed,
                             static_cast<uint64_t>(streams[ch.tensor]), prm[ch.tensor]);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchfast, CPU, m) { m.impl("philox_fill_", &philox_fill_cpu); }

}  // namespace torchfast
