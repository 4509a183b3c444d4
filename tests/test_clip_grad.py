"""Fused clipping against torch.nn.utils on every backend."""
import math
import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn import utils as tnu

import torchfast

from conftest import FLOAT_DTYPES, assert_close_to_oracle, backend_params, requires_cuda, skip_unsupported

NORM_TYPES = [1.0, 2.0, 3.5, 0.5, math.inf]
SHAPES = [(3, 4), (1,), (7, 7, 3), (1023,), (64, 65), (2, 1, 5)]


def _params(dtype, device="cpu", seed=0, shapes=SHAPES, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device))
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        ps.append(p)
    return ps


def _clone(ps, dtype=None):
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype))
        q.grad = None if p.grad is None else p.grad.clone().to(dtype or p.dtype)
        out.append(q)
    return out


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e9], ids=["clips", "no-clip"])
def test_clip_grad_norm_matches_stock(device, backend, norm_type, dtype, max_norm):
    skip_unsupported(backend, "clip_grad", device, dtype)
    ps = _params(dtype, device)
    ref64, ref_lowp, fast = _clone(ps, torch.float64), _clone(ps), _clone(ps)
    n64 = tnu.clip_grad_norm_(ref64, max_norm, norm_type)
    nl = tnu.clip_grad_norm_(ref_lowp, max_norm, norm_type)
    torchfast.set_backend(backend)
    nf = torchfast.clip_grad_norm_(fast, max_norm, norm_type)
    assert nf.dtype == nl.dtype and nf.shape == nl.shape and nf.device == nl.device
    assert_close_to_oracle(nf, nl, n64, "total norm")
    for a, b, c in zip(fast, ref_lowp, ref64):
        assert_close_to_oracle(a.grad, b.grad, c.grad, "clipped grad")
    if max_norm > 1e8 and torch.isfinite(nl):  # coefficient clamps to 1: grads untouched, bit for bit
        for a, p in zip(fast, ps):
            assert torch.equal(a.grad, p.grad)


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_views_at_any_offset_and_repeated_calls(device, backend, dtype):
    """Gradients that are views of one buffer at odd element offsets (addresses not 16-byte aligned,
    which the Triton kernels launch apart from the aligned ones) next to aligned ones, sizes around the
    kernels' block and chunk ends; then the same call again on the same tensors (the Triton chunk table
    comes from its cache: the result must not change) and on new tensors of the same sizes."""
    skip_unsupported(backend, "clip_grad", device, dtype)
    torchfast.set_backend(backend)
    g = torch.Generator().manual_seed(5)
    buf = torch.randn(8000, generator=g).to(dtype).to(device)
    grads, end = [], 0
    for gap, n in ((1, 129), (3, 2047), (0, 2048), (5, 1), (1, 2049)):  # disjoint views, odd offsets
        grads.append(buf[end + gap:end + gap + n])
        end += gap + n
    grads.append(torch.randn(4099, generator=g).to(dtype).to(device))
    assert any(t.data_ptr() % 16 for t in grads) and any(t.data_ptr() % 16 == 0 for t in grads)
    for _ in range(2):
        for norm_type in (2.0, math.inf):
            want = tnu.get_total_norm([t.clone() for t in grads], norm_type)
            got = torchfast.get_total_norm(grads, norm_type)
            torch.testing.assert_close(got, want, rtol=2e-3 if dtype == torch.bfloat16 else 1e-5, atol=0)
        before = [t.clone() for t in grads]
        ref = [t.clone() for t in grads]
        total = tnu.get_total_norm(ref)
        tnu.clip_grads_with_norm_([_with_grad(t) for t in ref], 0.25 * float(total), total)
        torchfast.clip_grads_with_norm_([_with_grad(t) for t in grads], 0.25 * float(total), total)
        for a, b, c in zip(grads, ref, before):
            torch.testing.assert_close(a, b, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0)
            assert not torch.equal(a, c) or c.abs().max() == 0
        grads = [t.clone() for t in grads]  # next round: new tensors, new addresses


def _with_grad(t):
    """A Parameter whose .grad is `t` itself (not a copy): clipping writes into t."""
    p = torch.nn.Parameter(torch.empty_like(t))
    p.grad = t
    assert p.grad is t
    return p


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_mixed_dtypes_none_grads_and_single_tensor(device, backend):
    skip_unsupported(backend, "clip_grad", device, torch.float32, torch.bfloat16, torch.float64)
    torchfast.set_backend(backend)
    ps = _params(torch.float32, device) + _params(torch.bfloat16, device, seed=1) + _params(torch.float64, device, 2)
    ps[1].grad = None
    ps.append(torch.nn.Parameter(torch.ones(3, device=device)))  # never had a grad
    ref, fast = _clone(ps), _clone(ps)
    n_ref = tnu.clip_grad_norm_(ref, 1.0)
    n_fast = torchfast.clip_grad_norm_(fast, 1.0)
    assert n_fast.dtype == n_ref.dtype == torch.float64
    torch.testing.assert_close(n_fast, n_ref, rtol=4e-3, atol=0)
    for a, b in zip(fast, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-3)
    # A single tensor, not a list.
    p = _params(torch.float32, device, shapes=[(10, 10)], scale=5.0)[0]
    q = _clone([p])[0]
    torch.testing.assert_close(torchfast.clip_grad_norm_(p, 2.0), tnu.clip_grad_norm_(q, 2.0))
    torch.testing.assert_close(p.grad, q.grad)


def test_empty_and_generator_warning():
    assert torch.equal(torchfast.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    assert torch.equal(torchfast.get_total_norm([]), tnu.get_total_norm([]))
    with pytest.warns(UserWarning, match="empty generator"):
        torchfast.clip_grad_norm_((p for p in []), 1.0)
    p = torch.nn.Parameter(torch.ones(3))
    assert torchfast.clip_grad_norm_([p], 1.0).item() == 0.0


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_nonfinite(device, backend):
    torchfast.set_backend(backend)
    for bad in (float("nan"), float("inf")):
        ps = _params(torch.float32, device)
        ps[2].grad[1, 1, 1] = bad
        with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
            torchfast.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
        ref = _clone(ps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = torchfast.clip_grad_norm_(ps, 1.0)
            nr = tnu.clip_grad_norm_(ref, 1.0)
        assert torch.equal(n.isnan(), nr.isnan()) and torch.equal(n.isinf(), nr.isinf())
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    # inf norm propagates NaN like torch.linalg.vector_norm
    ps = _params(torch.float32, device)
    ps[0].grad[0, 0] = float("nan")
    assert torchfast.get_total_norm([p.grad for p in ps], math.inf).isnan()


@pytest.mark.parametrize("norm_type", [0.0, -math.inf, -1.0])
def test_norm_types_without_kernels_follow_stock(norm_type):
    grads = [p.grad for p in _params(torch.float32)]
    grads[0][0, 0] = 0.0
    torch.testing.assert_close(torchfast.get_total_norm(grads, norm_type), tnu.get_total_norm(grads, norm_type))


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_get_total_norm_and_clip_with_norm(device, backend):
    torchfast.set_backend(backend)
    ps = _params(torch.float32, device, scale=3.0)
    ref = _clone(ps)
    grads = [p.grad for p in ps]
    total = torchfast.get_total_norm(grads, 2.0)
    torch.testing.assert_close(total, tnu.get_total_norm([p.grad for p in ref], 2.0))
    torchfast.clip_grads_with_norm_(ps, 1.5, total)
    tnu.clip_grads_with_norm_(ref, 1.5, total)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.grad, b.grad)
    # Non-dense gradients (a transposed view with a gap) are handled too.
    p = torch.nn.Parameter(torch.zeros(6, 8, device=device))
    p.grad = torch.randn(8, 12, device=device)[:, ::2].t()
    q = _clone([p])[0]
    q.grad = p.grad.clone()
    torch.testing.assert_close(torchfast.clip_grad_norm_([p], 0.1), tnu.clip_grad_norm_([q], 0.1))
    torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_clipping_bumps_the_version_counter(device, backend):
    """Clipping writes the gradients in place, so like stock's _foreach_mul_ it bumps their version
    counters: a backward through a graph that saved a gradient since clipped is refused, as with
    stock, not run on the new values. A call that does not clip bumps it too, as stock's (which
    multiplies by 1)."""
    torchfast.set_backend(backend)
    for fn in (lambda ps: torchfast.clip_grad_norm_(ps, 1e-3),
               lambda ps: torchfast.clip_grads_with_norm_(ps, 1e-3, torch.tensor(5.0, device=device)),
               lambda ps: tnu.clip_grad_norm_(ps, 1e-3)):
        p = torch.nn.Parameter(torch.zeros(4, 5, device=device))
        p.grad = torch.randn(4, 5, device=device)
        x = torch.randn(4, 5, device=device, requires_grad=True)
        y = (x * p.grad).sum()  # saves the gradient tensor
        before = p.grad._version
        fn([p])
        assert p.grad._version > before
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    for fn in (torchfast.clip_grad_norm_, tnu.clip_grad_norm_):
        p.grad = torch.randn(4, 5, device=device)
        before = p.grad._version
        fn([p], 1e9)
        assert p.grad._version > before


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_float16_norm_overflow_clips_to_zero_as_stock(device, backend):
    """A float16 list whose norm overflows float16 (finite in float32): stock returns inf and scales the
    gradients by max_norm / inf = 0; so must every path here (the fused one computed its coefficient
    from the float32 norm and scaled them by 1e-5)."""
    skip_unsupported(backend, "clip_grad", device, torch.float16)
    torchfast.set_backend(backend)
    p = torch.nn.Parameter(torch.zeros(100, dtype=torch.float16, device=device))
    p.grad = torch.full((100,), 1e4, dtype=torch.float16, device=device)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    got, want = torchfast.clip_grad_norm_([p], 1.0), tnu.clip_grad_norm_([q], 1.0)
    assert torch.isinf(want) and torch.isinf(got) and got.dtype == want.dtype
    assert torch.equal(p.grad, q.grad) and not p.grad.any()


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
def test_sparse_gradients_as_stock(device, backend):
    """Sparse gradients (nn.Embedding(sparse=True)) go to torch.nn.utils: the same norm and the same
    clipped gradients as stock, mixed with dense ones too, for every norm type and function."""
    torchfast.set_backend(backend)

    def model():
        g = torch.Generator().manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True).to(device)
        lin = nn.Linear(4, 3).to(device)
        with torch.no_grad():
            for t in (emb.weight, lin.weight, lin.bias):
                t.copy_(torch.randn(t.shape, generator=g))
        lin(emb(torch.tensor([1, 3, 3, 7], device=device))).pow(2).sum().backward()
        return list(emb.parameters()) + list(lin.parameters())

    for norm_type in (2.0, 1.0, math.inf, 0.0):
        ours, stock = model(), model()
        assert ours[0].grad.is_sparse
        torch.testing.assert_close(torchfast.get_total_norm([p.grad for p in ours], norm_type),
                                   tnu.get_total_norm([p.grad for p in stock], norm_type))
        torch.testing.assert_close(torchfast.clip_grad_norm_(ours, 0.1, norm_type), tnu.clip_grad_norm_(stock, 0.1, norm_type))
        for a, b in zip(ours, stock):
            torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense())
    ours, stock = model(), model()
    torchfast.clip_grads_with_norm_(ours, 0.1, torch.tensor(3.0))
    tnu.clip_grads_with_norm_(stock, 0.1, torch.tensor(3.0))
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense())


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
@pytest.mark.parametrize("order", ["fx", "xf", "fdx"])
def test_expanded_gradient_refused_before_any_write(device, backend, order):
    """A gradient whose elements share memory (expanded) cannot be scaled in place: every function
    raises stock's error before anything is written (stock scales the gradients before it first, and
    the fused clip then scaled them a second time on its retry), and leaves the norm computable."""
    if "d" in order:
        skip_unsupported(backend, "clip_grad", device, torch.float64)
    def params():
        ps = []
        for kind in order:
            p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64 if kind == "d" else torch.float32, device=device))
            p.grad = (torch.full((3,), 5.0, device=device).expand(2, 3) if kind == "x"
                      else torch.full((2, 3), 5.0, dtype=p.dtype, device=device))
            ps.append(p)
        return ps

    with torchfast.use_backend(backend):
        for call in (lambda ps: torchfast.clip_grad_norm_(ps, 1.0),
                     lambda ps: torchfast.clip_grads_with_norm_(ps, 1.0, torch.tensor(10.0, device=device))):
            ps = params()
            with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
                call(ps)
            assert all(torch.all(p.grad == 5.0) for p in ps)
        ps = params()
        norm = torchfast.get_total_norm([p.grad for p in ps])
    assert norm.item() == pytest.approx(5.0 * math.sqrt(6 * len(order)), rel=1e-6)


@pytest.mark.parametrize("total_norm", [10.0, 10, "10", None])
def test_clip_grads_with_norm_refuses_a_non_tensor_norm_as_stock(total_norm):
    """total_norm must be a tensor: a number or string gets stock's exception and message, and no
    gradient is touched (it was converted with float() and applied)."""
    def outcome(fn):
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), 5.0)
        try:
            fn([p], 1.0, total_norm)
        except Exception as e:  # noqa: BLE001
            assert torch.all(p.grad == 5.0)
            return type(e), str(e)
        return p.grad

    want = outcome(tnu.clip_grads_with_norm_)
    assert want[0] is TypeError
    assert outcome(torchfast.clip_grads_with_norm_) == want


def test_clip_grad_value_matches_stock():
    ps = _params(torch.float32, scale=2.0) + _params(torch.bfloat16, seed=3)
    ref = _clone(ps)
    torchfast.clip_grad_value_(ps, 0.7)
    tnu.clip_grad_value_(ref, 0.7)
    for a, b in zip(ps, ref):
        assert torch.equal(a.grad, b.grad)


def test_bad_inputs():
    with pytest.raises(TypeError, match="expected a Tensor"):
        torchfast.get_total_norm([torch.ones(2), "x"])
    with pytest.raises(RuntimeError, match="Expected a floating point or complex tensor"):  # stock's error
        torchfast.get_total_norm([torch.ones(2, dtype=torch.int32)])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "after-float"])
def test_integer_gradients_get_stock_errors(dtype, mixed):
    """Integer and bool gradients get stock's exception (type and message) from every function, and the
    float gradients listed before them are left as they were."""
    def outcome(fn):
        # (a Parameter refuses a gradient of another dtype; the functions read .grad of anything)
        ps = [types.SimpleNamespace(grad=torch.full((3,), 5.0).to(dt))
              for dt in ([torch.float32] if mixed else []) + [dtype]]
        try:
            fn(ps)
        except Exception as e:  # noqa: BLE001
            assert all(torch.equal(p.grad, torch.full((3,), 5.0).to(p.grad.dtype)) for p in ps)
            return type(e), str(e)
        return "accepted"

    for name, args in (("clip_grad_norm_", (1.0,)), ("clip_grads_with_norm_", (1.0, torch.tensor(50.0))),
                       ("clip_grad_value_", (1.0,))):
        want = outcome(lambda ps: getattr(tnu, name)(ps, *args))
        assert want[0] is RuntimeError
        assert outcome(lambda ps: getattr(torchfast, name)(ps, *args)) == want, name
    want = outcome(lambda ps: tnu.get_total_norm([p.grad for p in ps]))
    assert outcome(lambda ps: torchfast.get_total_norm([p.grad for p in ps])) == want


def test_thread_count_invariance(cpu_backend_built):
    grads = [p.grad for p in _params(torch.float32, shapes=[(300, 700), (3,), (50000,), (64, 64)] * 3)]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torchfast.use_backend("cpu"):
                results.append([torchfast.get_total_norm(grads, p) for p in (1.0, 2.0, 3.0, math.inf)])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_clipping_is_the_same_on_any_thread_count(cpu_backend_built):
    """The chunk table is split between threads by element count, so the split points move with the
    thread count and with where the many small tensors sit: every chunk must still be read and scaled
    exactly once. Small tensors between and around large ones; more threads than large tensors."""
    shapes = [(3,)] * 30 + [(300, 700)] + [(5, 7)] * 25 + [(50000,)] + [(2,)] * 40 + [(64, 64), (130001,)]
    ref = _params(torch.float32, shapes=shapes)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 5, 8):
            torch.set_num_threads(threads)
            ps = _clone(ref)
            with torchfast.use_backend("cpu"):
                norm = torchfast.clip_grad_norm_(ps, 1.0)
            results.append((norm, [p.grad for p in ps]))
    finally:
        torch.set_num_threads(before)
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in ref])
    torch.testing.assert_close(results[0][0], expected_norm)
    coef = 1.0 / (float(results[0][0]) + 1e-6)
    for p, g in zip(ref, results[0][1]):  # a chunk skipped or scaled twice would be off by coef
        torch.testing.assert_close(g, p.grad * coef)
    for norm, grads in results[1:]:
        assert torch.equal(norm, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.equal(a, b)


def test_cpu_instruction_set_paths_agree(cpu_backend_built, tmp_path):
    """The clipping loops compiled for AVX-512, AVX2 and the baseline (chosen by the CPU; forced down with
    TORCHFAST_NO_AVX512 / TORCHFAST_NO_AVX2) sum the same fixed lanes in the same order: 1-, 2-, 3.5-
    (the same scalar pow in every set) and inf-norms and the scaled gradients are bitwise equal across
    the three, in every dtype."""
    import os
    import subprocess
    import sys
    code = (
        "import sys, torch, torchfast\n"
        "out = {}\n"
        "for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    ts = [torch.randn(n, generator=g).to(dt) for n in (1, 15, 16, 17, 31, 32, 33, 1000, 70001, 3 * 32768 + 5)]\n"
        "    for p in (1.0, 2.0, float('inf'), 3.5):\n"
        "        out[(str(dt), p)] = torch.ops.torchfast.multi_tensor_norm(ts, p)\n"
        "    torch.ops.torchfast.multi_tensor_clip_(ts, torch.tensor(3.0), 1.0)\n"
        "    out[(str(dt), 'scaled')] = torch.cat([t.flatten() for t in ts])\n"
        "torch.save(out, sys.argv[1])\n")
    results = {}
    for name, env in [("default", {}), ("avx2", {"TORCHFAST_NO_AVX512": "1"}),
                      ("base", {"TORCHFAST_NO_AVX512": "1", "TORCHFAST_NO_AVX2": "1"})]:
        path = str(tmp_path / (name + ".pt"))
        r = subprocess.run([sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        results[name] = torch.load(path)
    for other in ("avx2", "base"):
        for key, a in results["default"].items():
            b = results[other][key]
            assert torch.equal(a, b), (other, key)


def _lane_norm(tensors, norm_type):
    """The CPU kernel's norm, emulated with numpy: each tensor in chunks of 32768 elements, each chunk in
    16 lanes (element i + j of every group of 16 to lane j, in order, in the tensors' dtype, float32 or
    float64; the chunk's last n % 16 elements to lanes 0, 1, ...), each chunk's lanes summed in float64
    in order, the chunks' sums in list order, the result in the tensors' dtype."""
    import numpy as np
    total = 0.0
    for t in tensors:
        x = np.abs(t.detach().flatten().numpy())
        for b in range(0, x.size, 32768):
            c = x[b:b + 32768]
            body = c.size - c.size % 16
            terms = c if norm_type == 1.0 else c * c  # products rounded once, in the dtype
            lanes = np.zeros(16, dtype=c.dtype)
            if body:
                lanes = np.cumsum(terms[:body].reshape(-1, 16), axis=0, dtype=c.dtype)[-1].copy()
            lanes[:c.size - body] += terms[body:]
            partial = 0.0
            for v in lanes:
                partial += float(v)
            total += partial
    out = total if norm_type == 1.0 else math.sqrt(total)
    return float(np.float32(out)) if tensors[0].dtype == torch.float32 else out


def test_cpu_norm_is_the_fixed_lane_sum(cpu_backend_built):
    """The CPU kernels read each thread's chunks as interleaved streams (four for float32, two for
    float64); the norm must still be exactly the fixed-lane sum (see _lane_norm) on any thread count:
    lists with chunk tails of every residue mod 16, tensors shorter than a lane group, long tensors split
    over streams and threads. Three kinds of values: float32 normals (the order of the float32 sums
    shows in the last bits); float32 integers with the 1-norm, whose sums are exact, so an element
    skipped or counted twice changes the result by at least 1; float64 normals, whose float64 result
    shows an element of any size skipped or counted twice."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 15, 16, 17, 47, 32768, 32769, 100003, 5, 65536 + 31, 3, 250000, 7 * 32768 + 9]
    lists = [
        ([torch.randn(n, generator=g) for n in sizes], (1.0, 2.0)),
        ([torch.randint(1, 9, (n,), generator=g).float() * (1 - 2 * (torch.rand(n, generator=g) < 0.5).float())
          for n in sizes], (1.0,)),
        ([torch.randn(n, generator=g, dtype=torch.float64) for n in sizes], (1.0, 2.0)),
    ]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for tensors, norm_types in lists:
                for norm_type in norm_types:
                    got = torch.ops.torchfast.multi_tensor_norm(tensors, norm_type)
                    assert got.item() == _lane_norm(tensors, norm_type), (threads, norm_type, tensors[0].dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_inf_norm_finds_every_element(cpu_backend_built, dtype):
    """The inf-norm's max and NaN flag are kept per lane and per stream: one large value or one NaN at
    any position (a lane group's first or last lane, a chunk's tail, each of a thread's streams, the
    last element) must be found, on 1 and 2 threads."""
    sizes = [37, 32768 * 3 + 11, 17, 32768 * 5 + 3]
    n_total = sum(sizes)
    positions = [0, 15, 16, 36, 37, 37 + 32768 * 3, 37 + 32768 * 3 + 10, 37 + 32768 * 3 + 11 + 16,
                 n_total - 3 - 32768 * 2, n_total - 4, n_total - 1]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for pos in positions:
                for bad in (100.0, -100.0, float("nan")):
                    flat = torch.rand(n_total, generator=torch.Generator().manual_seed(pos)).to(dtype)
                    flat[pos] = bad
                    tensors = list(flat.split(sizes))
                    got = torch.ops.torchfast.multi_tensor_norm(tensors, math.inf)
                    if math.isnan(bad):
                        assert got.isnan(), (threads, pos)
                    else:
                        assert got.item() == 100.0, (threads, pos, bad, got)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device,backend", backend_params("clip_grad"))
@pytest.mark.parametrize("threads", [1, 2])
def test_gradients_sharing_memory_are_scaled_once_per_listing(device, backend, threads):
    """A gradient listed twice, and gradients that are overlapping views of one block, are multiplied
    once per listing, as stock's element-by-element _foreach_mul_ does (on the CPU the threads, on a GPU
    the blocks of one launch, write at once: such tensors must be scaled in separate passes, or updates
    are lost). Long enough that the chunk table splits over threads and streams. The race itself can
    show only with two CPU threads here (the Triton interpreter runs a launch's blocks one at a time:
    there this checks the split's results)."""
    torchfast.set_backend(backend)
    n = 300_000 if backend != "triton" else 3000

    def build():
        g = torch.Generator().manual_seed(11)
        base = torch.randn(2 * n, generator=g).to(device)
        other = torch.randn(n // 3, generator=g).to(device)
        grads = [base[:n], other, base[n // 2:n // 2 + n], base[:n], base[n:]]  # listed twice; overlapping views
        ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(ps, grads):
            p.grad = t
        return ps, base, other

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for call in ("clip_grad_norm_", "clip_grads_with_norm_"):
            ps, base, other = build()
            ref_ps, ref_base, ref_other = build()
            if call == "clip_grad_norm_":
                got = torchfast.clip_grad_norm_(ps, 1.0)
                want = tnu.clip_grad_norm_(ref_ps, 1.0)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # float32 sums of 1.5M squares
            else:
                norm = torch.tensor(50.0, device=device)
                torchfast.clip_grads_with_norm_(ps, 1.0, norm)
                tnu.clip_grads_with_norm_(ref_ps, 1.0, norm)
            # elements listed once, twice or three times: scaled that many times, never fewer
            torch.testing.assert_close(base, ref_base, rtol=1e-5, atol=0)
            torch.testing.assert_close(other, ref_other, rtol=1e-5, atol=0)
    finally:
        torch.set_num_threads(before)


def test_many_small_tensors():
    ps = _params(torch.float32, shapes=[(64,)] * 2000)
    ref = _clone(ps)
    torch.testing.assert_close(torchfast.clip_grad_norm_(ps, 1.0), tnu.clip_grad_norm_(ref, 1.0))
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    if torchfast._ext._C is None:
        pytest.skip("compiled extension not built")
    grads = [torch.randn(5, 3), torch.randn(17), torch.randn(2, 2, 2)]
    for p in (1.0, 2.0, 3.0, math.inf):
        torch.library.opcheck(torch.ops.torchfast.multi_tensor_norm, (grads, p))
    torch.library.opcheck(torch.ops.torchfast.multi_tensor_clip_, ([g.clone() for g in grads], torch.tensor(10.0), 1.0))
    for p in (2.0, math.inf):
        torch.library.opcheck(torch.ops.torchfast.clip_grad_norm_fused_, ([g.clone() for g in grads], 0.5, p))


def test_torch_compile():
    def step(ps):
        return torchfast.clip_grad_norm_(ps, 1.0)

    ps = _params(torch.float32)
    ref = _clone(ps)
    n = torch.compile(step, backend="aot_eager")(ps)
    torch.testing.assert_close(n, tnu.clip_grad_norm_(ref, 1.0))
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.grad, b.grad)


@requires_cuda
def test_cuda_no_host_sync_and_graph_capture():
    ps = _params(torch.float32, "cuda", scale=3.0)
    ref = _clone(ps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = torchfast.clip_grad_norm_(ps, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(n, tnu.clip_grad_norm_(ref, 1.0))
    g = torch.cuda.CUDAGraph()
    static = _params(torch.float32, "cuda", scale=3.0)
    torchfast.clip_grad_norm_(static, 1.0)  # warm-up outside capture
    with torch.cuda.graph(g):
        out = torchfast.clip_grad_norm_(static, 1.0)
    g.replay()
    assert torch.isfinite(out)


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # hypothesis is in the test extras; without it the property test is skipped
    given = None

if given is not None:
    @settings(max_examples=40, deadline=None)
    @given(sizes=st.lists(st.integers(0, 70000), min_size=1, max_size=12),
           norm_type=st.sampled_from([1.0, 2.0, 3.0, math.inf]), max_norm=st.floats(1e-3, 1e3),
           seed=st.integers(0, 2 ** 16))
    def test_property_cpu_matches_stock(sizes, norm_type, max_norm, seed):
        """Random lists (empty tensors, chunk-boundary sizes): same norm and clipped grads as stock."""
        g = torch.Generator().manual_seed(seed)
        ps = []
        for n in sizes:
            p = torch.nn.Parameter(torch.empty(n, dtype=torch.float64))
            p.grad = torch.randn(n, generator=g, dtype=torch.float64)
            ps.append(p)
        ref = _clone(ps)
        if math.isinf(norm_type) and 0 in sizes:  # stock refuses: no identity for max over nothing
            with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
                tnu.clip_grad_norm_(ref, max_norm, norm_type)
            with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
                torchfast.clip_grad_norm_(ps, max_norm, norm_type)
            return
        n_fast = torchfast.clip_grad_norm_(ps, max_norm, norm_type)
        n_ref = tnu.clip_grad_norm_(ref, max_norm, norm_type)
        torch.testing.assert_close(n_fast, n_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)

else:
    def test_property_cpu_matches_stock():
        pytest.skip("hypothesis is a test extra (pip install .[test]); the property test needs it")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on a GPU other than the current)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_on_the_second_gpu_triton_and_cuda(backend):
    """cuda:1 tensors while cuda:0 is current: the kernels must run on the tensors' GPU."""
    skip_unsupported(backend, "clip_grad", "cuda", torch.float32)
    torchfast.set_backend(backend)
    ps = _params(torch.float32, "cuda:1")
    ref = _clone(ps)
    with torch.cuda.device(0):
        n = torchfast.clip_grad_norm_(ps, 0.5)
    torch.testing.assert_close(n, tnu.clip_grad_norm_(ref, 0.5), rtol=1e-5, atol=0)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
