"""Which tensors of a list share memory. The batched in-place ops write a list's tensors at once (CPU
threads, the blocks of one GPU launch), so a tensor listed twice, or two views of one buffer, would
lose or mix updates; split into passes that share nothing, run one after another, each element ends as
if the list had been written in order. csrc/disjoint.h is the C++ twin (the clipping ops)."""


def _span(t):
    """[first byte, one past the last byte) that t can touch: exact for dense tensors, a superset for
    other strided ones (strides are never negative); empty for empty tensors."""
    n = t.numel()
    if n == 0:
        return (0, 0)
    begin = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (begin, begin + (last + 1) * t.element_size())


def disjoint_passes(tensors):
    """Indices of `tensors` in passes whose tensors share no memory: tensor i goes one pass after the
    last pass of any earlier tensor it overlaps, so overlapping tensors keep their list order and the
    rest stay together. Without any overlap (the rule) one pass, in list order, found in O(n log n)."""
    spans = [_span(t) for t in tensors]
    reach = 0
    for b, e in sorted(s for s in spans if s[0] != s[1]):
        if b < reach:
            break
        reach = max(reach, e)
    else:
        return [list(range(len(tensors)))]
    level = []
    for i, (b, e) in enumerate(spans):
        lv = 0
        if b != e:
            for j in range(i):
                bj, ej = spans[j]
                if bj != ej and bj < e and b < ej:
                    lv = max(lv, level[j] + 1)
        level.append(lv)
    passes = [[] for _ in range(max(level) + 1)]
    for i, lv in enumerate(level):
        passes[lv].append(i)
    return passes
