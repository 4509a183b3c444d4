// Splitting a list of dense tensors into passes whose tensors share no memory, for the in-place
// multi-tensor ops (clipping's scale). A pass writes its tensors concurrently (threads, or CUDA blocks
// of one launch), so a tensor listed twice, or two views of one block, in the same pass would lose
// updates; stock's CPU _foreach_mul_ multiplies them one after the other, each element once per
// listing. Host code only (CPU kernels, CUDA launches, the CUDA emulator).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace torchfast {

// Passes in order: tensor i goes to one pass after the last pass of any earlier tensor whose memory
// block overlaps its own, so overlapping tensors are written one pass after another and the others
// stay together. Tensors must be non-overlapping and dense (their block is numel * itemsize bytes from
// data_ptr, strides being non-negative). The common case, no overlap at all, is one pass holding the
// list as given, found in O(n log n); the overlapping case costs O(n^2) comparisons.
inline std::vector<std::vector<at::Tensor>> disjoint_passes(const std::vector<at::Tensor>& dense) {
  const size_t n = dense.size();
  std::vector<uintptr_t> begin(n), end(n);
  for (size_t i = 0; i < n; ++i) {
    begin[i] = reinterpret_cast<uintptr_t>(dense[i].data_ptr());
    end[i] = begin[i] + static_cast<uintptr_t>(dense[i].numel()) * dense[i].element_size();
  }
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return begin[a] < begin[b]; });
  bool overlap = false;
  uintptr_t reach = 0;
  for (size_t i : order) {
    if (begin[i] == end[i]) continue;  // empty: nothing to write
    if (begin[i] < reach) {
      overlap = true;
      break;
    }
    reach = std::max(reach, end[i]);
  }
  if (!overlap) return {dense};
  std::vector<size_t> pass(n, 0);
  size_t npass = 1;
  for (size_t i = 0; i < n; ++i) {
    if (begin[i] == end[i]) continue;
    for (size_t j = 0; j < i; ++j)
      if (begin[j] < end[i] && begin[i] < end[j]) pass[i] = std::max(pass[i], pass[j] + 1);
    npass = std::max(npass, pass[i] + 1);
  }
  std::vector<std::vector<at::Tensor>> out(npass);
  for (size_t i = 0; i < n; ++i) out[pass[i]].push_back(dense[i]);
  return out;
}

}  // namespace torchfast
