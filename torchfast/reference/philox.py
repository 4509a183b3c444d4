"""torchfast's counter-based random stream in pure PyTorch: the definition every backend follows.

Philox4x32-10 with

    key     = (seed mod 2^32, seed >> 32)
    counter = (block mod 2^32, block >> 32, stream mod 2^32, stream >> 32)

where ``stream`` is the position of the tensor in the batch and ``block = i // 4`` for element ``i``
of the tensor in row-major logical order; element ``i`` takes output word ``i % 4``. All integer
arithmetic here is done in int64 on values below 2^48, so it is exact on every device.

Distributions in float32, each operation rounded on its own; fma(a, b, c) is the fused multiply-add,
a * b + c rounded once (IEEE 754 fusedMultiplyAdd: every backend has it exactly):

* unit uniform of a word w:  u = ((w >> 9) * 2 + 1) * 2**-24, in (0, 1), exact in float32
* uniform(lo, hi):           lo + (hi - lo) * u  (a multiply and an add, not an fma)
* normal(mean, std):         Box-Muller over word pairs (0, 1) and (2, 3) of a block:
                             r = sqrt(-2 log u0), a = std * r, value0 = fma(a, cos(2 pi u1), mean),
                             value1 = fma(a, sin(2 pi u1), mean), log = log_f32 and (sin, cos) =
                             sincos_2pi below (not libm's: the same bits on every backend)
* trunc_normal:              t = fma(hi - lo, u, lo) with lo, hi = 2 Phi(alpha) - 1, 2 Phi(beta) - 1;
                             value = clamp(fma(std * sqrt(2), erfinv(t), mean), a, b), erfinv in
                             float32 by Giles' single-precision approximation (Horner with fma) with
                             log_f32 (no rejection, no host sync);
                             bounds beyond 6 std use the normal stream instead (torchfast.init)
float64 tensors take a full-precision variant of each (values_f64 below).
"""
import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF

UNIFORM, NORMAL, TRUNC_NORMAL, CONSTANT = 0, 1, 2, 3

# Giles' erfinv coefficients, single precision, central (w < 5) and tail branches.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
                   -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
                -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant a and the uint32 values b."""
    bh, bl = b >> 16, b & 0xFFFF
    p = a * bh                      # < 2^48
    s = ((p & 0xFFFF) << 16) + a * bl  # < 2^49
    return (p >> 16) + (s >> 32), s & MASK32


def philox4x32(seed: int, blocks: torch.Tensor, stream: int):
    """The four output words (int64 tensors holding uint32 values) for each block index."""
    c0, c1 = blocks & MASK32, blocks >> 32
    c2 = torch.full_like(blocks, stream & MASK32)
    c3 = torch.full_like(blocks, (stream >> 32) & MASK32)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1, c2, c3


def word_to_unit(w: torch.Tensor) -> torch.Tensor:
    return (((w >> 9) * 2 + 1).to(torch.float64) * 2.0 ** -24).to(torch.float32)


# log_f32 and sincos_2pi below: log, sin and cos of the float32 distributions, built from +, -, *, fma
# and integer operations only, so that every backend computes the same bits (libm's logf/sinf/cosf
# differ between CPU and GPU libraries). The constants are float32 values. Polynomials are evaluated
# by Horner's rule with one fma per coefficient.
#
# log: minimax coefficients (highest power first) of Q(f) = (log(1 + f) - f) / f^2 on
# [sqrt(1/2) - 1, sqrt(2) - 1], degree 8.
_LOG_Q = tuple(float.fromhex(h) for h in (
    "-0x1.417a50p-4", "0x1.06690cp-3", "-0x1.0c6052p-3", "0x1.229ea6p-3", "-0x1.5487dep-3", "0x1.99a394p-3",
    "-0x1.000208p-2", "0x1.55554ep-2", "-0x1.fffffep-2"))
_LN2 = float.fromhex("0x1.62e430p-1")  # log(2) rounded to float32
# sin(pi r) = r P(r^2) and cos(pi r) = C(r^2) on |r| <= 1/4: minimax coefficients, highest power first.
_SIN_PI = tuple(float.fromhex(h) for h in ("-0x1.2d9bb8p-1", "0x1.465ec6p+1", "-0x1.4abbbap+2", "0x1.921fb6p+1"))
_COS_PI = tuple(float.fromhex(h) for h in ("0x1.d9c366p-3", "-0x1.55c57cp+0", "0x1.03c1dcp+2", "-0x1.3bd3ccp+2",
                                           "0x1.000000p+0"))


def fma_f32(a, b, c) -> torch.Tensor:
    """fma(a, b, c) on float32 values (tensors or floats), rounded once, exactly as the hardware's
    (std::fma, __fmaf_rn, tl.fma, vfmadd). PyTorch has no fused float32 multiply-add, so: the float64
    product of two float32 values is exact; the float64 sum p + c is made round-to-odd (its exact error
    from TwoSum; an inexact, even result moves one ulp towards the exact sum); a round-to-odd value with
    53 bits rounds to float32's 24 correctly (Boldo and Melquiond, 2008)."""
    like = next(x for x in (a, b, c) if torch.is_tensor(x))
    a, b, c = (x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float32, device=like.device)
               for x in (a, b, c))
    a, b, c = a.double(), b.double(), c.double()
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    fix = (err != 0) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where(fix, torch.nextafter(s, toward), s).float()


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE sqrt, as sqrtf, __fsqrt_rn and tl.sqrt_rn):
    torch.sqrt's vectorised CPU float32 kernel can be one ulp off. The float64 root of a float32
    value rounds correctly to float32."""
    return torch.sqrt(x.double()).float()


def _horner(x: torch.Tensor, coeffs) -> torch.Tensor:
    p = torch.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        p = fma_f32(p, x, c)
    return p


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of 0 (-inf) or positive normal float32 values: with the bits b, e = (b - bits(sqrt(1/2)))
    >> 23 (arithmetic shift) and m = float(b - (e << 23)) in [sqrt(1/2), sqrt(2)), so x = 2^e m exactly;
    f = m - 1 (exact), log m = fma(f Q(f), f, f), log x = fma(e, ln2, log m). Within 0.82 ulp."""
    bits = x.view(torch.int32)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).view(torch.float32)
    f = m - 1.0
    out = fma_f32(e.to(torch.float32), _LN2, fma_f32(f * _horner(f, _LOG_Q), f, f))
    return torch.where(x == 0, torch.full_like(out, float("-inf")), out)


def sincos_2pi(w: torch.Tensor):
    """(sin, cos) of 2 pi u for the unit values u of words w, from the words: n = 2 (w >> 9) + 1,
    2u = n 2^-23 = q / 2 + r with q = round(4u) and r = (n - q 2^22) 2^-23 in [-1/4, 1/4] (exact),
    sin(pi r) = r P(r^2), cos(pi r) = C(r^2), then quadrant q's swap and signs."""
    n = (w >> 9) * 2 + 1
    q = (n + (1 << 21)) >> 22
    r = (n - (q << 22)).to(torch.float32) * 2.0 ** -23
    t = r * r
    sp = _horner(t, _SIN_PI) * r
    cp = _horner(t, _COS_PI)
    odd = (q & 1) == 1
    a, b = torch.where(odd, cp, sp), torch.where(odd, sp, cp)
    return torch.where((q & 2) == 2, -a, a), torch.where(((q + 1) & 2) == 2, -b, b)


def erfinv_f32(x: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=x.device)
    w = -log_f32((one - x) * (one + x))
    central = w < 5.0
    pc = _horner(w - 2.5, _ERFINV_CENTRAL)
    pt = _horner(sqrt_rn(w) - 3.0, _ERFINV_TAIL)
    return torch.where(central, pc, pt) * x


def _f32(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def values(seed: int, stream: int, start: int, count: int, kind: int, params, device) -> torch.Tensor:
    """float32 values of elements [start, start + count) of one tensor's stream; start % 4 == 0."""
    if kind == CONSTANT:
        return torch.full((count,), params[0], dtype=torch.float32, device=device)
    nblk = (count + 3) // 4
    blocks = torch.arange(start // 4, start // 4 + nblk, dtype=torch.int64, device=device)
    w = torch.stack(philox4x32(seed, blocks, stream), dim=1)  # (nblk, 4)
    u = word_to_unit(w)
    if kind == UNIFORM:
        lo, hi = _f32(params[0], device), _f32(params[1], device)
        v = lo + (hi - lo) * u
    elif kind == NORMAL:
        mean, std = _f32(params[0], device), _f32(params[1], device)
        a = std * sqrt_rn(log_f32(u[:, 0::2]) * -2.0)
        sin, cos = sincos_2pi(w[:, 1::2])
        v = torch.stack((fma_f32(a, cos, mean), fma_f32(a, sin, mean)), dim=2).reshape(nblk, 4)
    elif kind == TRUNC_NORMAL:
        lo, hi = _f32(params[0], device), _f32(params[1], device)
        a, b = _f32(params[2], device), _f32(params[3], device)
        mean, scale = _f32(params[4], device), _f32(params[5], device)
        v = torch.minimum(torch.maximum(fma_f32(scale, erfinv_f32(fma_f32(hi - lo, u, lo)), mean), a), b)
    else:
        raise ValueError("unknown init kind %r" % (kind,))
    return v.reshape(-1)[:count]


# float64 tensors: full precision. Element i takes block i // 2 and the word pair (2 (i % 2), 2 (i % 2) + 1)
# as the 64-bit W = w_even << 32 | w_odd; u = ((W >> 11) * 2 + 1) * 2**-54, exactly, in (0, 1). Every
# operation is a float64 operation rounded on its own:
#   uniform:      lo + (hi - lo) * u
#   normal:       Box-Muller on the block's two values: r = sqrt(-2 log u0), z0 = r cos(2 pi u1),
#                 z1 = r sin(2 pi u1), value = mean + std * z, with sin and cos the stream's own
#                 (sincos_2pi_unit64) and log the math library's
#   trunc_normal: params (lo, span, a, b, mean, std sqrt(2), qlo, qhi): lo = erf(alpha'),
#                 span = erf(beta') - lo, qlo = erfc(-alpha') = 1 + lo, qhi = erfc(beta'), each at its own
#                 relative precision (torchfast.init._params_f64); the drawn point t = lo + span u and
#                 its distances from -1 and 1, dl = qlo + span u and dh = qhi + span (1 - u) (sums of
#                 positive terms: nothing cancels in the tails); d = min(dl, dh), z = erfinv_f64(t, d),
#                 negative when (t < 0 if d >= 1/2 else dl < dh);
#                 value = clamp(mean + std sqrt(2) (-z if negative else z), a, b)
TWO_OVER_SQRT_PI = 1.1283791670955126
SQRT_PI = 1.7724538509055159

# Taylor coefficients of sin(pi r) (odd powers, r^1 .. r^19) and cos(pi r) (even powers, r^0 .. r^18),
# each the float64 nearest to pi^k / k! with its sign.
_SIN_PI_F64 = tuple(float.fromhex(h) for h in (
    "0x1.921fb54442d18p+1", "-0x1.4abbce625be53p+2", "0x1.466bc6775aae2p+1", "-0x1.32d2cce62bd86p-1",
    "0x1.50783487ee782p-4", "-0x1.e3074fde8871fp-8", "0x1.e8f434d018d63p-12", "-0x1.6fadb9f155744p-16",
    "0x1.aaec32af93359p-21", "-0x1.8a404211f9547p-26"))
_COS_PI_F64 = tuple(float.fromhex(h) for h in (
    "0x1.0000000000000p+0", "-0x1.3bd3cc9be45dep+2", "0x1.03c1f081b5ac4p+2", "-0x1.55d3c7e3cbffap+0",
    "0x1.e1f506891babbp-3", "-0x1.a6d1f2a204a8cp-6", "0x1.f9d38a3763cc3p-10", "-0x1.b6e24f44b128fp-14",
    "0x1.20c62c2f2d7f5p-18", "-0x1.2a0c591af8314p-23"))


def unit64_index(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """k = (hi << 32 | lo) >> 11 from two uint32 words held in int64: the unit value is (2k + 1) 2^-54."""
    return (hi << 21) | (lo >> 11)  # < 2^53: fits int64


def word_pair_to_unit64(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """(hi << 32 | lo) >> 11 from two uint32 words held in int64, as (2k + 1) 2^-54 in float64."""
    return (unit64_index(hi, lo) * 2 + 1).to(torch.float64) * 2.0 ** -54


def sincos_2pi_unit64(k: torch.Tensor):
    """(sin, cos) of 2 pi u for u = (2k + 1) 2^-54: n = 2k + 1, 2u = n 2^-53 = q / 2 + r with
    q = round(4u) and r = (n - q 2^52) 2^-53 in [-1/4, 1/4], both exact; Taylor polynomials of sin(pi r)
    and cos(pi r) in float64, then the quadrant's swap and signs. Within 1.6 ulp."""
    n = k * 2 + 1
    q = (n + (1 << 51)) >> 52
    r = (n - q * (1 << 52)).to(torch.float64) * 2.0 ** -53
    t = r * r
    sp = torch.full_like(r, _SIN_PI_F64[-1])
    cp = torch.full_like(r, _COS_PI_F64[-1])
    for cs, cc in zip(reversed(_SIN_PI_F64[:-1]), reversed(_COS_PI_F64[:-1])):
        sp = sp * t + cs
        cp = cp * t + cc
    sp = sp * r
    quadrant = q & 3
    odd = (quadrant & 1) == 1
    a, b = torch.where(odd, cp, sp), torch.where(odd, sp, cp)
    s = torch.where((quadrant & 2) == 2, -a, a)
    c = torch.where((quadrant == 1) | (quadrant == 2), -b, b)
    return s, c


def erfinv_f64(t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|erfinv(t)| in float64, given t (exact near 0) and d, its distance from the nearer of -1 and 1
    (exact near the poles). In the body (d >= 1/2) Newton runs on erf(z) = |t|, in the tails on
    erfc(z) = d, which keeps its relative precision however small d is. Start point: Giles'
    single-precision polynomial evaluated in float64 (w = -log((1 - x)(1 + x)), x = |t|) where w < 5,
    the asymptotic sqrt(-log(d sqrt(pi) sqrt(-log d))) beyond; then four Newton steps. Relative error
    below 1e-15 from the body to d = 1e-300."""
    central = d >= 0.5
    x = torch.where(central, t.abs(), 1.0 - d)
    q = torch.where(central, 1.0 - x, d)
    w = -torch.log(q * (1.0 + x))
    pc = torch.full_like(x, _ERFINV_CENTRAL[0])
    for c in _ERFINV_CENTRAL[1:]:
        pc = pc * (w - 2.5) + c
    tail = torch.sqrt(-torch.log(q * torch.sqrt(-torch.log(q)) * SQRT_PI))
    z = torch.where(w < 5.0, pc * x, tail)
    for _ in range(4):
        r = torch.where(central, torch.erf(z) - x, q - torch.special.erfc(z))
        z = z - r / (TWO_OVER_SQRT_PI * torch.exp(-(z * z)))
    return z


def values_f64(seed: int, stream: int, start: int, count: int, kind: int, params, device) -> torch.Tensor:
    """float64 values of elements [start, start + count) of one tensor's stream; start % 2 == 0."""
    if kind == CONSTANT:
        return torch.full((count,), params[0], dtype=torch.float64, device=device)
    nblk = (count + 1) // 2
    blocks = torch.arange(start // 2, start // 2 + nblk, dtype=torch.int64, device=device)
    w0, w1, w2, w3 = philox4x32(seed, blocks, stream)
    u = torch.stack((word_pair_to_unit64(w0, w1), word_pair_to_unit64(w2, w3)), dim=1)  # (nblk, 2)
    p = [torch.tensor(float(v), dtype=torch.float64, device=device) for v in params]
    if kind == UNIFORM:
        v = p[0] + (p[1] - p[0]) * u
    elif kind == NORMAL:
        r = torch.sqrt(torch.log(u[:, 0]) * -2.0)
        s, c = sincos_2pi_unit64(unit64_index(w2, w3))
        v = p[0] + p[1] * torch.stack((r * c, r * s), dim=1)
    elif kind == TRUNC_NORMAL:
        t = p[0] + p[1] * u
        dl = p[6] + p[1] * u
        dh = p[7] + p[1] * (1.0 - u)
        d = torch.minimum(dl, dh)
        z = erfinv_f64(t, d)
        negative = torch.where(d >= 0.5, t < 0, dl < dh)
        v = torch.minimum(torch.maximum(p[4] + p[5] * torch.where(negative, -z, z), p[2]), p[3])
    else:
        raise ValueError("unknown init kind %r" % (kind,))
    return v.reshape(-1)[:count]


# Elements generated per step, so a large tensor never needs many int64 temporaries at once.
_STEP = 1 << 20


def philox_fill_(tensors, seed, streams, kinds, params):
    """Reference for torch.ops.torchfast.philox_fill_: fills each tensor (any layout) in place."""
    with torch.no_grad():
        for i, t in enumerate(tensors):
            p = params[8 * i: 8 * i + 8]
            n = t.numel()
            f64 = t.dtype == torch.float64
            gen = values_f64 if f64 else values
            flat = torch.empty(n, dtype=torch.float64 if f64 else torch.float32, device=t.device)
            for s in range(0, n, _STEP):
                flat[s: s + _STEP] = gen(seed, streams[i], s, min(_STEP, n - s), kinds[i], p, t.device)
            t.copy_(flat.view(t.shape))
