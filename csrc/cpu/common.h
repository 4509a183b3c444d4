// Shared CPU machinery: the multi-tensor chunk table used by clipping and init.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace torchfast
