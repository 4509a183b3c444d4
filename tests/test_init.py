"""Batched Philox init: the stream's definition, distributions, formulas, reproducibility."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchfast
from torchfast import init as tfi
from torchfast.reference import philox

from conftest import FLOAT_DTYPES, backend_params, requires_cuda, skip_unsupported


def test_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10 with counter 0 and key 0.
    words = philox.philox4x32(0, torch.zeros(1, dtype=torch.int64), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_unit_uniform_is_open_and_exact():
    w = torch.tensor([0, 511, 512, 0xFFFFFFFF], dtype=torch.int64)
    u = philox.word_to_unit(w)
    assert u[0].item() == 2.0 ** -24 and u[1].item() == 2.0 ** -24
    assert u[2].item() == 3 * 2.0 ** -24
    assert u[3].item() == 1 - 2.0 ** -24


SHAPES = [(13, 7), (5, 3, 3, 3), (1001,), (1,), (2, 3)]


def _tensors(dtype, device):
    return [torch.empty(s, dtype=dtype, device=device) for s in SHAPES]


_REFUSED = [("uniform_", (1.0, 0.0), {}), ("uniform_", (0.0, math.inf), {}), ("uniform_", (math.nan, 1.0), {}),
            ("uniform_", (-1e300, 1e300), {}), ("uniform_", (-3e38, 3e38), {}), ("uniform_", (-6e4, 6e4), {}),
            ("uniform_", (-1e6, 1e6), {}), ("normal_", (0.0, -1.0), {}), ("normal_", (0.0, math.nan), {}),
            ("trunc_normal_", (0.0, 1.0, 1.0, -1.0), {}), ("xavier_uniform_", (), {"gain": -1.0}),
            ("xavier_normal_", (), {"gain": -1.0}), ("sparse_", (0.5,), {"std": -1.0}),
            # accepted by both
            ("uniform_", (1.0, 1.0), {}), ("normal_", (0.0, 0.0), {}), ("normal_", (math.inf, 1.0), {})]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(_REFUSED)))
def test_arguments_refused_as_stock(dtype, case):
    """Every fill torch.nn.init refuses (a bound outside the dtype's range, a > b, b - a past the
    dtype's max, a negative or NaN std, a negative gain) is refused with its exception and message,
    per dtype, and leaves the tensor as it was; what it accepts is accepted. Inside fast_init too."""
    name, args, kwargs = _REFUSED[case]

    def outcome(fn):
        t = torch.full((4, 4), 7.0, dtype=dtype)
        try:
            fn(t, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            assert torch.equal(t, torch.full((4, 4), 7.0, dtype=dtype))
            return type(e), str(e)
        return "accepted"

    want = outcome(getattr(nn.init, name))
    assert outcome(getattr(tfi, name)) == want
    with tfi.fast_init(seed=0):
        assert outcome(getattr(nn.init, name)) == want


_ALL_FILLS = [("uniform_", (-0.5, 2.0)), ("normal_", (1.0, 2.0)), ("trunc_normal_", (0.0, 1.0, -1.0, 0.5)),
              ("trunc_normal_", (0.0, 1.0, 0.5, 1.0)), ("xavier_uniform_", ()), ("xavier_normal_", ()),
              ("kaiming_uniform_", ()), ("kaiming_normal_", ()), ("orthogonal_", ()), ("sparse_", (0.5,)),
              ("constant_", (3,)), ("ones_", ()), ("zeros_", ())]


def _outcome(fn, t, args):
    """(exception type, message) or, when accepted, the tensor's dtype."""
    try:
        fn(t, *args)
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return t.dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.complex128], ids=str)
@pytest.mark.parametrize("name,args", _ALL_FILLS, ids=[n for n, _ in _ALL_FILLS])
def test_other_dtypes_as_stock(dtype, name, args):
    """Integer, bool and complex tensors get stock's result or stock's exception (type and message):
    integer random fills raise NotImplementedError (an empty one may pass, as stock's normal_ does),
    complex trunc_normal_ and orthogonal_ raise, every other complex fill is accepted."""
    for shape in ((6, 5), (0, 5)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-element and 2-std warnings: the same for both
            want = _outcome(getattr(nn.init, name), torch.zeros(shape, dtype=dtype), args)
            assert _outcome(getattr(tfi, name), torch.zeros(shape, dtype=dtype), args) == want, shape


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.complex32], ids=str)
def test_complex_fills_follow_stock_distributions(dtype):
    """Complex tensors are filled through their real view with torchfast's stream, as stock fills them:
    U(a, b) and N(mean, std^2 / 2) for each of the real and imaginary parts; seeded, reproducible."""
    n = 100_000
    t = tfi.uniform_(torch.empty(n, dtype=dtype), -1.0, 3.0, seed=5)
    parts = torch.view_as_real(t).double()
    assert parts.min() >= -1.0 and parts.max() < 3.0
    assert abs(parts.mean() - 1.0) < 0.03 and abs(parts.std() - 4 / math.sqrt(12)) < 0.03
    assert torch.equal(torch.view_as_real(t), torch.view_as_real(tfi.uniform_(torch.empty(n, dtype=dtype), -1.0, 3.0,
                                                                               seed=5)))
    t = tfi.normal_(torch.empty(n, dtype=dtype), 5.0, 2.0, seed=6)
    for part in (t.real.double(), t.imag.double()):
        assert abs(part.mean() - 5.0) < 0.03 and abs(part.std() - math.sqrt(2.0)) < 0.03
    assert torch.corrcoef(torch.stack([t.real.double(), t.imag.double()]))[0, 1].abs() < 0.02
    w = tfi.kaiming_normal_(torch.empty(400, 300, dtype=dtype), seed=7)
    want = math.sqrt(2.0 / 300)  # stock: the complex N(0, std^2) of kaiming_normal_
    assert abs(w.abs().pow(2).mean().sqrt().item() - want) < 0.02 * want
    if dtype != torch.complex32:
        s = tfi.sparse_(torch.empty(40, 30, dtype=dtype), 0.25, seed=8)
        assert ((s == 0).sum(0) == 10).all()
        # a complex layer's defaults, from reset_parameters and inside fast_init, as its own reset_parameters
        bound = 1 / math.sqrt(300)  # kaiming_uniform_(a=sqrt(5)) over fan_in 300
        lin = tfi.reset_parameters(nn.Linear(300, 200, dtype=dtype), seed=9)
        with tfi.fast_init(seed=10):
            built = nn.Linear(300, 200, dtype=dtype)
        for w in (lin.weight, built.weight):
            parts = torch.view_as_real(w.detach()).double()
            assert parts.abs().max() <= bound and abs(parts.std().item() - bound / math.sqrt(3)) < 0.02 * bound


def test_constants_fill_expanded_tensors_as_stock():
    """zeros_/ones_/constant_ write an expanded (stride-0) tensor as stock's fill_ does; random fills
    refuse it with stock's error."""
    for name, args in (("zeros_", ()), ("ones_", ()), ("constant_", (2.5,))):
        base = torch.full((3,), 7.0)
        out = getattr(tfi, name)(base.expand(4, 3), *args)
        assert out.stride() == (0, 1) and torch.equal(base, getattr(nn.init, name)(torch.empty(3), *args))
    for name, args in (("uniform_", ()), ("normal_", ()), ("xavier_uniform_", ())):
        want = _outcome(getattr(nn.init, name), torch.zeros(3).expand(4, 3), args)
        assert want[0] is RuntimeError
        assert _outcome(getattr(tfi, name), torch.zeros(3).expand(4, 3), args) == want


@pytest.mark.parametrize("name,args", _ALL_FILLS, ids=[n for n, _ in _ALL_FILLS])
def test_inference_tensors_as_stock(name, args):
    """An inference tensor is refused outside inference_mode with stock's error, before anything is
    written (stock's random fills have written it by then), and filled inside it."""
    with torch.inference_mode():
        t = torch.full((6, 5), 7.0)
        stock_t = torch.full((6, 5), 7.0)
    want = _outcome(getattr(nn.init, name), stock_t, args)
    assert want[0] is RuntimeError and "inference tensor" in want[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _outcome(getattr(tfi, name), t, args) == want
        assert torch.equal(t, torch.full((6, 5), 7.0))
        with torch.inference_mode():
            getattr(tfi, name)(t, *args)
    assert not torch.equal(t, torch.full((6, 5), 7.0))


class _Logged(torch.Tensor):
    """A __torch_function__ subclass that records what it is asked to do."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name,args", _ALL_FILLS, ids=[n for n, _ in _ALL_FILLS])
def test_torch_function_subclasses_see_stock_calls(name, args):
    """A tensor subclass with its own __torch_function__ is handed to torch.nn.init's function, so it
    sees the calls stock makes (uniform_/normal_/constant_/kaiming_uniform_ themselves, or the Tensor
    methods the others call), and gets a tensor of its class back; seed= still makes it reproducible."""
    def run(fn, **kw):
        _Logged.seen = []
        t = torch.zeros(6, 5).as_subclass(_Logged)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(t, *args, **kw)
        return out, list(_Logged.seen)

    random = name not in ("constant_", "ones_", "zeros_")
    kw = (lambda: dict(generator=torch.Generator().manual_seed(9))) if random else dict  # (trunc_normal_ rejects)
    want_out, want_seen = run(getattr(nn.init, name), **kw())
    out, seen = run(getattr(tfi, name), **kw())
    assert seen == want_seen and type(out) is _Logged
    if name != "sparse_":  # (stock's sparse_ picks its zeroed rows with the global generator)
        assert torch.equal(out.as_subclass(torch.Tensor), want_out.as_subclass(torch.Tensor))
    if random and name != "sparse_":  # (stock's sparse_ picks its zeroed rows with the global generator)
        a, _ = run(getattr(tfi, name), seed=11)
        b, _ = run(getattr(tfi, name), seed=11)
        assert torch.equal(a, b)
    # Parameters and plain tensors never take that path (they are filled by torchfast's stream)
    p = nn.Parameter(torch.zeros(6, 5))
    if random:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(tfi, name)(p, *args, seed=3)
            q = getattr(tfi, name)(torch.zeros(6, 5), *args, seed=3)
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("a,b", [(0.0, 1.0), (-1.0, 1.0), (-5.0, 0.0), (-0.3, 0.3), (1000.0, 1001.0), (-2.0, -1.0)])
def test_half_uniform_never_reaches_b(device, backend, dtype, a, b):
    """uniform_ on float16/bfloat16 stays below b, as stock's does (float32 values within half a step of
    b used to round up to it), and the step just below b keeps its full share of the values."""
    skip_unsupported(backend, "init", device, dtype)
    n = 1 << 20 if backend != "triton" else 1 << 14  # (the Triton interpreter is slow)
    with torchfast.use_backend(backend):
        t = tfi.uniform_(torch.empty(n, dtype=dtype, device=device), a, b, seed=21)
    t = t.double().cpu()
    assert t.max() < b and t.min() >= torch.tensor(a, dtype=dtype).double()
    values, counts = t.unique(return_counts=True)
    step = (values[-1] - values[-2]).item() if values.numel() > 2 else 0.0
    if values.numel() > 2 and step * n / (b - a) > 400:  # the top step holds as many values as the one below
        assert 0.8 < counts[-1] / counts[-2] < 1.25, (counts[-1].item(), counts[-2].item())
    assert torch.equal(t, tfi.uniform_(torch.empty(n, dtype=dtype, device=device), a, b, seed=21).double().cpu())


@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_trunc_normal_negative_std_as_stock(device, backend, dtype):
    """trunc_normal_ with a negative std draws N(mean, std^2) truncated to [a, b], as stock's rejection
    sampler does (the same values as |std|), on every backend."""
    skip_unsupported(backend, "init", device, dtype)
    n = 50_000 if backend != "triton" else 1024  # (the Triton interpreter is slow)
    with torchfast.use_backend(backend):
        neg = tfi.trunc_normal_(torch.empty(n, dtype=dtype, device=device), 0.5, -1.0, -1.0, 2.0, seed=4)
        pos = tfi.trunc_normal_(torch.empty(n, dtype=dtype, device=device), 0.5, 1.0, -1.0, 2.0, seed=4)
    assert torch.equal(neg, pos)
    assert neg.min() >= -1.0 and neg.max() <= 2.0
    stock = nn.init.trunc_normal_(torch.empty(n, dtype=torch.float64), 0.5, -1.0, -1.0, 2.0)
    assert abs(neg.double().mean().item() - stock.mean().item()) < 4 * 0.75 / math.sqrt(n)  # (4 sd)


def _trunc_normal_mean(mean, std, a, b):
    """E[X] of N(mean, std^2) truncated to [a, b], with the tail probabilities from erfc (no cancellation)."""
    al, be = (a - mean) / std, (b - mean) / std
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    if al >= 0:
        mass = (math.erfc(al / math.sqrt(2)) - math.erfc(be / math.sqrt(2))) / 2
    elif be <= 0:
        mass = (math.erfc(-be / math.sqrt(2)) - math.erfc(-al / math.sqrt(2))) / 2
    else:
        mass = (math.erf(be / math.sqrt(2)) - math.erf(al / math.sqrt(2))) / 2
    return mean + std * (pdf(al) - pdf(be)) / mass


@pytest.mark.filterwarnings("ignore:mean is more than 2 std")
@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_trunc_normal_deep_in_a_tail(device, backend, dtype):
    """Intervals deep in a tail, where the float32 stream cannot resolve the erf-domain interval (every
    value came out at one bound): the values stay in [a, b] (rounded to the dtype), spread over it, with
    the truncated normal's mean (within 6 standard errors), and are the same bits on every backend."""
    skip_unsupported(backend, "init", device, dtype)
    n = 1 << 16
    for mean, std, a, b in ((0.0, 1.0, 5.5, 6.0), (0.0, 1.0, 6.0, 7.0), (10.0, 1.0, -2.0, 2.0), (0.0, 1.0, 5.0, 20.0),
                            (0.0, 1.0, -9.0, -4.0), (1.0, 0.5, 3.5, 3.6)):
        with torchfast.use_backend("reference"):
            ref = tfi.trunc_normal_(torch.empty(n, dtype=dtype, device=device), mean, std, a, b, seed=5)
        got = tfi.trunc_normal_(torch.empty(n, dtype=dtype, device=device), mean, std, a, b, seed=5)
        assert torch.equal(got, ref), (mean, std, a, b)
        v = got.double().cpu()
        lo, hi = torch.tensor(a).to(dtype).item(), torch.tensor(b).to(dtype).item()
        assert v.min() >= lo and v.max() <= hi, (mean, std, a, b)
        if dtype == torch.float32:
            assert v.unique().numel() > n // 2, (mean, std, a, b)
        want = _trunc_normal_mean(mean, std, a, b)
        err = abs(v.mean().item() - want)
        step = abs(hi) * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11 if dtype == torch.float16 else 0)
        assert err <= 6 * v.std().item() / math.sqrt(n) + step, (mean, std, a, b, v.mean().item(), want)


@pytest.mark.parametrize("device,backend", backend_params("init"))
def test_fills_bump_the_version_counter(device, backend):
    """An init fill writes the tensor in place, so like torch.nn.init it bumps the version counter:
    a backward that saved the tensor before it was re-initialised is refused, as with stock, not run
    on the new values."""
    torchfast.set_backend(backend)
    fills = [lambda w: tfi.uniform_(w, seed=1), lambda w: tfi.normal_(w, seed=1), lambda w: tfi.trunc_normal_(w, seed=1),
             lambda w: tfi.kaiming_uniform_(w, seed=1), lambda w: tfi.constant_(w, 0.5), lambda w: tfi.zeros_(w),
             lambda w: tfi.uniform_([w, torch.empty(3, device=device)], seed=1),
             lambda w: nn.init.uniform_(w)]
    for fill in fills:
        w = torch.randn(4, 5, device=device, requires_grad=True)
        x = torch.randn(4, 5, device=device, requires_grad=True)
        y = (x * w).sum()  # saves w
        before = w._version
        with torch.no_grad():
            fill(w)
        assert w._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backend_matches_reference(device, backend, dtype):
    skip_unsupported(backend, "init", device, dtype)
    for fn, kw in [(tfi.uniform_, dict(a=-0.3, b=0.7)),
                   (tfi.normal_, dict(mean=0.5, std=2.0)),
                   (tfi.trunc_normal_, dict(mean=0.1, std=0.5, a=-0.4, b=0.9)),
                   (tfi.trunc_normal_, dict(mean=0.0, std=1.0, a=-3.9, b=0.2)),  # erfinv's tail branch
                   (tfi.constant_, dict(val=0.25))]:
        seed = {} if fn is tfi.constant_ else dict(seed=1234)
        with torchfast.use_backend("reference"):
            ref = fn(_tensors(dtype, device), **kw, **seed)
        with torchfast.use_backend(backend):
            out = fn(_tensors(dtype, device), **kw, **seed)
        for a, b in zip(out, ref):
            if dtype == torch.float64 and fn in (tfi.normal_, tfi.trunc_normal_):
                # the full-precision stream uses the libraries' float64 log/sin/cos: rounding only
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
            else:  # every float32-stream value is the same bits on every backend
                assert torch.equal(a, b), (fn.__name__, kw)


@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_views_at_odd_offsets_and_step_ends(device, backend, dtype):
    """Tensors that are views of one buffer at odd element offsets (not 16-byte aligned: the Triton
    kernels launch them apart from the aligned ones) next to aligned tensors whose sizes end just
    before, at and after the kernels' whole steps: every backend writes the reference's values and
    nothing outside the views."""
    skip_unsupported(backend, "init", device, dtype)

    def make():
        buf = torch.full((3000,), 7.0, dtype=dtype, device=device)
        views = [buf[1:256], buf[259:259 + 1025], buf[1300:1301], buf[1303:1303 + 1500]]
        return buf, views + [torch.empty(n, dtype=dtype, device=device) for n in (255, 256, 257, 4097)]
    for fn, kw in [(tfi.uniform_, dict(a=-1.0, b=2.0)), (tfi.normal_, dict(mean=0.5, std=2.0))]:
        with torchfast.use_backend("reference"):
            ref_buf, ref = make()
            fn(ref, **kw, seed=99)
        with torchfast.use_backend(backend):
            buf, out = make()
            fn(out, **kw, seed=99)
        for a, b in zip(out, ref):
            assert torch.equal(a, b), fn.__name__
        assert torch.equal(buf, ref_buf)  # the gaps between the views kept their 7.0


def test_float64_values_have_full_precision():
    """float64 tensors take the full-precision stream: 53-bit uniforms (the bits below float32's are
    used), normal and truncated normal computed in float64 (against the float64 inverse CDF and the
    float32 stream, which they are not), bounds kept, and the float64 normal stream's wider reach
    (8.65 std) clamped when trunc_normal_ takes it for wide bounds."""
    u = tfi.uniform_(torch.empty(100_000, dtype=torch.float64), seed=5)
    assert ((u * 2.0 ** 24) % 1 != 0).double().mean() > 0.99  # not float32 values widened
    assert 0 < u.min() and u.max() < 1
    f32 = tfi.uniform_(torch.empty(100_000, dtype=torch.float32), seed=5)
    assert not torch.allclose(u.float(), f32)  # a stream of its own, documented
    # the truncated normal's inverse CDF at full precision: erfinv in the body, against torch's
    from torchfast.reference import philox
    v = torch.linspace(-0.998, 0.998, 9999, dtype=torch.float64)
    z = philox.erfinv_f64(v, 1.0 - v.abs())
    torch.testing.assert_close(torch.where(v < 0, -z, z), torch.erfinv(v), rtol=1e-14, atol=1e-15)
    t = tfi.trunc_normal_(torch.empty(100_000, dtype=torch.float64), mean=0.1, std=0.7, a=-0.5, b=0.6, seed=2)
    assert t.min() >= -0.5 and t.max() <= 0.6 and ((t * 2.0 ** 24) % 1 != 0).double().mean() > 0.99
    n = tfi.normal_(torch.empty(400_000, dtype=torch.float64), 0.0, 1.0, seed=7)
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01
    # the wide-bounds shortcut: the normal stream, then clamped for float64 (here with bounds that bite)
    t = torch.empty(10_000, dtype=torch.float64)
    tfi._fill([t], [tfi._normal_spec(0.0, 1.0) + ((-0.5, 0.5),)], seed=3)
    assert t.min() == -0.5 and t.max() == 0.5


def test_uniform_bitwise_equal_across_backends(cpu_backend_built):
    ts = [torch.empty(1 << 16), torch.empty(333, 3)]
    with torchfast.use_backend("reference"):
        ref = tfi.uniform_([t.clone() for t in ts], -2.0, 3.0, seed=99)
    with torchfast.use_backend("cpu"):
        out = tfi.uniform_([t.clone() for t in ts], -2.0, 3.0, seed=99)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_position_in_batch_defines_stream():
    a, b = torch.empty(100), torch.empty(37, 3)
    tfi.normal_([a, b], seed=5)
    # The same tensor b at position 1 of another batch (whatever tensor 0 is) gets the same values.
    c = torch.empty(37, 3)
    tfi.normal_([torch.empty(9999), c], seed=5)
    assert torch.equal(b, c)
    # A longer tensor's prefix equals the shorter one: element i depends only on (seed, k, i).
    d = torch.empty(100 + 13)
    tfi.normal_(d, seed=5)
    assert torch.equal(d[:100], a)
    # Different positions give independent streams.
    e, f = torch.empty(20000), torch.empty(20000)
    tfi.uniform_([e, f], seed=5)
    assert abs(np.corrcoef(e.numpy(), f.numpy())[0, 1]) < 0.03


def test_seed_generator_and_manual_seed():
    a, b = torch.empty(1000), torch.empty(1000)
    tfi.uniform_(a, seed=1)
    tfi.uniform_(b, seed=1)
    assert torch.equal(a, b)
    tfi.uniform_(b, seed=2)
    assert not torch.equal(a, b)
    a, b = torch.empty(40, 25), torch.empty(40, 25)
    torch.manual_seed(0)
    tfi.kaiming_uniform_(a)
    tfi.kaiming_uniform_(b)
    assert not torch.equal(a, b), "successive calls draw fresh seeds"
    torch.manual_seed(0)
    c = tfi.kaiming_uniform_(torch.empty(40, 25))
    assert torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(tfi.normal_(torch.empty(50), generator=g1), tfi.normal_(torch.empty(50), generator=g2))


def test_layout_does_not_change_values():
    w = torch.empty(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    ref = torch.empty(8, 4, 3, 3)
    tfi.normal_(w, seed=7)
    tfi.normal_(ref, seed=7)
    assert torch.equal(w, ref)
    t = torch.empty(6, 10).t()  # non-contiguous
    r = torch.empty(10, 6)
    tfi.uniform_(t, seed=7)
    tfi.uniform_(r, seed=7)
    assert torch.equal(t, r)


@pytest.mark.parametrize("device,backend", backend_params("init"))
def test_thread_count_invariance(device, backend):
    if device != "cpu" or backend == "triton":
        pytest.skip("torch.get_num_threads() only affects the C++ CPU and PyTorch kernels")
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torchfast.use_backend(backend):
                # small tensors around the large ones: the threads' ranges split the list by elements
                ts = ([torch.empty(3) for _ in range(20)] + [torch.empty(100003), torch.empty(77, 1000)]
                      + [torch.empty(5, 2) for _ in range(30)])
                outs.append(tfi.trunc_normal_(ts, seed=11, std=0.02))
    finally:
        torch.set_num_threads(before)
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("threads", [1, 2])
def test_list_with_tensors_sharing_memory_fills_in_order(device, backend, threads):
    """A tensor listed twice, and overlapping views of one buffer, end as if each listing were filled in
    turn (the last one wins where they overlap), with each listing's own stream: one fill of the whole
    list would have the threads (or a launch's blocks) write both at once and mix them. Long enough
    that the fill splits over threads."""
    n = 200_000 if backend != "triton" else 2000
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torchfast.use_backend(backend):
            t = torch.empty(n, device=device)
            buf = torch.empty(2 * n, device=device)
            other = torch.empty(n // 3, device=device)
            listing = [t, other, buf[: n], t, buf[n // 2: n // 2 + n], buf[n:]]
            tfi.normal_(listing, seed=7, std=0.5)
            # each listing's own values (no sharing), laid out as filling the listings in turn would leave them
            fresh = [torch.empty_like(x) for x in listing]
            tfi.normal_(fresh, seed=7, std=0.5)
            want_buf = torch.empty(2 * n, device=device)
            want_buf[:n] = fresh[2]
            want_buf[n // 2: n // 2 + n] = fresh[4]
            want_buf[n:] = fresh[5]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(t, fresh[3])  # t's second listing wins
    assert torch.equal(other, fresh[1])
    assert torch.equal(buf, want_buf)


def test_overlap_levels_compiled_and_python_agree():
    """torch.ops.torchfast.overlap_levels (C++) and torchfast._overlap._levels (the fallback without the
    extension) give each tensor the same pass: duplicates, partial and adjacent views, strided views
    (whose byte spans are a superset of their elements), empty and meta tensors."""
    from torchfast import _ext, _overlap
    base, other, m = torch.zeros(1000), torch.zeros(50), torch.zeros(20, 30)
    cases = [
        ([base, other], [0, 0]),
        ([base[:100], base[100:200], other], [0, 0, 0]),  # adjacent views do not overlap
        ([base, base], [0, 1]),
        ([base[:500], other, base[250:750], base[600:], base[:0], base[:500]], [0, 0, 1, 2, 0, 2]),
        ([m[:, 0], m[:, 1], m[0, :], m.t()], [0, 1, 2, 3]),
        ([torch.empty(5, device="meta"), torch.empty(5, device="meta")], [0, 0]),
    ]
    for ts, want in cases:
        assert _overlap._levels(ts) == want
        if _ext._C is not None:
            assert list(torch.ops.torchfast.overlap_levels(ts)) == want
    assert _overlap.disjoint_passes([base[:500], other, base[250:750]]) == [[0, 1], [2]]


def test_distributions_goodness_of_fit():
    stats = pytest.importorskip("scipy.stats", reason="scipy is a test extra (pip install .[test]); the "
                                                        "goodness-of-fit tests need it")
    n = 200000
    u = tfi.uniform_(torch.empty(n), -1.0, 3.0, seed=2024).double().numpy()
    assert u.min() >= -1.0 and u.max() < 3.0
    assert stats.kstest(u, stats.uniform(loc=-1.0, scale=4.0).cdf).pvalue > 1e-3
    z = tfi.normal_(torch.empty(n), 1.5, 0.5, seed=2024).double().numpy()
    assert stats.kstest(z, stats.norm(loc=1.5, scale=0.5).cdf).pvalue > 1e-3
    t = tfi.trunc_normal_(torch.empty(n), mean=0.2, std=1.0, a=-1.0, b=0.5, seed=2024).double().numpy()
    assert t.min() >= -1.0 and t.max() <= 0.5
    dist = stats.truncnorm(a=(-1.0 - 0.2), b=(0.5 - 0.2), loc=0.2, scale=1.0)
    assert stats.kstest(t, dist.cdf).pvalue > 1e-3
    # A broken generator must fail these: a shifted normal is rejected.
    assert stats.kstest(z + 0.01, stats.norm(loc=1.5, scale=0.5).cdf).pvalue < 1e-3


def test_wide_trunc_normal_is_the_normal_stream():
    """Bounds beyond 6 std truncate nothing Box-Muller can produce (|z| <= 5.77): same values as normal_."""
    t = tfi.trunc_normal_(torch.empty(100000), std=0.02, seed=9)  # a=-2, b=2: 100 std away
    n = tfi.normal_(torch.empty(100000), 0.0, 0.02, seed=9)
    assert torch.equal(t, n)
    assert t.abs().max().item() <= philox_max_z() * 0.02 * (1 + 1e-6)
    u = tfi.trunc_normal_(torch.empty(1000), std=1.0, seed=9)  # a=-2, b=2 at 2 std: inverse CDF
    assert u.abs().max().item() <= 2.0 and not torch.equal(u, tfi.normal_(torch.empty(1000), seed=9))


def philox_max_z():
    return tfi.BOX_MULLER_MAX


def test_fan_formulas_match_torch_nn_init():
    w = torch.empty(256, 128, 3, 3)
    fan_in, fan_out = 128 * 9, 256 * 9
    cases = [
        (tfi.kaiming_uniform_, {}, "uniform", math.sqrt(3.0) * math.sqrt(2.0 / (1 + 0.0)) / math.sqrt(fan_in)),
        (tfi.kaiming_uniform_, dict(a=math.sqrt(5)), "uniform", 1 / math.sqrt(fan_in)),
        (tfi.kaiming_uniform_, dict(mode="fan_out", nonlinearity="relu"), "uniform", math.sqrt(6.0 / fan_out)),
        (tfi.xavier_uniform_, dict(gain=2.0), "uniform", 2.0 * math.sqrt(6.0 / (fan_in + fan_out))),
        (tfi.kaiming_normal_, dict(nonlinearity="relu"), "normal", math.sqrt(2.0 / fan_in)),
        (tfi.xavier_normal_, {}, "normal", math.sqrt(2.0 / (fan_in + fan_out))),
    ]
    for fn, kw, kind, scale in cases:
        v = fn(w, **kw, seed=1).double()
        if kind == "uniform":
            assert v.abs().max().item() <= scale * (1 + 1e-6)
            assert v.abs().max().item() > scale * 0.999
            assert abs(v.std().item() - scale / math.sqrt(3)) < 0.01 * scale
        else:
            assert abs(v.std().item() - scale) < 0.01 * scale
            assert abs(v.mean().item()) < 0.01 * scale
        # The same arguments through torch.nn.init give the same bounds and spread.
        s = getattr(nn.init, fn.__name__)(torch.empty_like(w), **kw).double()
        assert abs(s.std().item() - v.std().item()) < 0.01 * scale


def test_constants_and_integer_tensors():
    ts = [torch.empty(3, 4), torch.empty(5, dtype=torch.float16), torch.empty(2, dtype=torch.int64)]
    assert all(torch.all(t == 1) for t in tfi.ones_(ts))
    assert all(torch.all(t == 0) for t in tfi.zeros_(ts))
    assert all(torch.all(t == 3) for t in tfi.constant_(ts, 3))
    single = torch.empty(4)
    assert tfi.zeros_(single) is single


def test_gradients_untouched_and_leaf_params():
    p = nn.Parameter(torch.empty(10, 10))
    tfi.kaiming_uniform_([p], seed=1)
    assert p.requires_grad and p.grad is None and p.grad_fn is None


def test_errors():
    with pytest.raises(NotImplementedError, match="not implemented for 'Int'"):  # stock's error
        tfi.uniform_(torch.empty(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        tfi.uniform_(torch.empty(3), seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        tfi.uniform_(torch.empty(3), seed=1.5)
    with pytest.raises(ValueError, match="seed or generator, not both"):
        tfi.uniform_(torch.empty(3), seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="expected a Tensor"):
        tfi.normal_([torch.empty(3), [1, 2]])
    with pytest.raises(ValueError, match="Fan in and fan out can not be computed"):
        tfi.xavier_uniform_(torch.empty(5))
    with pytest.warns(UserWarning, match="zero-element"):
        tfi.kaiming_uniform_(torch.empty(0, 3))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.lin = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(16, 2)
        self.rnn = nn.GRU(16, 12)
        self.head = nn.Linear(32, 50, bias=False)


def test_reset_parameters_reproduces_default_distributions():
    net = _Net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(7.0)
        net.bn.running_mean.fill_(3.0)
        net.bn.num_batches_tracked.fill_(5)
    tfi.reset_parameters(net, seed=0)
    assert torch.all(net.emb.weight[0] == 0)
    assert abs(net.emb.weight[1:].std().item() - 1.0) < 0.05
    for lin in (net.lin, net.head, net.conv):
        bound = 1 / math.sqrt(lin.weight[0].numel())
        assert lin.weight.abs().max().item() <= bound and lin.weight.abs().max().item() > 0.9 * bound
    assert net.lin.bias.abs().max().item() <= 1 / math.sqrt(16)
    assert torch.all(net.bn.weight == 1) and torch.all(net.bn.bias == 0)
    assert torch.all(net.bn.running_mean == 0) and net.bn.num_batches_tracked.item() == 0
    assert torch.all(net.ln.weight == 1) and torch.all(net.ln.bias == 0)
    assert torch.all(net.attn.in_proj_bias == 0) and torch.all(net.attn.out_proj.bias == 0)
    xb = math.sqrt(6.0 / (16 + 48))
    assert net.attn.in_proj_weight.abs().max().item() <= xb
    assert net.rnn.weight_hh_l0.abs().max().item() <= 1 / math.sqrt(12)
    assert not any(torch.any(p == 7.0) for p in net.parameters())
    # Same seed, same model: same values. Different seed: different values.
    again = tfi.reset_parameters(_Net(), seed=0)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_reset_parameters_calls_custom_reset():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(3))

        def reset_parameters(self):
            nn.init.constant_(self.scale, 2.0)

    m = nn.Sequential(Custom(), nn.Linear(3, 3))
    tfi.reset_parameters(m, seed=1)
    assert torch.all(m[0].scale == 2.0)


def test_opcheck():
    if torchfast._ext._C is None:
        pytest.skip("compiled extension not built")
    ts = [torch.empty(5, 3), torch.empty(17, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.torchfast.philox_fill_, (ts, 3, [0, 1], [0, 1], [0.0, 1.0, 0, 0, 0, 0, 0, 0] * 2))


def test_more_than_2_31_elements(cpu_backend_built):
    """int64 indexing: a 2^31 + 12 element float16 tensor (4 GiB) filled in one call."""
    n = (1 << 31) + 12
    t = torch.empty(n, dtype=torch.float16)
    with torchfast.use_backend("cpu"):
        tfi.uniform_(t, -1.0, 1.0, seed=42)
    tail_start = n - 1036  # a multiple of 4
    params = tfi._kernel_params((philox.UNIFORM, (-1.0, 1.0)), torch.float16)  # (the top below 1.0: see there)
    ref = philox.values(42, 0, tail_start, n - tail_start, philox.UNIFORM, params, "cpu").to(torch.float16)
    assert torch.equal(t[tail_start:], ref)
    ref_head = philox.values(42, 0, 0, 64, philox.UNIFORM, params, "cpu").to(torch.float16)
    assert torch.equal(t[:64], ref_head)
    del t


@requires_cuda
def test_cuda_matches_cpu_and_no_sync():
    ts_cpu = [torch.empty(s) for s in SHAPES]
    ts_gpu = [torch.empty(s, device="cuda") for s in SHAPES]
    tfi.uniform_(ts_cpu, seed=3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        tfi.uniform_(ts_gpu, seed=3)
        tfi.trunc_normal_(ts_gpu, seed=3, std=0.02)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tfi.uniform_(ts_gpu, seed=3)
    for a, b in zip(ts_gpu, ts_cpu):
        assert torch.equal(a.cpu(), b)


def test_cpu_vector_paths_agree(cpu_backend_built, tmp_path):
    """The AVX-512, AVX2 and portable scalar paths (whichever this CPU has) give bitwise-equal values
    for every distribution."""
    import os
    import subprocess
    import sys
    code = (
        "import sys, torch, torchfast\n"
        "from torchfast import init\n"
        "ts = [torch.empty(100003), torch.empty(64, 129), torch.empty(7)]\n"
        "out = {}\n"
        "out['u'] = [t.clone() for t in init.uniform_([t.clone() for t in ts], -1.5, 2.5, seed=3)]\n"
        "out['n'] = [t.clone() for t in init.normal_([t.clone() for t in ts], 0.5, 2.0, seed=3)]\n"
        "out['t'] = [t.clone() for t in init.trunc_normal_([t.clone() for t in ts], 0.1, 1.0, -1.5, 2.0, seed=3)]\n"
        "torch.save(out, sys.argv[1])\n")
    results = {}
    for name, env in [("default", {}), ("avx2", {"TORCHFAST_NO_AVX512": "1"}),
                      ("scalar", {"TORCHFAST_NO_AVX512": "1", "TORCHFAST_NO_AVX2": "1"})]:
        path = str(tmp_path / (name + ".pt"))
        r = subprocess.run([sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        results[name] = torch.load(path)
    for name in ("avx2", "scalar"):
        for kind in ("u", "n", "t"):
            for a, b in zip(results[name][kind], results["default"][kind]):
                assert torch.equal(a, b), (name, kind)


def test_every_torch_nn_init_function_is_there():
    """`import torchfast.init as init` is a drop-in for code using any public torch.nn.init function,
    the deprecated un-underscored aliases included."""
    import warnings

    public = [n for n in dir(torch.nn.init) if not n.startswith("_") and callable(getattr(torch.nn.init, n))
              and getattr(getattr(torch.nn.init, n), "__module__", "") == "torch.nn.init"]
    assert "orthogonal_" in public and "sparse" in public
    missing = [n for n in public if not callable(getattr(torchfast.init, n, None))]
    assert not missing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torchfast.init.kaiming_uniform(torch.empty(3, 4), seed=0)
    assert out.shape == (3, 4) and caught and issubclass(caught[0].category, FutureWarning)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (4, 3, 3, 3)])
def test_orthogonal_is_orthogonal_and_seeded(shape):
    ws = [torch.empty(shape), torch.empty(shape)]
    torchfast.init.orthogonal_(ws, gain=2.0, seed=5)
    for w in ws:
        f = w.reshape(shape[0], -1)
        small = min(f.shape)
        gram = f @ f.t() if f.shape[0] == small else f.t() @ f
        torch.testing.assert_close(gram, 4.0 * torch.eye(small), atol=1e-5, rtol=0)
    assert not torch.equal(ws[0], ws[1])  # each tensor its own stream
    again = torchfast.init.orthogonal_(torch.empty(shape), gain=2.0, seed=5)
    torch.testing.assert_close(again, ws[0])
    with pytest.raises(ValueError, match="2 or more dimensions"):
        torchfast.init.orthogonal_(torch.empty(3))


def test_eye_dirac_sparse_match_torch():
    e = torchfast.init.eye_(torch.empty(3, 5))
    assert torch.equal(e, torch.nn.init.eye_(torch.empty(3, 5)))
    d = torchfast.init.dirac_(torch.empty(4, 2, 3, 3), groups=2)
    assert torch.equal(d, torch.nn.init.dirac_(torch.empty(4, 2, 3, 3), groups=2))
    s = torchfast.init.sparse_(torch.empty(20, 7), 0.3, std=0.5, seed=1)
    assert ((s == 0).sum(0) >= 6).all()  # ceil(0.3 * 20) rows zeroed per column
    assert 0.3 < s[s != 0].std().item() < 0.7
    with pytest.raises(ValueError, match="2 dimensions"):
        torchfast.init.sparse_(torch.empty(3, 4, 5), 0.1)


@pytest.mark.filterwarnings("ignore:mean is more than 2 std")  # stock's warning, for the one-tail intervals
@pytest.mark.parametrize("device,backend", backend_params("init"))
@pytest.mark.parametrize("mean,std,a,b", [(0.0, 1.0, -1.0, 7.5), (0.5, 2.0, -14.5, 2.5), (0.0, 1.0, 6.2, 7.0),
                                          (0.0, 1.0, -40.0, -5.9), (0.0, 1.0, -0.01, 0.02)])
def test_trunc_normal_float64_is_precise_in_the_tails(device, backend, mean, std, a, b):
    """float64 truncated normal values are the exact inverse CDF of the drawn uniform to a few ulp,
    also in the far tails (before: erfinv near +-1 lost 1e-6 relative at 7 std, since 1 - erf rounds
    there) and for intervals entirely inside one tail or narrow around the mean. Checked against an
    independent computation: the uniform stream with the same seed gives each element's u, and
    erfc of each value must equal the drawn point's distance from the pole, in float64."""
    skip_unsupported(backend, "init", device, torch.float64)
    n = 4096
    with torchfast.use_backend(backend):
        u = tfi.uniform_(torch.empty(n, dtype=torch.float64, device=device), 0.0, 1.0, seed=17).cpu().tolist()
        v = tfi.trunc_normal_(torch.empty(n, dtype=torch.float64, device=device), mean, std, a, b,
                              seed=17).cpu().tolist()
    s2 = std * math.sqrt(2.0)
    lo_x, hi_x = (a - mean) / s2, (b - mean) / s2
    assert all(a <= x <= b for x in v)
    worst = 0.0
    for ui, vi in zip(u, v):
        x = (vi - mean) / s2
        if x > 0.5:  # upper tail: erfc(x) = erfc(hi_x) + (erfc(lo_x) - erfc(hi_x)) (1 - u)
            want = math.erfc(hi_x) + (math.erfc(lo_x) - math.erfc(hi_x)) * (1.0 - ui)
            got = math.erfc(x)
            slope = 2 * x  # |d log erfc / dx|: the value's own rounding shows up as this much
        elif x < -0.5:  # lower tail, mirrored
            want = math.erfc(-lo_x) + (math.erfc(-hi_x) - math.erfc(-lo_x)) * ui
            got = math.erfc(-x)
            slope = -2 * x
        else:  # the body: erf(x) = erf(lo_x) + (erf(hi_x) - erf(lo_x)) u
            want = math.erf(lo_x) + (math.erf(hi_x) - math.erf(lo_x)) * ui
            got = math.erf(x)
            slope = 1.0 / max(abs(x), 1e-300)
        ulp_x = math.ulp(vi) / s2 + math.ulp(x)
        worst = max(worst, abs(got - want) / abs(want) / (1e-15 + slope * ulp_x))
    assert worst < 16, worst  # within a handful of the value's own rounding


def test_trunc_normal_float64_stays_in_bounds():
    for seed in range(8):
        t = torch.empty(200_000, dtype=torch.float64)
        torchfast.init.trunc_normal_(t, mean=0.3, std=1.0, a=-0.7, b=0.9, seed=seed)
        assert t.min().item() >= -0.7 and t.max().item() <= 0.9


@pytest.mark.parametrize("name,left", [("torchvision:vit_b_16", "class_token"),
                                       ("torchvision:swin_t", "relative_position_bias_table"),
                                       ("torchvision:convnext_tiny", "layer_scale"),
                                       ("timm:vit_tiny_patch16_224", None)])
def test_reset_parameters_never_leaves_a_tensor_unwritten_silently(name, left):
    """After a meta build + to_empty, every parameter and floating buffer is either written (known
    layers batched; modules' own reset_parameters/_reset_parameters/init_weights called) or named."""
    import warnings

    lib, arch = name.split(":")
    mod = pytest.importorskip(lib, reason="%s is a test extra (pip install .[test])" % lib)
    with torch.device("meta"):
        model = mod.create_model(arch) if lib == "timm" else getattr(mod.models, arch)()
    model.to_empty(device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tfi.reset_parameters(model, seed=0)
    msgs = [str(w.message) for w in caught if "reset_parameters" in str(w.message)]
    if left is None:
        assert not msgs
        assert all(torch.isfinite(p).all() and p.abs().max() < 1e3 for p in model.parameters())
    else:
        assert len(msgs) == 1 and left in msgs[0]
        with pytest.raises(RuntimeError, match=left):
            tfi.reset_parameters(model, seed=0, strict=True)


def test_reset_parameters_calls_a_module_own_init():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.empty(4))

        def reset_parameters(self):
            nn.init.ones_(self.scale)

    m = Scaled()
    with torch.no_grad():
        m.scale.fill_(float("nan"))
    tfi.reset_parameters(m, seed=0, strict=True)
    assert torch.equal(m.scale.detach(), torch.ones(4))


# ---------------------------------------------------------------------------------------------- fast_init

class _GPTBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.qkv, self.proj, self.fc = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d)


class _TinyGPT(nn.Module):
    """GPT-2-style init, as Hugging Face writes it: _init_weights through .data, scaled residual
    projections by name, tied embeddings."""

    def __init__(self, d=64, layers=3, vocab=997):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(128, d)
        self.h = nn.ModuleList(_GPTBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                m.bias.data.zero_()


def _assert_same_distributions(stock, fast, rtol=0.05):
    for (name, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters()):
        if a.numel() < 2000:
            continue
        if a.std() == 0:
            assert torch.equal(a, b), name  # constants (ones, zeros) exactly
            continue
        assert abs(b.std().item() / a.std().item() - 1) < rtol, (name, a.std().item(), b.std().item())
        assert abs(b.mean().item() - a.mean().item()) < 0.1 * a.std().item(), name
        assert b.abs().max() <= a.abs().max() * 1.5 + 1e-6, name  # uniform bounds, truncations kept


@pytest.mark.parametrize("name", ["torchvision:resnet50", "torchvision:vit_b_16", "torchvision:swin_t",
                                  "torchvision:convnext_tiny", "timm:vit_tiny_patch16_224",
                                  "timm:resnet50", "gpt"])
def test_fast_init_keeps_the_models_own_init(name):
    """A model built inside fast_init has its own init's distributions (torchvision's kaiming_normal fan_out,
    ViT's and timm's truncated normals, GPT-2's normal(0.02) with scaled projections and tied
    embeddings), with the random fills batched into a few torchfast calls."""
    if name == "gpt":
        ctor = _TinyGPT
    else:
        lib, model = name.split(":")
        mod = pytest.importorskip(lib, reason="%s is a test extra (pip install .[test])" % lib)
        ctor = (lambda: getattr(mod.models, model)()) if lib == "torchvision" else (lambda: mod.create_model(model))
    torch.manual_seed(0)
    stock = ctor()
    with tfi.fast_init(seed=1) as report:
        fast = ctor()
    _assert_same_distributions(stock, fast)
    assert report["recorded"] > 10 and report["batched_calls"] <= 3, report
    if name == "gpt":
        assert fast.head.weight is fast.wte.weight
        assert abs(fast.h[0].proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.002


def test_fast_init_does_not_import_dynamo():
    """The recorder (a TorchDispatchMode) opts out of torch._disable_dynamo's wrapper, which imports
    torch._dynamo on first use: 2 s of a fresh process's first fast_init on a 2-core machine, which
    made a GPT-2-medium build in a new process 1.1x stock instead of 3.4x."""
    import subprocess
    import sys
    code = ("import sys, torch, torchfast.init\n"
            "assert 'torch._dynamo' not in sys.modules, 'imported before fast_init'\n"
            "with torchfast.init.fast_init(seed=0):\n"
            "    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))\n"
            "    m[0].weight.data.mul_(0.5)\n"  # an operation that flushes a pending fill
            "assert 'torch._dynamo' not in sys.modules, 'imported by fast_init'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_fast_init_keeps_the_order_of_operations():
    """Whatever reads or writes a tensor with a pending fill sees the filled values first: a rescale, a
    copy into another tensor, orthogonal_'s QR, an init of a view; a later init of a tensor replaces an
    earlier one; the values depend only on the seed."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(300, 200), nn.Linear(300, 200), nn.Linear(64, 64)
            with torch.no_grad():
                self.a.weight.mul_(0.5)                 # after Linear's kaiming_uniform_
                self.copy = self.b.weight.detach().clone()
            nn.init.orthogonal_(self.c.weight)
            nn.init.zeros_(self.b.bias)
            nn.init.normal_(self.b.bias, 3.0, 0.1)      # replaces the zeros_
            nn.init.constant_(self.a.bias[:10], 7.0)    # a view of a pending tensor

    with tfi.fast_init(seed=5):
        m = M()
    bound = 1 / math.sqrt(300)
    assert m.a.weight.abs().max() <= 0.5 * bound and m.a.weight.abs().max() > 0.45 * bound
    assert torch.equal(m.copy, m.b.weight)  # the copy saw the filled values
    torch.testing.assert_close(m.c.weight @ m.c.weight.T, torch.eye(64), atol=1e-4, rtol=0)
    assert abs(m.b.bias.mean().item() - 3.0) < 0.05
    assert torch.equal(m.a.bias[:10], torch.full((10,), 7.0)) and m.a.bias[10:].abs().max() <= bound
    with tfi.fast_init(seed=5):
        again = M()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters()))
    # a torchfast.init call with its own seed runs at once, with that seed, after what was pending
    outside = tfi.normal_(torch.empty(1000), seed=9)
    with tfi.fast_init(seed=1):
        w = tfi.uniform_(torch.empty(1000))
        tfi.normal_(w, seed=9)
    assert torch.equal(w, outside)


def test_fast_init_reproducible_across_threads_meta_and_nesting():
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with tfi.fast_init(seed=11):
                outs.append(_TinyGPT())
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(outs[0].parameters(), outs[1].parameters()))
    with torch.device("meta"), tfi.fast_init(seed=1) as report:
        meta = _TinyGPT()
    assert meta.wte.weight.is_meta and report["batched_calls"] == 0
    with tfi.fast_init():
        with pytest.raises(RuntimeError, match="already inside"):
            with tfi.fast_init():
                pass
    assert nn.init.normal_ is not tfi.normal_  # torch.nn.init restored


def test_stream_log_and_sincos_accuracy():
    """The float32 stream's own log and sin/cos (shared by every backend, so its normal values are the
    same bits everywhere) against float64 math over every unit value the generator can draw: log
    within 1 ulp, also on random floats in (0, 1] (erfinv's arguments), and at its exact points; sin
    and cos within 1e-7 absolute (2 ulp)."""
    k = torch.arange(0, 1 << 23, dtype=torch.int64)
    u64 = (k * 2 + 1).double() * 2.0 ** -24
    u = u64.float()
    assert torch.equal(u, philox.word_to_unit(k << 9))

    def ulps(x, exact):
        return (x.double() - exact).abs() / torch.from_numpy(np.spacing(exact.float().abs().numpy())).double()

    assert ulps(philox.log_f32(u), torch.log(u64)).max().item() <= 1.0
    x = torch.rand(1 << 20, generator=torch.Generator().manual_seed(5)) ** 6
    x = x[x >= torch.finfo(torch.float32).tiny]
    assert ulps(philox.log_f32(x), torch.log(x.double())).max().item() <= 1.0
    sin, cos = philox.sincos_2pi(k << 9)
    assert (sin.double() - torch.sin(2 * math.pi * u64)).abs().max().item() <= 1e-7
    assert (cos.double() - torch.cos(2 * math.pi * u64)).abs().max().item() <= 1e-7
    assert philox.log_f32(torch.tensor([0.0, 1.0])).tolist() == [-math.inf, 0.0]


def _fma_cases():
    """float32 triples (a, b, c), random and adversarial, with the correctly rounded fma(a, b, c) from
    exact rational arithmetic. The adversarial ones put a * b + c just off a float32 rounding midpoint by
    less than a float64 ulp, where a float64 multiply-add rounds twice and lands on the wrong side."""
    from fractions import Fraction
    g = torch.Generator().manual_seed(11)
    a, b, c = torch.randn(3, 3000, generator=g)
    c[:1000] = -(a[:1000] * b[:1000])  # cancellation down to the product's rounding error
    c[1000:2000] *= 2.0 ** -30
    one = 1 + 2.0 ** -12  # one^2 = 1 + 2^-11 + 2^-24: the midpoint between two float32 values
    traps = [(one, one, s * 2.0 ** k) for s in (1, -1) for k in (-60, -70, -100)]
    traps += [(-one, one, s * 2.0 ** -60) for s in (1, -1)]
    a = torch.cat([a, torch.tensor([t[0] for t in traps])])
    b = torch.cat([b, torch.tensor([t[1] for t in traps])])
    c = torch.cat([c, torch.tensor([t[2] for t in traps])])
    want = []
    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist()):
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        near = np.float32(float(exact))  # within an ulp; then pick the nearest (ties to even) neighbour
        cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
        want.append(min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.array(v).view(np.int32)) & 1)))
    return a, b, c, torch.tensor(np.array(want, dtype=np.float32))


def test_fma_f32_is_exactly_rounded():
    """The reference's fma (float64 with round-to-odd) rounds once, like the hardware's: the normal
    and truncated-normal streams are defined with fma, and every backend must give its exact bits."""
    a, b, c, want = _fma_cases()
    assert torch.equal(philox.fma_f32(a, b, c), want)
    naive = (a.double() * b.double() + c.double()).float()  # rounds twice: wrong on the traps
    assert not torch.equal(naive, want)


def test_triton_fma_is_exactly_rounded():
    """The Triton kernels' _fma: one tl.fma on a GPU; under the interpreter (whose tl.fma rounds twice)
    the round-to-odd emulation. Either way the correctly rounded result on the adversarial cases."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    from triton_fma_kernel import fma_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b, c, want = (t.to(device) for t in _fma_cases())
    out = torch.empty_like(a)
    fma_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, c, out, a.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), want.cpu())
