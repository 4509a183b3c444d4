"""Which tensors of a list share memory. The batched in-place ops write a list's tensors at once (CPU
threads, the blocks of one GPU launch), so a tensor listed twice, or two views of one buffer, would
lose or mix updates; split into passes that share nothing, run one after another, each element ends as
if the list had been written in order. The compiled torch.ops.torchfast.overlap_levels (csrc/disjoint.h,
which the C++ clipping ops call directly) does it in a few microseconds; _levels is the same rule in
Python for builds without the extension (~3 us per tensor)."""
import torch

from torchfast import _ext


def _span(t):
    """[first byte, one past the last byte) that t can touch: exact for dense tensors, a superset for
    other strided ones (strides are never negative); empty for empty tensors and tensors without data
    (meta, or storage resized to nothing), as in csrc/disjoint.h."""
    if t.numel() == 0 or t.is_meta:
        return (0, 0)
    begin = t.data_ptr()
    if begin == 0:
        return (0, 0)
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (begin, begin + (last + 1) * t.element_size())


def _levels(tensors):
    """overlap_levels in Python: per tensor, one pass after the last pass of any earlier tensor it
    overlaps (all 0 without overlap, found in O(n log n))."""
    spans = [_span(t) for t in tensors]
    level = [0] * len(tensors)
    reach = 0
    for b, e in sorted(s for s in spans if s[0] != s[1]):
        if b < reach:
            break
        reach = max(reach, e)
    else:
        return level
    for i, (b, e) in enumerate(spans):
        if b != e:
            for j in range(i):
                bj, ej = spans[j]
                if bj != ej and bj < e and b < ej:
                    level[i] = max(level[i], level[j] + 1)
    return level


def disjoint_passes(tensors):
    """Indices of `tensors` in passes whose tensors share no memory, in order: overlapping tensors keep
    their list order, the rest stay together. Without any overlap (the rule) one pass, in list order."""
    tensors = list(tensors)
    if len(tensors) < 2:  # nothing to share memory with (init's single-tensor calls)
        return [list(range(len(tensors)))]
    if _ext._C is not None:
        level = torch.ops.torchfast.overlap_levels(tensors)
    else:
        level = _levels(tensors)
    if not any(level):
        return [list(range(len(tensors)))]
    passes = [[] for _ in range(max(level) + 1)]
    for i, lv in enumerate(level):
        passes[lv].append(i)
    return passes
