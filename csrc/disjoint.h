// Which tensors of a list share memory, for the batched in-place ops: clipping's scale (CPU and CUDA
// C++ here), and, through torch.ops.torchfast.overlap_levels, init's fills and the Triton clip
// (torchfast/_overlap.py). A pass writes its tensors concurrently (threads, or the blocks of one
// launch), so a tensor listed twice, or two views of one buffer, in one pass would lose or mix updates;
// stock writes them one after another. Host code only (CPU kernels, CUDA launches, the CUDA emulator).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace torchfast {

// The bytes [begin, end) a tensor can touch: exact for dense tensors, a superset for other strided
// ones (strides are never negative); empty for empty tensors and tensors without data (meta).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0 || t.is_meta() || !t.has_storage() || t.data_ptr() == nullptr) return {0, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>(last + 1) * t.element_size()};
}

// Per tensor, its pass: one after the last pass of any earlier tensor whose bytes overlap its own, so
// overlapping tensors are written one pass after another, in list order, and the others stay
// together. The common case, no overlap at all (every level 0), is found in O(n log n); the
// overlapping case costs O(n^2) comparisons.
inline std::vector<int64_t> overlap_levels(at::TensorList tensors) {
  const size_t n = tensors.size();
  std::vector<std::pair<uintptr_t, uintptr_t>> span(n);
  for (size_t i = 0; i < n; ++i) span[i] = byte_span(tensors[i]);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return span[a].first < span[b].first; });
  std::vector<int64_t> level(n, 0);
  bool overlap = false;
  uintptr_t reach = 0;
  for (size_t i : order) {
    if (span[i].first == span[i].second) continue;  // empty: nothing to write
    if (span[i].first < reach) {
      overlap = true;
      break;
    }
    reach = std::max(reach, span[i].second);
  }
  if (!overlap) return level;
  for (size_t i = 0; i < n; ++i) {
    if (span[i].first == span[i].second) continue;
    for (size_t j = 0; j < i; ++j)
      if (span[j].first < span[i].second && span[i].first < span[j].second) level[i] = std::max(level[i], level[j] + 1);
  }
  return level;
}

// A list of tensors split by overlap_levels into its passes, in order (one pass, the list as given, without
// overlap).
inline std::vector<std::vector<at::Tensor>> disjoint_passes(const std::vector<at::Tensor>& tensors) {
  const std::vector<int64_t> level = overlap_levels(tensors);
  const int64_t npass = 1 + (level.empty() ? 0 : *std::max_element(level.begin(), level.end()));
  if (npass == 1) return {tensors};
  std::vector<std::vector<at::Tensor>> out(npass);
  for (size_t i = 0; i < tensors.size(); ++i) out[level[i]].push_back(tensors[i]);
  return out;
}

}  // namespace torchfast
