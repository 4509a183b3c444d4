"""Fused BatchNorm + ReLU in Triton, registered with torch.library.triton_op so torch.compile traces
it (and its autograd formula) without graph breaks.

Passes over memory (T = tensor bytes): training forward = statistics (read x) + normalise+ReLU (read x,
write y) = 3T; eval forward 2T; backward = reduction (read x, dy) + elementwise (read x, dy, write dx)
= 5T, the ReLU mask recomputed from x with the forward's own formula x * scale + shift.

The statistics are a split reduction: a (C, SPLITS) grid, each program reducing a strided share of
one channel's N*S elements (shifted by the channel's first element, float32), partials folded per
channel in float64 in a fixed order. SPLITS grows with N*S so that few channels with large images
(ResNet's 64x112x112 at batch 256: 3.2M elements per channel) still fill an H100/H200's 132 SMs.
Layouts: contiguous (N, C, S) and channels_last (N, S, C) by index arithmetic; other strides are
made contiguous first.

Block shapes (for Hopper): reductions take 1024 elements per step with 8 warps (4 fp32 per thread,
one 16-byte load); the elementwise passes are autotuned over 1024-4096 elements and 4-8 warps, the
range where H100 bandwidth-bound kernels saturate HBM3. Channels_last reductions are strided and
are the first thing to tune on a GPU (issue 4 / 5 GPU runs).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast._ops import _register_bn_relu
from torchfast.triton import INTERPRET, configs

RED_BLOCK = 128 if INTERPRET else 1024
MAX_SPLITS = 1024

_EW_CONFIGS = configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)],
    triton.Config({"BLOCK": 256}, num_warps=4))


@triton.jit
def _offsets(j, c, C, S, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return j * C + c
    n = j // S
    return (n * C + c) * S + (j - n * S)


@triton.jit
def _channel(i, C, S, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return i % C
    return (i // S) % C


@triton.jit
def _stats_partial_kernel(x_ptr, ws_ptr, C, S, M, SPLITS, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    K = tl.load(x_ptr + _offsets(0, c, C, S, CHANNELS_LAST)).to(tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(split * BLOCK, M, SPLITS * BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < M
        x = tl.load(x_ptr + _offsets(j, c, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - K, 0.0)
        a1 += d
        a2 += d * d
    tl.store(ws_ptr + (c * SPLITS + split) * 2, tl.sum(a1, axis=0))
    tl.store(ws_ptr + (c * SPLITS + split) * 2 + 1, tl.sum(a2, axis=0))


@triton.autotune(configs=_EW_CONFIGS, key=["numel", "C"])
@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, numel, C, S, CHANNELS_LAST: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    c = _channel(offs, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + c, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + c, mask=mask, other=0.0)
    v = x * sc + sh
    y = tl.where(v < 0.0, 0.0, v)  # NaN propagates, as in torch.relu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial_kernel(x_ptr, dy_ptr, scale_ptr, shift_ptr, mean_ptr, ws_ptr, C, S, M, SPLITS,
                             CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    sc = tl.load(scale_ptr + c)
    sh = tl.load(shift_ptr + c)
    mu = tl.load(mean_ptr + c)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(split * BLOCK, M, SPLITS * BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        mask = j < M
        off = _offsets(j, c, C, S, CHANNELS_LAST)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gm = tl.where(mask & (x * sc + sh > 0.0), g, 0.0)
        a1 += gm
        a2 += gm * (x - mu)
    tl.store(ws_ptr + (c * SPLITS + split) * 2, tl.sum(a1, axis=0))
    tl.store(ws_ptr + (c * SPLITS + split) * 2 + 1, tl.sum(a2, axis=0))


@triton.autotune(configs=_EW_CONFIGS, key=["numel", "C"])
@triton.jit
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, k0_ptr, k1_ptr, k2_ptr, numel, C, S,
                     CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    c = _channel(offs, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + c, mask=mask, other=0.0)
    sh = tl.load(shift_ptr + c, mask=mask, other=0.0)
    gm = tl.where(x * sc + sh > 0.0, g, 0.0)
    k0 = tl.load(k0_ptr + c, mask=mask, other=0.0)
    k1 = tl.load(k1_ptr + c, mask=mask, other=0.0)
    k2 = tl.load(k2_ptr + c, mask=mask, other=0.0)
    mu = tl.load(mean_ptr + c, mask=mask, other=0.0)
    dx = gm * k0 - k1 - (x - mu) * k2
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------

def _native(x):
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _geometry(x):
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    return n, c, s, not x.is_contiguous()


def _splits(m):
    return max(1, min(MAX_SPLITS, triton.cdiv(m, RED_BLOCK * 8)))


def _scale_shift(mean, invstd, weight, bias):
    scale = invstd * weight.float() if weight is not None else invstd.clone()
    shift = -mean * scale
    if bias is not None:
        shift = bias.float() + shift
    return scale.contiguous(), shift.contiguous()


def _ew_grid(numel):
    return lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)


@triton_op("torchfast::bn_relu_fwd_triton", mutates_args=())
def bn_relu_fwd_triton(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    native = _native(input)
    x = input if native else input.contiguous()
    out = torch.empty_like(input)
    y = out if native else torch.empty_like(x)
    n, c, s, cl = _geometry(x)
    m = n * s
    if training:
        if x.numel() == 0:
            mean = torch.full((c,), float("nan"), device=x.device)
            var = mean.clone()
        else:
            splits = _splits(m)
            ws = torch.empty(c * splits * 2, dtype=torch.float32, device=x.device)
            wrap_triton(_stats_partial_kernel)[(c, splits)](x, ws, c, s, m, splits, CHANNELS_LAST=cl,
                                                            BLOCK=RED_BLOCK, num_warps=8)
            sums = ws.view(c, splits, 2).double().sum(dim=1)
            # The shift the partial sums were taken about: each channel's first element.
            K = x[(0, slice(None)) + (0,) * (x.dim() - 2)].double()
            m1 = sums[:, 0] / m
            var = (sums[:, 1] / m - m1 * m1).clamp_min(0.0).float()
            mean = (K + m1).float()
    else:
        mean = running_mean.float().clone()
        var = running_var.float().clone()
    invstd = torch.rsqrt(var + eps)
    if x.numel() > 0:
        scale, shift = _scale_shift(mean, invstd, weight, bias)
        wrap_triton(_forward_kernel)[_ew_grid(x.numel())](x, y, scale, shift, x.numel(), c, s, CHANNELS_LAST=cl)
    if not native:
        out.copy_(y)
    return out, mean, invstd, var


@triton_op("torchfast::bn_relu_bwd_triton", mutates_args=())
def bn_relu_bwd_triton(grad_out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                       training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    native = _native(input) and grad_out.stride() == input.stride()
    x = input if native else input.contiguous()
    dy = grad_out if native else grad_out.contiguous()
    grad_in = torch.empty_like(input)
    dx = grad_in if native else torch.empty_like(x)
    n, c, s, cl = _geometry(x)
    m = n * s
    mean = mean.float().contiguous()
    invstd = invstd.float().contiguous()
    scale, shift = _scale_shift(mean, invstd, weight, bias)
    if x.numel() > 0:
        splits = _splits(m)
        ws = torch.empty(c * splits * 2, dtype=torch.float32, device=x.device)
        wrap_triton(_backward_partial_kernel)[(c, splits)](x, dy, scale, shift, mean, ws, c, s, m, splits,
                                                           CHANNELS_LAST=cl, BLOCK=RED_BLOCK, num_warps=8)
        sums = ws.view(c, splits, 2).double().sum(dim=1)
    else:
        sums = torch.zeros(c, 2, dtype=torch.float64, device=x.device)
    sum_dy, sum_dy_xmu = sums[:, 0], sums[:, 1]
    inv = invstd.double()
    w = weight.double() if weight is not None else torch.ones_like(inv)
    grad_w = (sum_dy_xmu * inv).float()
    grad_b = sum_dy.float()
    k0 = (w * inv).float().contiguous()
    if training and m > 0:
        k1 = (w * inv * sum_dy / m).float().contiguous()
        k2 = (w * inv * inv * inv * sum_dy_xmu / m).float().contiguous()
    else:
        k1 = torch.zeros_like(k0)
        k2 = torch.zeros_like(k0)
    if x.numel() > 0:
        wrap_triton(_backward_kernel)[_ew_grid(x.numel())](x, dy, dx, scale, shift, mean, k0, k1, k2, x.numel(), c, s,
                                                           CHANNELS_LAST=cl)
    if not native:
        grad_in.copy_(dx)
    return grad_in, grad_w, grad_b


# ------------------------------------------------------------------------------------------------
# Registration: triton_op derives the fake kernels itself; autograd as for the compiled ops.

_register_bn_relu("torchfast::bn_relu_fwd_triton", "torchfast::bn_relu_bwd_triton", bn_relu_bwd_triton, fake=False)
bn_relu_fwd = bn_relu_fwd_triton
