"""Batched Philox init in Triton: one launch per batch (one (device, dtype) group).

Memory traffic: one write of every tensor. Each program fills one chunk of one tensor, located through
a chunk table (tensor address, element count, first element, stream, distribution, eight parameters).
Counters follow csrc/philox.h: block i//4 in counter words 0-1, the tensor's stream in words 2-3,
key = seed; tl.philox implements exactly Philox4x32-10 with that layout. float32 values of every
distribution are bitwise equal to the other backends: the kernel is compiled with FMA contraction off,
fused multiply-adds are explicit (_fma, exactly where csrc/philox.h has fma_rn), and log, sin, cos and
sqrt are the stream's own (_log_f32, _sincos_2pi, sqrt_rn), not libdevice's.

Block shape: BLOCK_B Philox blocks (4 * BLOCK_B elements) per step; 1024 blocks = 4096 elements,
16 KB of fp32 written per step, enough to keep an H100/H200 SM's store queue busy with 4-8 warps;
a program loops over CHUNK elements so the table stays small for 1B-element batches.
"""
from typing import List

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from torchfast.reference.philox import CONSTANT, NORMAL, TRUNC_NORMAL, UNIFORM
from torchfast.triton import INTERPRET, chunk_table, device_guard, tl_dtype, upload

CHUNK = 1 << 16  # elements per program


# On a GPU tl.fma is one fused multiply-add. Triton's interpreter evaluates it as a * b + c in float32,
# rounded twice, so there _fma computes it exactly instead (reference.philox.fma_f32's method).
_HW_FMA: tl.constexpr = tl.constexpr(not INTERPRET)


@triton.jit
def _fma(a, b, c):
    """fma(a, b, c) of float32 tensors of one shape, rounded once. Interpreter: the float64 product of
    two float32 values is exact; the float64 sum is made round-to-odd (its exact error from TwoSum; an
    inexact, even result moves one ulp away from zero if the error has the sum's sign, else towards
    zero), and a round-to-odd 53-bit value rounds to float32 correctly."""
    if _HW_FMA:
        return tl.fma(a, b, c)
    else:
        p = a.to(tl.float64) * b.to(tl.float64)
        c64 = c.to(tl.float64)
        s = p + c64
        bb = s - p
        err = (p - (s - bb)) + (c64 - bb)
        bits = s.to(tl.int64, bitcast=True)
        odd = tl.where((err != 0) & ((bits & 1) == 0), tl.where((err > 0) == (s > 0), bits + 1, bits - 1), bits)
        return odd.to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _k(x, c):
    """The float32 constant c as a tensor of x's shape (tl.fma takes no scalars)."""
    return tl.full(x.shape, c, tl.float32)


# _log_f32 and _sincos_2pi: csrc/philox.h's log_f32 and sincos_2pi_unit (torchfast/reference/philox.py
# spells them out), the same float32 operations in the same order, so that normal and truncated-normal
# values are the same bits as on every other backend. Polynomials: Horner with one _fma per
# coefficient, highest power first (the coefficients are philox.h's TF_LOG_Q, TF_SIN_PI, TF_COS_PI).
@triton.jit
def _log_f32(x):
    x = x.to(tl.float32)  # a no-op in the float32 stream (the float64 kernel compiles this body too, unused)
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    f = m - 1.0
    q = _fma(_k(f, -0.07848578691482544), f, _k(f, 0.12813004851341248))
    q = _fma(q, f, _k(f, -0.13104309141635895))
    q = _fma(q, f, _k(f, 0.14190416038036346))
    q = _fma(q, f, _k(f, -0.1662747710943222))
    q = _fma(q, f, _k(f, 0.20001903176307678))
    q = _fma(q, f, _k(f, -0.2500077486038208))
    q = _fma(q, f, _k(f, 0.33333322405815125))
    q = _fma(q, f, _k(f, -0.4999999701976776))
    out = _fma(e.to(tl.float32), _k(f, 0.6931471824645996), _fma(f * q, f, f))
    return tl.where(x == 0.0, float("-inf"), out)


@triton.jit
def _sincos_2pi(w):
    n = ((w >> 9) * 2 + 1).to(tl.int32)
    q = (n + (1 << 21)) >> 22
    r = (n - (q << 22)).to(tl.float32) * 1.1920928955078125e-07
    t = r * r
    sp = _fma(_k(t, -0.5890786647796631), t, _k(t, 2.549767255783081))
    sp = _fma(sp, t, _k(t, -5.167707920074463))
    sp = _fma(sp, t, _k(t, 3.1415927410125732)) * r
    cp = _fma(_k(t, 0.23132972419261932), t, _k(t, -1.3350446224212646))
    cp = _fma(cp, t, _k(t, 4.058707237243652))
    cp = _fma(cp, t, _k(t, -4.934802055358887))
    cp = _fma(cp, t, _k(t, 1.0))
    odd = (q & 1) == 1
    a = tl.where(odd, cp, sp)
    b = tl.where(odd, sp, cp)
    return tl.where((q & 2) == 2, -a, a), tl.where(((q + 1) & 2) == 2, -b, b)


@triton.jit
def _erfinv_f32(x):
    w = -_log_f32((1.0 - x) * (1.0 + x))
    wc = w - 2.5
    pc = _fma(_k(wc, 2.81022636e-08), wc, _k(wc, 3.43273939e-07))
    pc = _fma(pc, wc, _k(wc, -3.5233877e-06))
    pc = _fma(pc, wc, _k(wc, -4.39150654e-06))
    pc = _fma(pc, wc, _k(wc, 0.00021858087))
    pc = _fma(pc, wc, _k(wc, -0.00125372503))
    pc = _fma(pc, wc, _k(wc, -0.00417768164))
    pc = _fma(pc, wc, _k(wc, 0.246640727))
    pc = _fma(pc, wc, _k(wc, 1.50140941))
    wt = tl.sqrt_rn(w) - 3.0
    pt = _fma(_k(wt, -0.000200214257), wt, _k(wt, 0.000100950558))
    pt = _fma(pt, wt, _k(wt, 0.00134934322))
    pt = _fma(pt, wt, _k(wt, -0.00367342844))
    pt = _fma(pt, wt, _k(wt, 0.00573950773))
    pt = _fma(pt, wt, _k(wt, -0.0076224613))
    pt = _fma(pt, wt, _k(wt, 0.00943887047))
    pt = _fma(pt, wt, _k(wt, 1.00167406))
    pt = _fma(pt, wt, _k(wt, 2.83297682))
    return tl.where(w < 5.0, pc, pt) * x


@triton.jit
def _unit(w):
    return ((w >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _f64(c):
    """A float64 constant (a bare Python float in a kernel is a float32 one)."""
    return tl.full([], c, tl.float64)


@triton.jit
def _erfc_f64(z, LIBDEVICE: tl.constexpr):
    """erfc in float64 at full relative precision: libdevice's on a GPU. Triton's interpreter runs no
    libdevice call, so there: 1 - erf(z) below 1.5 (erfc > 0.03: within 4e-15 relative) and the
    continued fraction erfc(z) = exp(-z^2) / (sqrt(pi) (z + 1/2 / (z + 1 / (z + 3/2 / (z + ...)))))
    above, 100 terms deep, within 2e-16 for z >= 1.5."""
    if LIBDEVICE:
        return libdevice.erfc(z)
    else:
        zc = tl.maximum(z, _f64(1.5))
        k = tl.zeros_like(zc)
        for i in tl.static_range(100, 0, -1):
            k = _f64(0.5 * i) / (zc + k)
        cf = tl.exp(-(zc * zc)) / (_f64(1.7724538509055159) * (zc + k))
        return tl.where(z < _f64(1.5), _f64(1.0) - tl.math.erf(z), cf)


@triton.jit
def _erfinv_f64(t, d, LIBDEVICE: tl.constexpr):
    # csrc/philox.h erfinv_f64: Newton on erf(z) = |t| in the body (d >= 1/2), on erfc(z) = d in the tails
    central = d >= _f64(0.5)
    x = tl.where(central, tl.abs(t), _f64(1.0) - d)
    q = tl.where(central, _f64(1.0) - x, d)
    w = -tl.log(q * (_f64(1.0) + x))
    wc = w - _f64(2.5)
    p = _f64(2.81022636e-08)
    p = p * wc + _f64(3.43273939e-07)
    p = p * wc + _f64(-3.5233877e-06)
    p = p * wc + _f64(-4.39150654e-06)
    p = p * wc + _f64(0.00021858087)
    p = p * wc + _f64(-0.00125372503)
    p = p * wc + _f64(-0.00417768164)
    p = p * wc + _f64(0.246640727)
    p = p * wc + _f64(1.50140941)
    tail = tl.sqrt(-tl.log(q * tl.sqrt(-tl.log(q)) * _f64(1.7724538509055159)))
    z = tl.where(w < _f64(5.0), p * x, tail)
    for _ in tl.static_range(4):
        r = tl.where(central, tl.math.erf(z) - x, q - _erfc_f64(z, LIBDEVICE))
        z = z - r / (_f64(1.1283791670955126) * tl.exp(-(z * z)))
    return z


@triton.jit
def _sincos_2pi_f64(k):
    # csrc/philox.h sincos_2pi_unit64: exact quadrant split of 2u = (2k + 1) 2^-53, Taylor polynomials
    n = (k * 2 + 1).to(tl.int64)
    q = (n + (1 << 51)) >> 52
    r = (n - (q << 52)).to(tl.float64) * _f64(1.1102230246251565e-16)
    t = r * r
    sp = _f64(-2.2948428997269873e-08)
    sp = sp * t + _f64(7.952054001475513e-07)
    sp = sp * t + _f64(-2.1915353447830217e-05)
    sp = sp * t + _f64(0.00046630280576761255)
    sp = sp * t + _f64(-0.0073704309457143504)
    sp = sp * t + _f64(0.08214588661112823)
    sp = sp * t + _f64(-0.5992645293207921)
    sp = sp * t + _f64(2.5501640398773455)
    sp = sp * t + _f64(-5.16771278004997)
    sp = sp * t + _f64(3.141592653589793)
    sp = sp * r
    cp = _f64(-1.3878952462213771e-07)
    cp = cp * t + _f64(4.303069587032947e-06)
    cp = cp * t + _f64(-0.0001046381049248457)
    cp = cp * t + _f64(0.0019295743094039231)
    cp = cp * t + _f64(-0.02580689139001406)
    cp = cp * t + _f64(0.2353306303588932)
    cp = cp * t + _f64(-1.3352627688545895)
    cp = cp * t + _f64(4.0587121264167685)
    cp = cp * t + _f64(-4.934802200544679)
    cp = cp * t + _f64(1.0)
    quadrant = q & 3
    odd = (quadrant & 1) == 1
    a = tl.where(odd, cp, sp)
    b = tl.where(odd, sp, cp)
    s = tl.where((quadrant & 2) == 2, -a, a)
    c = tl.where((quadrant == 1) | (quadrant == 2), -b, b)
    return s, c


@triton.jit
def _index64(hi, lo):
    return (hi.to(tl.uint64) << 21) | (lo.to(tl.uint64) >> 11)


@triton.jit
def _unit64(hi, lo):
    return (_index64(hi, lo) * 2 + 1).to(tl.float64) * _f64(5.551115123125783e-17)


@triton.jit
def _trunc_f64(u, lo, span, a, b, mean, scale, qlo, qhi, LIBDEVICE: tl.constexpr):
    # csrc/philox.h philox_values_f64, kTruncNormal: t and its distances from -1 and 1
    t = lo + span * u
    dl = qlo + span * u
    dh = qhi + span * (_f64(1.0) - u)
    d = tl.minimum(dl, dh)
    z = _erfinv_f64(t, d, LIBDEVICE)
    negative = tl.where(d >= _f64(0.5), t < _f64(0.0), dl < dh)
    return tl.minimum(tl.maximum(mean + scale * tl.where(negative, -z, z), a), b)


@triton.jit
def _philox_fill_f64(out, n, start, s_lo, s_hi, kind, p0, p1, p2, p3, p4, p5, p6, p7, seed,
                     CHUNK_ELEMS: tl.constexpr, BLOCK_B: tl.constexpr, LIBDEVICE: tl.constexpr):
    """float64 tensors: two elements per Philox block at full precision (csrc/philox.h philox_values_f64)."""
    lanes = tl.arange(0, BLOCK_B).to(tl.int64)
    for step in range(0, tl.minimum(CHUNK_ELEMS, n - start), 2 * BLOCK_B):
        blk = (start + step) // 2 + lanes
        w0, w1, w2, w3 = tl.philox(seed, (blk & 0xFFFFFFFF).to(tl.uint32), (blk >> 32).to(tl.uint32),
                                   tl.zeros_like(lanes).to(tl.uint32) + s_lo,
                                   tl.zeros_like(lanes).to(tl.uint32) + s_hi)
        u0, u1 = _unit64(w0, w1), _unit64(w2, w3)
        if kind == 0:
            span = p1 - p0
            v0, v1 = p0 + span * u0, p0 + span * u1
        elif kind == 1:
            r = tl.sqrt(tl.log(u0) * _f64(-2.0))
            s, c = _sincos_2pi_f64(_index64(w2, w3))
            v0, v1 = p0 + p1 * (r * c), p0 + p1 * (r * s)
        elif kind == 2:
            v0 = _trunc_f64(u0, p0, p1, p2, p3, p4, p5, p6, p7, LIBDEVICE)
            v1 = _trunc_f64(u1, p0, p1, p2, p3, p4, p5, p6, p7, LIBDEVICE)
        else:
            v0 = tl.zeros_like(u0) + p0
            v1 = v0
        vals = tl.reshape(tl.join(v0, v1), [2 * BLOCK_B])  # element 2 b + r takes value r of block b
        offs = start + step + tl.arange(0, 2 * BLOCK_B).to(tl.int64)
        tl.store(out + offs, vals, mask=offs < tl.minimum(n, start + CHUNK_ELEMS))


@triton.jit
def _values32(seed, blk, s_lo, s_hi, kind, p0, p1, p2, p3, p4, p5, BLOCK_B: tl.constexpr):
    """The 4 * BLOCK_B values of Philox blocks blk (float32), element 4 b + r being word r of block b."""
    w0, w1, w2, w3 = tl.philox(seed, (blk & 0xFFFFFFFF).to(tl.uint32), (blk >> 32).to(tl.uint32),
                               tl.zeros_like(blk).to(tl.uint32) + s_lo, tl.zeros_like(blk).to(tl.uint32) + s_hi)
    u0, u1, u2, u3 = _unit(w0), _unit(w1), _unit(w2), _unit(w3)
    if kind == 0:  # uniform(p0, p1)
        span = p1 - p0
        v0, v1, v2, v3 = p0 + span * u0, p0 + span * u1, p0 + span * u2, p0 + span * u3
    elif kind == 1:  # normal(p0, p1), Box-Muller on word pairs (0, 1) and (2, 3)
        a01 = p1 * tl.sqrt_rn(-2.0 * _log_f32(u0))
        s01, c01 = _sincos_2pi(w1)
        a23 = p1 * tl.sqrt_rn(-2.0 * _log_f32(u2))
        s23, c23 = _sincos_2pi(w3)
        mean = tl.broadcast_to(p0, u0.shape)
        v0, v1 = _fma(a01, c01, mean), _fma(a01, s01, mean)
        v2, v3 = _fma(a23, c23, mean), _fma(a23, s23, mean)
    elif kind == 2:  # truncated normal: inverse CDF, then clamp to [p2, p3]
        span = tl.broadcast_to(p1 - p0, u0.shape)
        lo, mean, scale = tl.broadcast_to(p0, u0.shape), tl.broadcast_to(p4, u0.shape), tl.broadcast_to(p5, u0.shape)
        v0 = tl.minimum(tl.maximum(_fma(scale, _erfinv_f32(_fma(span, u0, lo)), mean), p2), p3)
        v1 = tl.minimum(tl.maximum(_fma(scale, _erfinv_f32(_fma(span, u1, lo)), mean), p2), p3)
        v2 = tl.minimum(tl.maximum(_fma(scale, _erfinv_f32(_fma(span, u2, lo)), mean), p2), p3)
        v3 = tl.minimum(tl.maximum(_fma(scale, _erfinv_f32(_fma(span, u3, lo)), mean), p2), p3)
    else:  # constant p0
        v0 = tl.zeros_like(u0) + p0
        v1, v2, v3 = v0, v0, v0
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), [4 * BLOCK_B])


@triton.jit
def _philox_fill_kernel(base_ptr, offset_ptr, numel_ptr, start_ptr, stream_ptr, kind_ptr, param_ptr, seed,
                        OUT_DTYPE: tl.constexpr, CHUNK_ELEMS: tl.constexpr, BLOCK_B: tl.constexpr,
                        ALIGNED: tl.constexpr, VEC: tl.constexpr, LIBDEVICE: tl.constexpr):
    """One chunk of one tensor per program. The tensor is addressed as base_ptr + its element offset
    (a pointer read from memory would carry no alignment); ALIGNED (every tensor of the launch 16-byte
    aligned): the offset is declared a multiple of VEC elements, so the unmasked whole steps store
    16-byte vectors, and only the chunk's last partial step is masked."""
    pid = tl.program_id(0).to(tl.int64)
    offset = tl.load(offset_ptr + pid)
    start = tl.load(start_ptr + pid)
    if ALIGNED:
        offset = tl.multiple_of(offset, VEC)
        start = tl.multiple_of(start, 4 * BLOCK_B)
    out = base_ptr + offset
    n = tl.load(numel_ptr + pid)
    stream = tl.load(stream_ptr + pid)
    kind = tl.load(kind_ptr + pid)
    p0 = tl.load(param_ptr + 8 * pid + 0)
    p1 = tl.load(param_ptr + 8 * pid + 1)
    p2 = tl.load(param_ptr + 8 * pid + 2)
    p3 = tl.load(param_ptr + 8 * pid + 3)
    p4 = tl.load(param_ptr + 8 * pid + 4)
    p5 = tl.load(param_ptr + 8 * pid + 5)
    s_lo = (stream & 0xFFFFFFFF).to(tl.uint32)
    s_hi = (stream >> 32).to(tl.uint32)
    if OUT_DTYPE == tl.float64:
        p6 = tl.load(param_ptr + 8 * pid + 6)
        p7 = tl.load(param_ptr + 8 * pid + 7)
        _philox_fill_f64(out, n, start, s_lo, s_hi, kind, p0, p1, p2, p3, p4, p5, p6, p7, seed, CHUNK_ELEMS,
                         BLOCK_B, LIBDEVICE)
        return
    lanes = tl.arange(0, BLOCK_B).to(tl.int64)
    end = tl.minimum(n, start + CHUNK_ELEMS)
    full_end = start + (end - start) // (4 * BLOCK_B) * (4 * BLOCK_B)
    for first in range(start, full_end, 4 * BLOCK_B):  # whole steps: no mask
        vals = _values32(seed, first // 4 + lanes, s_lo, s_hi, kind, p0, p1, p2, p3, p4, p5, BLOCK_B)
        tl.store(out + first + tl.arange(0, 4 * BLOCK_B).to(tl.int64), vals.to(OUT_DTYPE))
    if full_end < end:
        vals = _values32(seed, full_end // 4 + lanes, s_lo, s_hi, kind, p0, p1, p2, p3, p4, p5, BLOCK_B)
        offs = full_end + tl.arange(0, 4 * BLOCK_B).to(tl.int64)
        tl.store(out + offs, vals.to(OUT_DTYPE), mask=offs < end)


def _fill_launch(tensors, seed, streams, kinds, params):
    """Fill each (contiguous, same device and dtype) tensor with its distribution; one launch per
    alignment group (16-byte aligned tensors, almost always all of them, and the rest)."""
    if not tensors:
        return
    dtype, device = tensors[0].dtype, tensors[0].device
    for i, t in enumerate(tensors):
        if not t.is_contiguous() or t.dtype != dtype or t.device != device:
            raise ValueError("philox_fill_ (triton): tensor %d must be contiguous, %s, on %s" % (i, dtype, device))
        if t.data_ptr() % t.element_size():
            raise ValueError("philox_fill_ (triton): tensor %d's address is not a multiple of its element size"
                             % i)
    # float64 tensors take their parameters unrounded (the full-precision stream)
    prm_all = torch.tensor(params, dtype=torch.float64 if dtype == torch.float64 else torch.float32).view(-1, 8)
    aligned = [i for i, t in enumerate(tensors) if t.data_ptr() % 16 == 0]
    groups = [(aligned, True)]
    if len(aligned) < len(tensors):
        groups.append(([i for i, t in enumerate(tensors) if t.data_ptr() % 16], False))
    block_b = 64 if INTERPRET else 1024
    for members, flag in groups:
        group = [tensors[i] for i in members]
        if not any(t.numel() for t in group):
            continue
        table, idx = chunk_table(group, CHUNK, per_tensor=([streams[i] for i in members], [kinds[i] for i in members]))
        base = group[0]
        table[0] = (table[0] - base.data_ptr()) // base.element_size()
        prm = prm_all[torch.tensor(members, dtype=torch.int64)[idx]].contiguous()
        table, prm_t = upload(table, device), upload(prm, device)
        with device_guard(device):
            _philox_fill_kernel[(idx.numel(),)](base, table[0], table[1], table[2], table[3], table[4], prm_t, seed,
                                                OUT_DTYPE=tl_dtype(dtype), CHUNK_ELEMS=CHUNK, BLOCK_B=block_b,
                                                ALIGNED=flag, VEC=16 // base.element_size(), LIBDEVICE=not INTERPRET,
                                                num_warps=8,
                                                enable_fp_fusion=False)


# ------------------------------------------------------------------------------------------------
# Registration: an opaque custom op (the launch reads data pointers), with a fake kernel.

@torch.library.custom_op("torchfast::philox_fill_triton_", mutates_args=("tensors",))
def philox_fill_(tensors: List[torch.Tensor], seed: int, streams: List[int], kinds: List[int],
                 params: List[float]) -> None:
    _fill_launch(tensors, seed, streams, kinds, params)


@philox_fill_.register_fake
def _(tensors, seed, streams, kinds, params):
    return None


__all__ = ["philox_fill_", "UNIFORM", "NORMAL", "TRUNC_NORMAL", "CONSTANT"]
