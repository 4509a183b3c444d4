"""Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, which is how CI tests
them). One file per op: bn_relu.py, clip_grad.py, init.py. Importing this package imports triton;
torchfast does so only when the triton backend is first used.
"""
import collections
import contextlib
import os

import torch

from torchfast._overlap import disjoint_passes

# Under the interpreter (TRITON_INTERPRET=1, read by triton at import) kernels run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = None  # filled lazily: torch dtype -> tl dtype


def tl_dtype(dtype: torch.dtype):
    global TL_DTYPES
    if TL_DTYPES is None:
        import triton.language as tl
        TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                     torch.float64: tl.float64}
    return TL_DTYPES[dtype]


def configs(gpu_configs, interpret_config):
    """Autotune configurations: the GPU list, or one small configuration under the interpreter
    (where every configuration would be run in Python). TORCHFAST_TRITON_AUTOTUNE=0 keeps only the
    first GPU configuration (the GPU check's test phase uses it to save compile time)."""
    if INTERPRET:
        return [interpret_config]
    if os.environ.get("TORCHFAST_TRITON_AUTOTUNE", "1") == "0":
        return gpu_configs[:1]
    return gpu_configs


def upload(t: torch.Tensor, device):
    """A host-built table moved to `device` without making the host wait (pinned memory, non-blocking
    copy). Under the interpreter the table stays on the CPU."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def chunk_table(tensors, chunk: int, per_tensor=()):
    """The chunk table of a tensor list, built with tensor ops (no Python loop over chunks): an int64
    [3 + len(per_tensor), chunks] table whose rows are each chunk's tensor address, the tensor's
    element count, the chunk's first element, then the chunk's tensor's entry of each per_tensor
    column. Also returns the chunk -> tensor index. Empty tensors have no chunk."""
    ns = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    counts = (ns + chunk - 1) // chunk
    idx = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(idx.numel()) - first[idx]) * chunk
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    rows = [ptrs[idx], ns[idx], start] + [torch.as_tensor(col, dtype=torch.int64)[idx] for col in per_tensor]
    return torch.stack(rows), idx


def device_guard(device):
    """Launch on `device`'s GPU: Triton launches on the current CUDA device, so tensors on another GPU
    (cuda:1 while cuda:0 is current) would be handed to a kernel on the wrong device."""
    device = torch.device(device)
    # Under torch.compile the generated code sets the device itself.
    if device.type == "cuda" and device.index is not None and not torch.compiler.is_compiling() \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_TABLES = collections.OrderedDict()
_TABLES_KEPT = 32  # a clip keeps two per (dtype, alignment) group: the norm's table and the clip's


def _cached(key, build):
    """_TABLES[key], made by build() on a miss; the last _TABLES_KEPT entries are kept."""
    value = _TABLES.get(key)
    if value is not None:
        _TABLES.move_to_end(key)
        return value
    value = _TABLES[key] = build()
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return value


def _uploaded_table(tensors, chunk: int, device, base):
    """chunk_table(tensors, chunk)[0] on `device`, row 0 as element offsets from `base` when given."""
    table = chunk_table(tensors, chunk)[0]
    if base is not None:
        table[0] = (table[0] - base.data_ptr()) // base.element_size()
    return upload(table, device)


def device_chunk_table(tensors, chunk: int, device, base=None):
    """chunk_table(tensors, chunk)[0] on `device`, cached by (device, chunk, base, every tensor's address
    and element count): the table is a function of exactly these, so a hit is always the right table.
    With `base` (a tensor), row 0 holds each chunk's tensor's offset from base's address in elements
    instead of its address (kernels then address base_ptr + offset, a pointer whose alignment Triton
    knows). A training loop's gradients usually keep their addresses from step to step (the caching
    allocator hands the same blocks back), and then nothing is built or uploaded: no host work beyond
    the key, and nothing that would stop a CUDA graph capture. The last _TABLES_KEPT tables are kept."""
    key = (str(device), chunk, None if base is None else (base.data_ptr(), base.element_size()),
           tuple((t.data_ptr(), t.numel()) for t in tensors))
    return _cached(key, lambda: _uploaded_table(tensors, chunk, device, base))


def device_chunk_tables_disjoint(tensors, chunk: int, device):
    """For an in-place launch: [(chunk table, index of its base tensor)], one per pass of
    torchfast._overlap.disjoint_passes(tensors) (almost always one: the blocks of one launch write at
    once, so tensors sharing memory go to separate launches), each table's row 0 as offsets from its base tensor
    (see device_chunk_table); cached, like device_chunk_table, by the tensors' addresses and sizes, so
    the overlap check runs when the gradients move, not every step."""
    key = ("disjoint", str(device), chunk, tuple((t.data_ptr(), t.numel(), t.element_size()) for t in tensors))

    def build():
        groups = [(part[0], [tensors[i] for i in part]) for part in disjoint_passes(tensors)]
        return [(_uploaded_table(group, chunk, device, group[0]), first) for first, group in groups]

    return _cached(key, build)
