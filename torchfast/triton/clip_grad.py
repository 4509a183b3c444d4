"""Multi-tensor norm and clip in Triton, for one (device, dtype) group of gradients.

A chunk table (tensor address, element count, first element) lets one launch cover every tensor of
the group: the norm kernel writes one partial per chunk (1 read of every gradient), a one-program
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

from torchfast.reference.clip_grad import acc_dtype
from torchfast.triton import INTERPRET, chunk_table, tl_dtype, upload

CHUNK = 1 << 16
KIND_ONE, KIND_TWO, KIND_INF, KIND_P = 0, 1, 2, 3


@triton.jit
def _norm_chunks_kernel(addr_ptr, numel_ptr, start_ptr, partial_ptr, p, KIND: tl.constexpr,
                        IN_DTYPE: tl.constexpr, CHUNK_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    x_ptr = tl.load(addr_ptr + pid).to(tl.pointer_type(IN_DTYPE), bitcast=True)
    n = tl.load(numel_ptr + pid)
    start = tl.load(start_ptr + pid)
    end = tl.minimum(n, start + CHUNK_ELEMS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK).to(tl.int64)
        a = tl.abs(tl.load(x_ptr + offs, mask=offs < end, other=0.0).to(tl.float32))
        if KIND == 0:
            acc += a
        elif KIND == 1:
            acc += a * a
        elif KIND == 2:
            nan = nan | (a != a).to(tl.int32)
            acc = tl.maximum(acc, a)
        else:
            acc += tl.where(a > 0, tl.exp2(p * tl.log2(tl.maximum(a, 1e-30))), 0.0)
    if KIND == 2:
        total = tl.max(acc, axis=0)
        total = tl.where(tl.max(nan, axis=0) > 0, float("nan"), total)
    else:
        total = tl.sum(acc, axis=0)
    tl.store(partial_ptr + pid, total)


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
def _clip_chunks_kernel(addr_ptr, numel_ptr, start_ptr, total_ptr, max_norm, IN_DTYPE: tl.constexpr,
                        CHUNK_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    coef = max_norm / (tl.load(total_ptr).to(tl.float32) + 1e-6)
    if not (coef >= 1.0):  # clamp(coef, max=1) == 1 leaves the gradients as they are; NaN scales
        pid = tl.program_id(0).to(tl.int64)
        x_ptr = tl.load(addr_ptr + pid).to(tl.pointer_type(IN_DTYPE), bitcast=True)
        n = tl.load(numel_ptr + pid)
        start = tl.load(start_ptr + pid)
        end = tl.minimum(n, start + CHUNK_ELEMS)
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK).to(tl.int64)
            mask = offs < end
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * coef).to(IN_DTYPE), mask=mask)


def _kind(norm_type):
    return (KIND_INF if math.isinf(norm_type) else KIND_ONE if norm_type == 1.0
            else KIND_TWO if norm_type == 2.0 else KIND_P)


def _block():
    return 128 if INTERPRET else 2048


def _norm_launch(tensors, norm_type: float) -> torch.Tensor:
    if math.isinf(norm_type) and any(t.numel() == 0 for t in tensors):
        raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor because the "
                           "operation does not have an identity")
    dtype, device = tensors[0].dtype, tensors[0].device
    dense = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    table, _ = chunk_table(dense, CHUNK)
    nchunks = table.shape[1]
    out = torch.zeros((), dtype=torch.float32, device=device)
    if nchunks == 0:
        return out.to(acc_dtype(dtype))
    partial = torch.empty(nchunks, dtype=torch.float32, device=device)
    table = upload(table, device)
    kind = _kind(norm_type)
    p = float(norm_type) if kind == KIND_P else 1.0
    _norm_chunks_kernel[(nchunks,)](table[0], table[1], table[2], partial, p, KIND=kind, IN_DTYPE=tl_dtype(dtype), CHUNK_ELEMS=CHUNK,
                                      BLOCK=_block(), num_warps=8)
    _norm_finish_kernel[(1,)](partial, nchunks, out, p, KIND=kind, BLOCK=_block(), num_warps=8)
    return out


def _clip_launch(tensors, total_norm: torch.Tensor, max_norm: float) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    dense = [t for t in tensors if t.is_contiguous()]
    strided = [t for t in tensors if not t.is_contiguous()]
    total = total_norm.reshape(()).to(device=device, dtype=torch.float32)
    table, _ = chunk_table(dense, CHUNK)
    if table.shape[1] > 0:
        table = upload(table, device)
        _clip_chunks_kernel[(table.shape[1],)](table[0], table[1], table[2], total, float(max_norm), IN_DTYPE=tl_dtype(dtype),
                                          CHUNK_ELEMS=CHUNK, BLOCK=_block(), num_warps=8)
    if strided:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for t in strided:
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
