"""Fused BatchNorm + ReLU and BatchNorm + residual add + ReLU in Triton, registered with
torch.library.triton_op so torch.compile traces them (and their autograd formulas) without graph breaks.
One set of kernels serves both ops; constexpr flags select the add variant (HAS_RESIDUAL in the forward
elementwise pass, MASK_FROM_OUT in the backward reduction and elementwise passes).

Passes over memory (T = tensor bytes):
  bn_relu     training forward = statistics (read x) + normalise+ReLU (read x, write y) = 3T; eval
              forward 2T; backward = reduction (read x, dy) + elementwise (read x, dy, write dx) = 5T,
              the ReLU mask recomputed from x with the forward's own expression (_pre_relu),
              compared with RELU_ZERO_MAX (below) so that it is the forward's rounded output > 0.
  bn_add_relu training forward = statistics (read x) + normalise+add+ReLU (read x, residual, write y)
              = 4T (3 reads + 1 write); eval forward 3T; backward = reduction (read dy, out, x; write
              gm = dy * (out > 0), which is grad_residual) + elementwise (read gm, x; write dx) = 7T
              (5 reads + 2 writes) in training, 6T in eval (the elementwise pass does not read x).
              The ReLU mask is read from the saved output, so it is the forward's exactly.

Normalisation: fma(x - mean, scale, beta) with scale = weight * invstd and beta = bias (0 without
one), per channel in float32 (_pre_relu), not x * scale + (bias - mean * scale): when |mean| >> std
(late ResNet/DenseNet layers) that folded shift cancels catastrophically against x * scale. The fma
is explicit (tl.fma) so that the forward and bn_relu's recomputed backward mask round identically
whatever the compiler contracts.

Every kernel works on 2-D tiles [rows, columns] of the tensor seen as a matrix, so no kernel divides
an element index to find its channel (64-bit division per element would make the passes compute-
bound on Hopper):
  contiguous (N, C, S): rows are the N*C (n, c) rows of S elements, a row's channel is row % C (one
    division per row); channels_last (N, S, C) and contiguous (N, C): rows are the N*S positions,
    the columns are the channels.
Reductions are split: program (channel or channel block, split) reduces a strided share of tiles and
writes one partial pair; a finish kernel folds each channel's partials in float64 in a fixed order
and computes every per-channel constant in the same launch (no chain of small torch ops). The
channels_last reduction reads [rows, channel block] tiles, so its loads are coalesced along C.

Block shapes (for Hopper, 132 SMs, HBM3): reduction tiles of 2048 elements (8 per thread at 8 warps:
2 16-byte fp32 loads or 1 bf16 one per tensor in flight per thread, at most 80 registers). The column block is the next power of two
of S or C, from 16 to 1024: 7x7 maps waste 23 % of the lanes, not 95 %, and there are few distinct
shapes to JIT-compile. Splits grow until every channel (block) has about 8 tiles per program, up to
1024, so that 64 channels of 112x112 at batch 256 still give thousands of programs. The elementwise
passes are autotuned over 1024-4096 elements and 4-8 warps, the range where bandwidth-bound kernels
saturate HBM3.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torchfast._ops import _register_bn_add_relu, _register_bn_relu
from torchfast.triton import INTERPRET, configs, device_guard

RED_TILE = 256 if INTERPRET else 2048  # elements per reduction tile
# Warps per reduction program: 8 elements of the 2048-element tile per thread. At 4 warps (16 per
# thread) the backward with the mask from the output (3 loads and a store per element) took 149-163
# registers, 12 resident warps per SM; at 8 warps every reduction takes 40-80 (ptxas for sm_90, via
# cuobjdump in tests/test_triton_compile.py), twice the warps resident for the same loads in flight.
RED_WARPS = 8
MIN_COL_BLOCK = 16
MAX_COL_BLOCK = 1024
TILES_PER_PROGRAM = 8
MAX_SPLITS = 1024
# Finish programs: few channels each, many splits per step. A 64-channel layer gets 4 programs (not 1)
# and folds 1024 splits in 8 steps (not 32): the fold's serial latency is what the finish kernel costs.
FIN_BLOCK_C = 32 if INTERPRET else 16  # channels per finish program
FIN_BLOCK_SP = 32 if INTERPRET else 128  # splits folded per step of a finish program

# The largest float32 value that rounds to 0 in each output dtype (round to nearest even; the value
# itself is a tie between 0 and the dtype's smallest subnormal, 2^-24 and 2^-133, and goes to even, 0).
# The forward stores relu(v) in the input dtype, so a positive v up to this gives an output of exactly
# 0: bn_relu's recomputed backward mask is v > RELU_ZERO_MAX (a constexpr of the kernels, per dtype),
# the forward's output > 0 as in stock PyTorch, not v > 0. float32: every positive v is a positive output.
_RELU_ZERO_MAX = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def relu_zero_max(dtype: torch.dtype) -> float:
    return _RELU_ZERO_MAX.get(dtype, 0.0)


_EW_CONFIGS = configs(
    [triton.Config({"BLOCK": b}, num_warps=w) for b in (2048, 4096, 1024) for w in (4, 8)],
    triton.Config({"BLOCK": 1024}, num_warps=4))


# ---------------------------------------------------------------------------------------- reductions

@triton.jit
def _pre_relu(x, mu, sc, beta):
    """BatchNorm's value before the residual and the ReLU, in float32: t = x - mean, then one fma
    with the channel's scale and beta (broadcast to t: tl.fma does not broadcast). The one expression
    of the forward and of bn_relu's backward mask, so the recomputed mask is the forward's exactly."""
    t = x - mu
    return tl.fma(t, tl.broadcast_to(sc, t.shape), tl.broadcast_to(beta, t.shape))


@triton.jit
def _relu_output_positive(v, RELU_ZERO_MAX: tl.constexpr):
    """bn_relu's recomputed backward mask: v = _pre_relu(x) > RELU_ZERO_MAX, the forward's rounded
    output > 0. One float32 compare: the bound is made a float32 constant first (a bare Python float
    below float32's normal range, as bfloat16's 2^-134, would become a float64 constant and the
    compare float64)."""
    return v > tl.full([], RELU_ZERO_MAX, tl.float32)


@triton.jit
def _accumulate(x_ptr, dy_ptr, o_ptr, gm_ptr, off, mask, k, sc, beta, mu, a1, a2, BACKWARD: tl.constexpr,
                MASK_FROM_OUT: tl.constexpr, RELU_ZERO_MAX: tl.constexpr):
    """Adds one tile to the two sums: shifted moments sum(x - k), sum((x - k)^2) in the forward;
    sum(gm), sum(gm * (x - mean)) in the backward, gm = dy * mask with mask = (_pre_relu(x) >
    RELU_ZERO_MAX), the forward's output > 0, or with MASK_FROM_OUT mask = (out > 0), and then gm is
    also stored (in dy's dtype, exactly: it is dy or zero) for the elementwise pass and as the
    residual's gradient."""
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if MASK_FROM_OUT:
            o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
            gm = tl.where(mask & (o > 0.0), g, 0.0)
            tl.store(gm_ptr + off, gm.to(gm_ptr.dtype.element_ty), mask=mask)
        else:
            gm = tl.where(mask & _relu_output_positive(_pre_relu(x, mu, sc, beta), RELU_ZERO_MAX), g, 0.0)
        a1 += gm
        a2 += gm * (x - mu)
    else:
        d = tl.where(mask, x - k, 0.0)
        a1 += d
        a2 += d * d
    return a1, a2


@triton.jit
def _reduce_rows_kernel(x_ptr, dy_ptr, o_ptr, gm_ptr, scale_ptr, beta_ptr, mean_ptr, ws_ptr, N, C, S, SPLITS,
                        BACKWARD: tl.constexpr, MASK_FROM_OUT: tl.constexpr, RELU_ZERO_MAX: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Contiguous layout. Program (c, split) takes tiles split, split + SPLITS, ... of channel c's
    [N, S] rows, tile t covering rows n in tile t // s_tiles and columns in tile t % s_tiles."""
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    s_tiles = tl.cdiv(S, BLOCK_S)
    tiles = tl.cdiv(N, BLOCK_N) * s_tiles
    k, sc, beta, mu = 0.0, 0.0, 0.0, 0.0  # the constants the pass does not use
    if BACKWARD:
        if not MASK_FROM_OUT:
            sc = tl.load(scale_ptr + c)
            beta = tl.load(beta_ptr + c)
        mu = tl.load(mean_ptr + c)
    else:
        k = tl.load(x_ptr + c * S).to(tl.float32)  # shift: the channel's first element
    a1 = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_N, BLOCK_S], dtype=tl.float32)
    for t in range(split, tiles, SPLITS):
        tn = t // s_tiles
        n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        s = (t - tn * s_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (n < N)[:, None] & (s < S)[None, :]
        off = (n.to(tl.int64)[:, None] * C + c) * S + s[None, :]
        a1, a2 = _accumulate(x_ptr, dy_ptr, o_ptr, gm_ptr, off, mask, k, sc, beta, mu, a1, a2, BACKWARD,
                             MASK_FROM_OUT, RELU_ZERO_MAX)
    out = ws_ptr + (c * SPLITS + split) * 2
    tl.store(out, tl.sum(tl.sum(a1, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(a2, axis=1), axis=0))


@triton.jit
def _reduce_cols_kernel(x_ptr, dy_ptr, o_ptr, gm_ptr, scale_ptr, beta_ptr, mean_ptr, ws_ptr, R, C, SPLITS,
                        BACKWARD: tl.constexpr, MASK_FROM_OUT: tl.constexpr, RELU_ZERO_MAX: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """channels_last / (N, C): program (channel block, split) takes row blocks split, split + SPLITS,
    ... of the [R = N*S, C] matrix, loading [BLOCK_R, BLOCK_C] tiles (coalesced along C)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    cmask = c < C
    k, sc, beta, mu = 0.0, 0.0, 0.0, 0.0  # the constants the pass does not use
    if BACKWARD:
        if not MASK_FROM_OUT:
            sc = tl.load(scale_ptr + c, mask=cmask, other=0.0)[None, :]
            beta = tl.load(beta_ptr + c, mask=cmask, other=0.0)[None, :]
        mu = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    else:
        k = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]  # row 0
    a1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(split * BLOCK_R, R, SPLITS * BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask = (r < R)[:, None] & cmask[None, :]
        off = r[:, None] * C + c[None, :]
        a1, a2 = _accumulate(x_ptr, dy_ptr, o_ptr, gm_ptr, off, mask, k, sc, beta, mu, a1, a2, BACKWARD,
                             MASK_FROM_OUT, RELU_ZERO_MAX)
    out = ws_ptr + (c.to(tl.int64) * SPLITS + split) * 2
    tl.store(out, tl.sum(a1, axis=0), mask=cmask)
    tl.store(out + 1, tl.sum(a2, axis=0), mask=cmask)


@triton.jit
def _fold(ws_ptr, c, cmask, SPLITS, BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr):
    """The two partial sums of channels c over their splits, in float64, in a fixed order."""
    s1 = tl.zeros([BLOCK_C, BLOCK_SP], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_C, BLOCK_SP], dtype=tl.float64)
    for sp0 in range(0, SPLITS, BLOCK_SP):
        sp = sp0 + tl.arange(0, BLOCK_SP)
        m = cmask[:, None] & (sp < SPLITS)[None, :]
        off = (c.to(tl.int64)[:, None] * SPLITS + sp[None, :]) * 2
        s1 += tl.load(ws_ptr + off, mask=m, other=0.0).to(tl.float64)
        s2 += tl.load(ws_ptr + off + 1, mask=m, other=0.0).to(tl.float64)
    return tl.sum(s1, axis=1), tl.sum(s2, axis=1)


@triton.jit
def _scale_beta(c, cmask, invstd, w_ptr, b_ptr, scale_ptr, beta_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """The per-channel constants of _pre_relu besides the mean: scale = weight * invstd, beta = bias
    (0 without one), both float32."""
    scale = invstd
    if HAS_W:
        scale = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float32) * invstd
    beta = tl.zeros_like(invstd)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(beta_ptr + c, beta, mask=cmask)


@triton.jit
def _stats_finish_kernel(ws_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, var_ptr, scale_ptr, beta_ptr,
                         C, S, SPLITS, M, eps, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s1, s2 = _fold(ws_ptr, c, cmask, SPLITS, BLOCK_C, BLOCK_SP)
    if CHANNELS_LAST:  # the shift of the partial sums: each channel's first element
        first = c.to(tl.int64)
    else:
        first = c.to(tl.int64) * S
    k = tl.load(x_ptr + first, mask=cmask, other=0.0).to(tl.float32).to(tl.float64)
    m = tl.zeros([BLOCK_C], dtype=tl.float64) + M  # (not M.to(): an int argument equal to 1 is a constexpr)
    m1 = s1 / m
    var = tl.maximum(s2 / m - m1 * m1, 0.0)
    invstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
    mean = (k + m1).to(tl.float32)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    tl.store(var_ptr + c, var.to(tl.float32), mask=cmask)
    _scale_beta(c, cmask, invstd, w_ptr, b_ptr, scale_ptr, beta_ptr, HAS_W, HAS_B)


@triton.jit
def _prepare_kernel(mean_ptr, v_ptr, w_ptr, b_ptr, mean_out, var_out, invstd_ptr, scale_ptr, beta_ptr, C, eps,
                    FROM_VAR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel constants from given statistics: eval forward (running mean/var, copied out as
    float32) or backward (saved mean/invstd)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if FROM_VAR:
        var = tl.load(v_ptr + c, mask=cmask, other=1.0).to(tl.float32)
        invstd = (1.0 / tl.sqrt(var.to(tl.float64) + eps)).to(tl.float32)
        tl.store(mean_out + c, mean, mask=cmask)
        tl.store(var_out + c, var, mask=cmask)
        tl.store(invstd_ptr + c, invstd, mask=cmask)
    else:
        invstd = tl.load(v_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    _scale_beta(c, cmask, invstd, w_ptr, b_ptr, scale_ptr, beta_ptr, HAS_W, HAS_B)


@triton.jit
def _backward_finish_kernel(ws_ptr, w_ptr, invstd_ptr, gw_ptr, gb_ptr, k0_ptr, k1_ptr, k2_ptr, C, SPLITS, M,
                            USE_BATCH_STATS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_SP: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum_dy, sum_dy_xmu = _fold(ws_ptr, c, cmask, SPLITS, BLOCK_C, BLOCK_SP)
    inv = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    w = inv * 0.0 + 1.0
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=1.0).to(tl.float64)
    tl.store(gb_ptr + c, sum_dy.to(tl.float32), mask=cmask)
    tl.store(gw_ptr + c, (sum_dy_xmu * inv).to(tl.float32), mask=cmask)
    tl.store(k0_ptr + c, (w * inv).to(tl.float32), mask=cmask)
    if USE_BATCH_STATS:
        m = tl.zeros([BLOCK_C], dtype=tl.float64) + M
        tl.store(k1_ptr + c, (w * inv * sum_dy / m).to(tl.float32), mask=cmask)
        tl.store(k2_ptr + c, (w * inv * inv * inv * sum_dy_xmu / m).to(tl.float32), mask=cmask)
    else:
        tl.store(k1_ptr + c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cmask)
        tl.store(k2_ptr + c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=cmask)


# ---------------------------------------------------------------------------------------- elementwise

@triton.jit
def _tile(ROWS, COLS, C, ROW_CHANNEL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    """Offsets, mask and channel index of this program's [BLOCK_R, BLOCK_COL] tile."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    col = tl.program_id(1) * BLOCK_COL + tl.arange(0, BLOCK_COL)
    rmask = r < ROWS
    cmask = col < COLS
    mask = rmask[:, None] & cmask[None, :]
    off = r[:, None] * COLS + col[None, :]
    if ROW_CHANNEL:
        ch = (r % C)[:, None]  # one division per row, not per element
        chmask = rmask[:, None]
    else:
        ch = col[None, :]
        chmask = cmask[None, :]
    return off, mask, ch, chmask


@triton.autotune(configs=_EW_CONFIGS, key=["ROWS", "COLS"])
@triton.jit
def _forward_kernel(x_ptr, r_ptr, y_ptr, mean_ptr, scale_ptr, beta_ptr, ROWS, COLS, C, ROW_CHANNEL: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_COL: tl.constexpr, BLOCK: tl.constexpr):
    """y = relu(fma(x - mean, scale, beta) [+ residual]), formed in float32 and rounded once."""
    off, mask, ch, chmask = _tile(ROWS, COLS, C, ROW_CHANNEL, BLOCK // BLOCK_COL, BLOCK_COL)
    mu = tl.load(mean_ptr + ch, mask=chmask, other=0.0)
    sc = tl.load(scale_ptr + ch, mask=chmask, other=0.0)
    beta = tl.load(beta_ptr + ch, mask=chmask, other=0.0)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    v = _pre_relu(x, mu, sc, beta)
    if HAS_RESIDUAL:
        v = v + tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(v < 0.0, 0.0, v)  # NaN propagates, as in torch.relu
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_EW_CONFIGS, key=["ROWS", "COLS"])
@triton.jit
def _backward_kernel(x_ptr, dy_ptr, dx_ptr, scale_ptr, beta_ptr, mean_ptr, k0_ptr, k1_ptr, k2_ptr, ROWS, COLS, C,
                     ROW_CHANNEL: tl.constexpr, MASK_FROM_OUT: tl.constexpr, USE_BATCH_STATS: tl.constexpr,
                     RELU_ZERO_MAX: tl.constexpr, BLOCK_COL: tl.constexpr, BLOCK: tl.constexpr):
    """dx = k0 * gm - k1 - (x - mean) * k2 (training) or k0 * gm (eval). gm = dy * (_pre_relu(x) >
    RELU_ZERO_MAX), the forward's output > 0, or with MASK_FROM_OUT dy is gm already (masked by the
    reduction pass), and eval reads no x."""
    off, mask, ch, chmask = _tile(ROWS, COLS, C, ROW_CHANNEL, BLOCK // BLOCK_COL, BLOCK_COL)
    k0 = tl.load(k0_ptr + ch, mask=chmask, other=0.0)
    g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if MASK_FROM_OUT:
        gm = g
    else:
        mu = tl.load(mean_ptr + ch, mask=chmask, other=0.0)
        sc = tl.load(scale_ptr + ch, mask=chmask, other=0.0)
        beta = tl.load(beta_ptr + ch, mask=chmask, other=0.0)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gm = tl.where(_relu_output_positive(_pre_relu(x, mu, sc, beta), RELU_ZERO_MAX), g, 0.0)
    dx = gm * k0
    if USE_BATCH_STATS:
        if MASK_FROM_OUT:
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + ch, mask=chmask, other=0.0)
        k1 = tl.load(k1_ptr + ch, mask=chmask, other=0.0)
        k2 = tl.load(k2_ptr + ch, mask=chmask, other=0.0)
        dx = dx - k1 - (x - mu) * k2
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------

def _native(x):
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


class _Geometry:
    """The tensor as a matrix: rows x cols, and whether a row (contiguous) or a column
    (channels_last, and contiguous (N, C) with S == 1) is one channel."""

    def __init__(self, x):
        self.n, self.c = x.shape[0], x.shape[1]
        self.s = x.numel() // max(1, self.n * self.c)
        self.m = self.n * self.s  # elements per channel
        self.cols_are_channels = (not x.is_contiguous()) or self.s == 1
        if self.cols_are_channels:
            self.rows, self.cols = self.n * self.s, self.c
        else:
            self.rows, self.cols = self.n * self.c, self.s
        # Powers of two from 16 to 1024: few distinct shapes to JIT-compile (each is a compile)
        self.col_block = min(max(triton.next_power_of_2(max(self.cols, 1)), MIN_COL_BLOCK), MAX_COL_BLOCK)
        self.row_block = max(1, RED_TILE // self.col_block)
        if self.cols_are_channels:
            tiles = triton.cdiv(self.rows, self.row_block)
        else:
            tiles = triton.cdiv(self.n, self.row_block) * triton.cdiv(self.s, self.col_block)
        # sym_min/sym_max: under torch.compile(dynamic=True) the batch size stays symbolic here (Python's
        # min/max would guard on it and recompile for every batch size); on ints they are min/max.
        self.splits = torch.sym_max(1, torch.sym_min(MAX_SPLITS, triton.cdiv(tiles, TILES_PER_PROGRAM)))

    def reduce(self, x, dy, scale, beta, mean, ws, backward, out=None, gm=None):
        """Partial sums into ws. Backward with `out` given: the ReLU mask is out > 0 and the masked
        gradient is written to `gm` (MASK_FROM_OUT); scale and beta are then unused."""
        from_out = out is not None
        o, gm = (out, gm) if from_out else (x, x)
        if self.cols_are_channels:
            grid = (triton.cdiv(self.c, self.col_block), self.splits)
            wrap_triton(_reduce_cols_kernel)[grid](x, dy, o, gm, scale, beta, mean, ws, self.rows, self.c,
                                                   self.splits, BACKWARD=backward, MASK_FROM_OUT=from_out,
                                                   RELU_ZERO_MAX=relu_zero_max(x.dtype), BLOCK_R=self.row_block,
                                                   BLOCK_C=self.col_block, num_warps=RED_WARPS)
        else:
            wrap_triton(_reduce_rows_kernel)[(self.c, self.splits)](x, dy, o, gm, scale, beta, mean, ws, self.n,
                                                                   self.c, self.s, self.splits, BACKWARD=backward,
                                                                   MASK_FROM_OUT=from_out,
                                                                   RELU_ZERO_MAX=relu_zero_max(x.dtype),
                                                                   BLOCK_N=self.row_block, BLOCK_S=self.col_block,
                                                                   num_warps=RED_WARPS)

    def ew_grid(self):
        return lambda meta: (triton.cdiv(self.rows, meta["BLOCK"] // self.col_block),
                             triton.cdiv(self.cols, self.col_block))


def _memory_format(x):
    """The layout _Geometry reads x in (x native): contiguous, else channels_last(_3d)."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _check_like(t, input, name):
    """The kernels index t with input's geometry: a wrong shape would read out of bounds."""
    if t.shape != input.shape or t.dtype != input.dtype or t.device != input.device:
        raise RuntimeError("torchfast: %s must have the input's shape, dtype and device (%s, %s, %s), got (%s, %s, %s)"
                           % (name, tuple(input.shape), input.dtype, input.device, tuple(t.shape), t.dtype, t.device))


def _fin_grid(c):
    return (triton.cdiv(c, FIN_BLOCK_C),)


def _opt(t, like):
    """(pointer argument, present?) for an optional per-channel tensor."""
    return (t, True) if t is not None else (like, False)


def _bn_forward(input, residual, weight, bias, running_mean, running_var, training, eps):
    """bn_relu_fwd (residual None) or bn_add_relu_fwd. A residual in another layout than the one x is
    read in is brought to it first (one extra copy of the residual; the fast path wants input's)."""
    if residual is not None:
        _check_like(residual, input, "residual")
    native = _native(input)
    x = input if native else input.contiguous()
    r = x if residual is None else residual.contiguous(memory_format=_memory_format(x))
    out = torch.empty_like(input)
    y = out if native else torch.empty_like(x)
    g = _Geometry(x)
    c = g.c
    f32 = dict(dtype=torch.float32, device=x.device)
    mean, invstd, var = torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(c, **f32)
    if c == 0:
        return out, mean, invstd, var
    if training and x.numel() == 0:
        mean.fill_(float("nan"))
        var.fill_(float("nan"))
        invstd.fill_(float("nan"))
        return out, mean, invstd, var
    scale, beta = torch.empty(c, **f32), torch.empty(c, **f32)
    w, has_w = _opt(weight, mean)
    b, has_b = _opt(bias, mean)
    if training:
        ws = torch.empty(c * g.splits * 2, **f32)
        g.reduce(x, x, mean, mean, mean, ws, backward=False)
        wrap_triton(_stats_finish_kernel)[_fin_grid(c)](
            ws, x, w, b, mean, invstd, var, scale, beta, c, g.s, g.splits, g.m, eps,
            CHANNELS_LAST=g.cols_are_channels, HAS_W=has_w, HAS_B=has_b, BLOCK_C=FIN_BLOCK_C, BLOCK_SP=FIN_BLOCK_SP)
    else:
        wrap_triton(_prepare_kernel)[_fin_grid(c)](running_mean, running_var, w, b, mean, var, invstd, scale, beta,
                                                   c, eps, FROM_VAR=True, HAS_W=has_w, HAS_B=has_b,
                                                   BLOCK_C=FIN_BLOCK_C)
    if x.numel() > 0:
        wrap_triton(_forward_kernel)[g.ew_grid()](x, r, y, mean, scale, beta, g.rows, g.cols, c,
                                                  ROW_CHANNEL=not g.cols_are_channels,
                                                  HAS_RESIDUAL=residual is not None, BLOCK_COL=g.col_block)
    if not native:
        out.copy_(y)
    return out, mean, invstd, var


def _backward_passes(g, x, dy, dx, mean, invstd, weight, training, scale, beta, out=None, gm=None):
    """Reduction, finish and elementwise passes of the backward (a non-empty batch); returns
    (grad_weight, grad_bias). Without `out` the ReLU mask is _pre_relu(x) > RELU_ZERO_MAX in both
    passes, the forward's expression and its rounded output > 0; with it (MASK_FROM_OUT) the mask is
    out > 0, the reduction writes gm and the elementwise pass reads gm instead of dy (scale and beta
    unused)."""
    c = g.c
    f32 = dict(dtype=torch.float32, device=x.device)
    grad_w, grad_b, k0, k1, k2 = (torch.empty(c, **f32) for _ in range(5))
    w, has_w = _opt(weight, mean)
    ws = torch.empty(c * g.splits * 2, **f32)
    g.reduce(x, dy, scale, beta, mean, ws, backward=True, out=out, gm=gm)
    wrap_triton(_backward_finish_kernel)[_fin_grid(c)](
        ws, w, invstd, grad_w, grad_b, k0, k1, k2, c, g.splits, g.m, USE_BATCH_STATS=training, HAS_W=has_w,
        BLOCK_C=FIN_BLOCK_C, BLOCK_SP=FIN_BLOCK_SP)
    from_out = out is not None
    wrap_triton(_backward_kernel)[g.ew_grid()](x, gm if from_out else dy, dx, scale, beta, mean, k0, k1, k2, g.rows,
                                               g.cols, c, ROW_CHANNEL=not g.cols_are_channels,
                                               MASK_FROM_OUT=from_out, USE_BATCH_STATS=training,
                                               RELU_ZERO_MAX=relu_zero_max(x.dtype), BLOCK_COL=g.col_block)
    return grad_w, grad_b


@triton_op("torchfast::bn_relu_fwd_triton", mutates_args=())
def bn_relu_fwd_triton(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(input.device):
        return _bn_forward(input, None, weight, bias, running_mean, running_var, training, eps)


@triton_op("torchfast::bn_relu_bwd_triton", mutates_args=())
def bn_relu_bwd_triton(grad_out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                       training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(input.device):
        return _bn_relu_bwd(grad_out, input, weight, bias, mean, invstd, training)


def _bn_relu_bwd(grad_out, input, weight, bias, mean, invstd, training):
    native = _native(input)
    x = input if native else input.contiguous()
    dy = grad_out.contiguous(memory_format=_memory_format(x))
    grad_in = torch.empty_like(input)
    dx = grad_in if native else torch.empty_like(x)
    g = _Geometry(x)
    c = g.c
    f32 = dict(dtype=torch.float32, device=x.device)
    if c == 0 or x.numel() == 0:  # an empty batch: zero parameter gradients (not 0 * NaN invstd)
        return grad_in, torch.zeros(c, **f32), torch.zeros(c, **f32)
    mean = mean.float().contiguous()
    scale, beta = torch.empty(c, **f32), torch.empty(c, **f32)
    w, has_w = _opt(weight, mean)
    b, has_b = _opt(bias, mean)
    wrap_triton(_prepare_kernel)[_fin_grid(c)](mean, invstd, w, b, mean, mean, mean, scale, beta, c, 0.0,
                                               FROM_VAR=False, HAS_W=has_w, HAS_B=has_b, BLOCK_C=FIN_BLOCK_C)
    grad_w, grad_b = _backward_passes(g, x, dy, dx, mean, invstd, weight, training, scale, beta)
    if not native:
        grad_in.copy_(dx)
    return grad_in, grad_w, grad_b


@triton_op("torchfast::bn_add_relu_fwd_triton", mutates_args=())
def bn_add_relu_fwd_triton(input: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], training: bool,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(input.device):
        return _bn_forward(input, residual, weight, bias, running_mean, running_var, training, eps)


@triton_op("torchfast::bn_add_relu_bwd_triton", mutates_args=())
def bn_add_relu_bwd_triton(grad_out: torch.Tensor, out: torch.Tensor, input: torch.Tensor,
                           weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                           training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction pass: reads grad_out, out, x; writes gm = grad_out * (out > 0), the residual's
    gradient, and the per-channel partial sums. Elementwise pass: reads gm (and x in training), writes
    dx. grad_out and out in another layout than x's are brought to it first."""
    with device_guard(input.device):
        return _bn_add_relu_bwd(grad_out, out, input, weight, mean, invstd, training)


def _bn_add_relu_bwd(grad_out, out, input, weight, mean, invstd, training):
    _check_like(grad_out, input, "grad_out")
    _check_like(out, input, "out")
    native = _native(input)
    x = input if native else input.contiguous()
    fmt = _memory_format(x)
    dy = grad_out.contiguous(memory_format=fmt)
    o = out.contiguous(memory_format=fmt)
    grad_in, grad_res = torch.empty_like(input), torch.empty_like(input)
    dx, gm = (grad_in, grad_res) if native else (torch.empty_like(x), torch.empty_like(x))
    g = _Geometry(x)
    c = g.c
    f32 = dict(dtype=torch.float32, device=x.device)
    if c == 0 or x.numel() == 0:  # an empty batch: zero parameter gradients (not 0 * NaN invstd)
        return grad_in, grad_res, torch.zeros(c, **f32), torch.zeros(c, **f32)
    mean = mean.float().contiguous()
    grad_w, grad_b = _backward_passes(g, x, dy, dx, mean, invstd, weight, training, mean, mean, out=o, gm=gm)
    if not native:
        grad_in.copy_(dx)
        grad_res.copy_(gm)
    return grad_in, grad_res, grad_w, grad_b


# ------------------------------------------------------------------------------------------------
# Registration: triton_op derives the fake kernels itself; autograd as for the compiled ops.

_register_bn_relu("torchfast::bn_relu_fwd_triton", "torchfast::bn_relu_bwd_triton", bn_relu_bwd_triton, fake=False)
bn_relu_fwd = bn_relu_fwd_triton
_register_bn_add_relu("torchfast::bn_add_relu_fwd_triton", "torchfast::bn_add_relu_bwd_triton", bn_add_relu_bwd_triton,
                      fake=False)
bn_add_relu_fwd = bn_add_relu_fwd_triton
