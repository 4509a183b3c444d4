// Shared CPU machinery: the multi-tensor chunk table used by clipping and init.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace torchfast {

// Elements per chunk of the multi-tensor table: large enough that one chunk amortises the loop
// overhead, small enough that GPT-2-sized lists split evenly over the threads. A multiple of 4 so
// Philox blocks never straddle chunks. Fixed, so reductions come out identical for any thread count.
constexpr int64_t kChunkElems = 32768;

struct Chunk {
  int64_t tensor;  // index into the list
  int64_t begin;   // element range [begin, end) of that tensor, in memory order
  int64_t end;
};

// Splits every tensor of the list into chunks of at most chunk_elems elements, in list order.
inline std::vector<Chunk> make_chunks(at::TensorList tensors, int64_t chunk_elems) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += chunk_elems) chunks.push_back({t, b, std::min(n, b + chunk_elems)});
  }
  return chunks;
}

// Runs f(cb, ce) on chunk ranges [cb, ce), one contiguous range per thread, the ranges holding about
// the same number of elements. (Split by chunk count, the many small tensors of a list put their
// short chunks in one thread's range: on ResNet-50's 161 gradients the second of 2 threads got 23 %
// more elements than the first; split by elements, the 2-thread norm pass there took 4-10 % less time
// and the whole clip ~4 % less, interleaved on the 2-core VM.) The split depends only on the table and
// the thread count, so passes over the same table give each thread the same chunks.
template <typename F>
inline void parallel_over_chunks(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), n);
  if (parts <= 1 || at::in_parallel_region()) {
    if (n > 0) f(0, n);
    return;
  }
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin;
  // bound[p]: the first chunk whose preceding elements reach p / parts of the total
  std::vector<int64_t> bound(parts + 1, n);
  bound[0] = 0;
  int64_t before = 0, p = 1;
  for (int64_t i = 0; i < n && p < parts; ++i) {
    while (p < parts && before * parts >= total * p) bound[p++] = i;
    before += chunks[i].end - chunks[i].begin;
  }
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t q = pb; q < pe; ++q)
      if (bound[q] < bound[q + 1]) f(bound[q], bound[q + 1]);
  });
}

}  // namespace torchfast
