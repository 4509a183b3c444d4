"""Multi-tensor norm and clip in Triton, for one (device, dtype) group of gradients.

A chunk table (tensor address, element count, first element) lets one launch cover every tensor of
the group (built once and cached by the tensors' addresses and sizes; 16-byte aligned tensors get a
launch whose whole-block loads and stores are declared aligned, so they compile to 16-byte vectors): the norm kernel writes one partial per chunk (1 read of every gradient), a one-program
kernel folds the partials in chunk order (deterministic, no atomics) into the total norm; the clip
kernel reads the total norm from device memory, computes min(max_norm / (total + 1e-6), 1) and
returns at once when it is 1, else scales its chunk (1 read + 1 write). Nothing is read by the host.

Block shape: 2048 elements per step, 8 warps: 8 elements (two 16-byte fp32 vectors) per thread per
step, the usual sweet spot for a bandwidth-bound kernel on H100/H200; CHUNK = 64K elements per
program keeps a GPT-2-sized list (124M elements) at ~1900 programs, several waves over 132 SMs.
"""
import math
from typing import List

import torch
import triton
import triton.language as tl

from torchfast.reference.clip_grad import acc_dtype, check_writable
from torchfast.triton import INTERPRET, device_chunk_table, device_chunk_tables_disjoint, device_guard

CHUNK = 1 << 16
KIND_ONE, KIND_TWO, KIND_INF, KIND_P = 0, 1, 2, 3


@triton.jit
def _chunk_span(base_ptr, offset_ptr, numel_ptr, start_ptr, CHUNK_ELEMS: tl.constexpr, BLOCK: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """This program's chunk: its tensor's pointer (base_ptr plus the tensor's element offset from it, so
    that the pointer keeps the base argument's known alignment, which a pointer loaded from memory would
    not have), the chunk's first element, the end of its whole blocks and its end. ALIGNED (every tensor
    of the launch 16-byte aligned): the offset is declared a multiple of VEC elements (16 bytes) and the
    start a multiple of BLOCK, so the unmasked whole-block loads and stores compile to 16-byte vectors."""
    pid = tl.program_id(0).to(tl.int64)
    offset = tl.load(offset_ptr + pid)
    start = tl.load(start_ptr + pid)
    if ALIGNED:
        offset = tl.multiple_of(offset, VEC)
        start = tl.multiple_of(start, BLOCK)
    end = tl.minimum(tl.load(numel_ptr + pid), start + CHUNK_ELEMS)
    full_end = start + (end - start) // BLOCK * BLOCK
    return base_ptr + offset, start, full_end, end


@triton.jit
def _norm_acc(a, acc, nan, p, KIND: tl.constexpr):
    if KIND == 0:
        acc += a
    elif KIND == 1:
        acc += a * a
    elif KIND == 2:
        nan = nan | (a != a).to(tl.int32)
        acc = tl.maximum(acc, a)
    else:
        acc += tl.where(a > 0, tl.exp2(p * tl.log2(tl.maximum(a, 1e-30))), 0.0)
    return acc, nan


@triton.jit
def _norm_chunks_kernel(base_ptr, offset_ptr, numel_ptr, start_ptr, partial_ptr, p, KIND: tl.constexpr,
                        CHUNK_ELEMS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    x_ptr, start, full_end, end = _chunk_span(base_ptr, offset_ptr, numel_ptr, start_ptr, CHUNK_ELEMS, BLOCK, ALIGNED,
                                              VEC)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, full_end, BLOCK):  # whole blocks: no mask
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        acc, nan = _norm_acc(tl.abs(tl.load(x_ptr + offs).to(tl.float32)), acc, nan, p, KIND)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK).to(tl.int64)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32))
        acc, nan = _norm_acc(a, acc, nan, p, KIND)
    if KIND == 2:
        total = tl.max(acc, axis=0)
        total = tl.where(tl.max(nan, axis=0) > 0, float("nan"), total)
    else:
        total = tl.sum(acc, axis=0)
    tl.store(partial_ptr + tl.program_id(0), total)


@triton.jit
def _norm_finish_kernel(partial_ptr, n, out_ptr, p, KIND: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        v = tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
        if KIND == 2:
            nan = nan | (v != v).to(tl.int32)
            acc = tl.maximum(acc, v)
        else:
            acc += v
    if KIND == 2:
        total = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(acc, axis=0))
    elif KIND == 1:
        total = tl.sqrt(tl.sum(acc, axis=0))
    elif KIND == 3:
        total = tl.exp2(tl.log2(tl.sum(acc, axis=0)) / p)
    else:
        total = tl.sum(acc, axis=0)
    tl.store(out_ptr, total)


@triton.jit
def _clip_chunks_kernel(base_ptr, offset_ptr, numel_ptr, start_ptr, total_ptr, max_norm, CHUNK_ELEMS: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    coef = max_norm / (tl.load(total_ptr).to(tl.float32) + 1e-6)
    if not (coef >= 1.0):  # clamp(coef, max=1) == 1 leaves the gradients as they are; NaN scales
        x_ptr, start, full_end, end = _chunk_span(base_ptr, offset_ptr, numel_ptr, start_ptr, CHUNK_ELEMS, BLOCK,
                                                  ALIGNED, VEC)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK).to(tl.int64)
            tl.store(x_ptr + offs, (tl.load(x_ptr + offs).to(tl.float32) * coef).to(x_ptr.dtype.element_ty))
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < end
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * coef).to(x_ptr.dtype.element_ty), mask=mask)


def _kind(norm_type):
    return (KIND_INF if math.isinf(norm_type) else KIND_ONE if norm_type == 1.0
            else KIND_TWO if norm_type == 2.0 else KIND_P)


def _block():
    return 128 if INTERPRET else 2048


def _tables(tensors, device, disjoint=False):
    """[(uploaded chunk table, base tensor, all 16-byte aligned)] for contiguous `tensors` whose
    addresses are multiples of their element size (all tensors in practice; see _addressable): one
    launch per table, the aligned tensors apart from the rest (almost always all of them). Row 0 holds
    each chunk's tensor's element offset from the base tensor, the kernels' base_ptr argument. Cached
    by the tensors' addresses and sizes (device_chunk_table), so the next step's call on the same
    gradients builds and uploads nothing. With `disjoint` (the in-place clip) tensors that share memory
    go to separate tables (device_chunk_tables_disjoint, its own cache entries: the norm's table and
    the clip's are built once each)."""
    out = []
    aligned = [t for t in tensors if t.data_ptr() % 16 == 0]
    groups = ((aligned, True), ([t for t in tensors if t.data_ptr() % 16 != 0], False)) \
        if len(aligned) < len(tensors) else ((aligned, True),)
    for group, flag in groups:
        if not any(t.numel() for t in group):
            continue
        if disjoint:
            out += [(table, group[first], flag) for table, first in device_chunk_tables_disjoint(group, CHUNK, device)]
        else:
            out.append((device_chunk_table(group, CHUNK, device, base=group[0]), group[0], flag))
    return out


def _addressable(t) -> bool:
    """A tensor the chunk kernels can address as base + element offset (its address a multiple of its
    element size: any tensor PyTorch allocated; a from_blob pointer might not be)."""
    return t.data_ptr() % t.element_size() == 0


def _vec(dtype) -> int:
    return 16 // dtype.itemsize


def _norm_launch(tensors, norm_type: float) -> torch.Tensor:
    if math.isinf(norm_type) and any(t.numel() == 0 for t in tensors):
        raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor because the "
                           "operation does not have an identity")
    dtype, device = tensors[0].dtype, tensors[0].device
    dense = [t if t.is_contiguous() and _addressable(t) else t.clone(memory_format=torch.contiguous_format)
             for t in tensors]
    out = torch.zeros((), dtype=torch.float32, device=device)
    tables = _tables(dense, device)
    nchunks = sum(table.shape[1] for table, _, _ in tables)
    if nchunks == 0:
        return out.to(acc_dtype(dtype))
    partial = torch.empty(nchunks, dtype=torch.float32, device=device)
    kind = _kind(norm_type)
    p = float(norm_type) if kind == KIND_P else 1.0
    with device_guard(device):
        first = 0
        for table, base, aligned in tables:
            n = table.shape[1]
            _norm_chunks_kernel[(n,)](base, table[0], table[1], table[2], partial[first:], p, KIND=kind,
                                      CHUNK_ELEMS=CHUNK, BLOCK=_block(), ALIGNED=aligned, VEC=_vec(dtype), num_warps=8)
            first += n
        _norm_finish_kernel[(1,)](partial, nchunks, out, p, KIND=kind, BLOCK=_block(), num_warps=8)
    return out


def _clip_launch(tensors, total_norm: torch.Tensor, max_norm: float) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    dense = [t for t in tensors if t.is_contiguous() and _addressable(t)]
    other = [t for t in tensors if not (t.is_contiguous() and _addressable(t))]
    check_writable(other)
    total = total_norm.reshape(()).to(device=device, dtype=torch.float32)
    with device_guard(device):
        for table, base, aligned in _tables(dense, device, disjoint=True):  # one launch after another
            _clip_chunks_kernel[(table.shape[1],)](base, table[0], table[1], table[2], total, float(max_norm),
                                                   CHUNK_ELEMS=CHUNK, BLOCK=_block(), ALIGNED=aligned,
                                                   VEC=_vec(dtype), num_warps=8)
    if other:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for t in other:
            t.mul_(coef)


# ------------------------------------------------------------------------------------------------
# Registration: opaque custom ops (the launch helpers read data pointers to build the chunk table,
# which torch.compile cannot trace), with fake kernels so compiled graphs keep them without breaks.

@torch.library.custom_op("torchfast::multi_tensor_norm_triton", mutates_args=())
def multi_tensor_norm(tensors: List[torch.Tensor], norm_type: float) -> torch.Tensor:
    return _norm_launch(tensors, norm_type)


@multi_tensor_norm.register_fake
def _(tensors, norm_type):
    return tensors[0].new_empty((), dtype=torch.float32)


@torch.library.custom_op("torchfast::multi_tensor_clip_triton_", mutates_args=("tensors",))
def multi_tensor_clip_(tensors: List[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    _clip_launch(tensors, total_norm, max_norm)


@multi_tensor_clip_.register_fake
def _(tensors, total_norm, max_norm):
    return None
