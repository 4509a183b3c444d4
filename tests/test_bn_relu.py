"""Fused BatchNorm+ReLU against stock relu(batch_norm(x)) and the reference, on every backend."""
import copy
import io
import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import BatchNormAddReLU2d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from torchfast.nn.functional import batch_norm_add_relu, batch_norm_relu

from conftest import (FLOAT_DTYPES, assert_close_to_oracle, backend_params, jit_save_load, requires_cuda, script_module,
                      skip_unsupported)

STOCK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUSED = {1: BatchNormReLU1d, 2: BatchNormReLU2d, 3: BatchNormReLU3d}

# (kind, shape, layout): odd sizes, size-1 dims, both layouts
CASES = [
    (1, (7, 3), "contiguous"),
    (1, (5, 4, 9), "contiguous"),
    (1, (2, 1, 1), "contiguous"),
    (2, (3, 5, 7, 9), "contiguous"),
    (2, (3, 5, 7, 9), "channels_last"),
    (2, (1, 3, 1, 2), "channels_last"),
    (2, (2, 16, 1, 1), "contiguous"),
    (3, (2, 3, 4, 5, 3), "contiguous"),
    (3, (2, 3, 4, 5, 3), "channels_last"),
]


def _make_input(shape, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _pair(kind, c, dtype, device, **kw):
    """A stock BN in float64 (the oracle) and in dtype, and a fused one, all with the same state."""
    g = torch.Generator().manual_seed(1)
    stock64 = STOCK[kind](c, dtype=torch.float64, **kw)
    if stock64.affine:
        with torch.no_grad():
            stock64.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            stock64.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
    if stock64.track_running_stats:
        with torch.no_grad():
            stock64.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
            stock64.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    # Half inputs run with float32 parameters, as mixed-precision training does.
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    stock_lowp = copy.deepcopy(stock64).to(pdtype)
    fused = FUSED[kind](c, dtype=pdtype, **kw)
    fused.load_state_dict(stock_lowp.state_dict())
    return stock64.to(device), stock_lowp.to(device), fused.to(device)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
@pytest.mark.parametrize("kind,shape,layout", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_stock(device, backend, kind, shape, layout, dtype, training):
    skip_unsupported(backend, "bn_relu", device, dtype)
    if training and shape[0] * (torch.Size(shape).numel() // shape[0] // shape[1]) == 1:
        pytest.skip("one value per channel is an error in training (tested separately)")
    c = shape[1]
    stock64, stock_lowp, fused = _pair(kind, c, dtype, device)
    for m in (stock64, stock_lowp, fused):
        m.train(training)
    x = _make_input(shape, layout, dtype, device)
    x64 = x.double().clone().requires_grad_()
    xl = x.clone().requires_grad_()
    xf = x.clone().requires_grad_()
    y64 = F.relu(stock64(x64))
    yl = F.relu(stock_lowp(xl))
    torchfast.set_backend(backend)
    yf = fused(xf)
    assert yf.dtype == x.dtype and yf.shape == x.shape
    if layout == "channels_last":
        assert yf.stride() == x.stride(), "output must keep the input's channels_last layout"
    assert_close_to_oracle(yf.detach(), yl.detach(), y64.detach(), "output")

    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    (y64 * gy).sum().backward()
    (yl * gy.to(dtype)).sum().backward()
    (yf * gy.to(dtype)).sum().backward()
    assert_close_to_oracle(xf.grad, xl.grad, x64.grad, "grad_input", atol_ulps=16)
    assert_close_to_oracle(fused.weight.grad, stock_lowp.weight.grad, stock64.weight.grad, "grad_weight",
                           atol_ulps=16 * x[0, 0].numel())
    assert_close_to_oracle(fused.bias.grad, stock_lowp.bias.grad, stock64.bias.grad, "grad_bias",
                           atol_ulps=16 * x[0, 0].numel())
    assert fused.weight.grad.dtype == fused.weight.dtype
    assert_close_to_oracle(fused.running_mean, stock_lowp.running_mean, stock64.running_mean, "running_mean")
    assert_close_to_oracle(fused.running_var, stock_lowp.running_var, stock64.running_var, "running_var")
    assert fused.num_batches_tracked.item() == stock64.num_batches_tracked.item()


# Shapes past the small CASES: reductions split more than 32 ways (several fold steps), tiles with
# masked rows and columns, more than one channel block in channels_last, S == 1 read as channels.
TILING_CASES = [
    ((300, 2, 16, 20), "contiguous"),
    ((300, 3, 8, 8), "channels_last"),
    ((2, 1040, 2, 2), "channels_last"),
    ((5, 4, 3, 3), "contiguous"),
    ((513, 6), "contiguous"),
]


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
@pytest.mark.parametrize("shape,layout", TILING_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_and_tiled_shapes(device, backend, shape, layout, dtype):
    skip_unsupported(backend, "bn_relu", device, dtype)
    x = _make_input(shape, layout, dtype, device, seed=11)
    c = shape[1]
    g = torch.Generator().manual_seed(12)
    w = (torch.rand(c, generator=g) + 0.5).to(device)
    b = (torch.randn(c, generator=g) * 0.3).to(device)
    gy = torch.randn(shape, generator=g).to(dtype).to(device)
    if layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    results = {}
    for name, inp in (("fast", x), ("lowp", x), ("oracle", x.double())):
        xi = inp.clone().requires_grad_()
        wi, bi = [t.double() if name == "oracle" else t.clone() for t in (w, b)]
        wi.requires_grad_()
        bi.requires_grad_()
        with torchfast.use_backend(backend if name == "fast" else "reference"):
            y = batch_norm_relu(xi, None, None, wi, bi, True, 0.1, 1e-5)
        y.backward(gy.to(y.dtype))
        results[name] = (y.detach(), xi.grad, wi.grad, bi.grad)
    sums = x.numel() // c  # elements per channel: the length of the grad_weight/grad_bias sums
    for i, what in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
        assert_close_to_oracle(results["fast"][i], results["lowp"][i], results["oracle"][i], what,
                               atol_ulps=16 if i < 2 else 16 * sums)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(device, backend, training, layout):
    skip_unsupported(backend, "bn_relu", device, torch.float64)
    x = _make_input((3, 4, 3, 5), layout, torch.float64, device).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = (torch.randn(4, dtype=torch.float64, device=device) * 0.2).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=device) * 0.1
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    torchfast.set_backend(backend)

    def f(x, w, b):
        # Running stats are cloned so gradcheck's repeated calls see the same state.
        return batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
    # Double backward (gradient penalties such as WGAN-GP and R1): a differentiable composite backward
    # that runs only under create_graph=True.
    assert torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_non_contiguous_input(device, backend):
    base = _make_input((4, 6, 10, 8), "contiguous", torch.float32, device)
    xs = [base[:, ::2], base.transpose(2, 3), base[..., 1:7]]
    torchfast.set_backend(backend)
    for x in xs:
        c = x.shape[1]
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        xr = x.detach().clone().requires_grad_()
        xf = x.detach().clone().requires_grad_()
        ref = F.relu(F.batch_norm(xr, rm.clone(), rv.clone(), training=True))
        out = batch_norm_relu(xf, rm.clone(), rv.clone(), training=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g)
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    # A genuinely strided view (not dense): slicing the channel dim.
    x = base[:, 1::2, :, 1:]
    assert not x.is_contiguous()
    out = batch_norm_relu(x, None, None, training=True)
    torch.testing.assert_close(out, F.relu(F.batch_norm(x, None, None, training=True)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_large_mean_is_stable(device, backend):
    # Shifted sums: a mean of 1e4 with unit variance must not lose the variance in float32.
    x = (torch.randn(8, 3, 32, 32, dtype=torch.float64) + 1e4).to(device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    torchfast.set_backend(backend)
    out = batch_norm_relu(x.float(), rm, rv, training=True, momentum=1.0)
    ref = F.relu(F.batch_norm(x, None, None, training=True))
    assert (out.double() - ref).abs().max().item() < 2e-3
    torch.testing.assert_close(rv.double(), x.var(dim=(0, 2, 3)), rtol=1e-3, atol=0)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_module_options(device, backend):
    """momentum=None (cumulative average), track_running_stats=False, affine=False."""
    torchfast.set_backend(backend)
    for kw in [dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
               dict(affine=False, track_running_stats=False), dict(eps=1e-3, momentum=0.3)]:
        stock = nn.BatchNorm2d(5, **kw).to(device)
        fused = BatchNormReLU2d(5, **kw).to(device)
        fused.load_state_dict(stock.state_dict())
        for step in range(3):
            x = _make_input((4, 5, 3, 3), "contiguous", torch.float32, device, seed=step)
            torch.testing.assert_close(fused(x), F.relu(stock(x)), rtol=1e-5, atol=1e-5)
        for (k1, v1), (k2, v2) in zip(stock.state_dict().items(), fused.state_dict().items()):
            assert k1 == k2
            torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-6)
        stock.eval()
        fused.eval()
        x = _make_input((4, 5, 3, 3), "contiguous", torch.float32, device, seed=9)
        torch.testing.assert_close(fused(x), F.relu(stock(x)), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    for kind in (1, 2, 3):
        stock = STOCK[kind](6)
        with torch.no_grad():
            stock.weight.uniform_()
            stock.running_mean.normal_()
        stock.num_batches_tracked.fill_(7)
        fused = FUSED[kind](6)
        fused.load_state_dict(stock.state_dict())
        assert isinstance(fused, STOCK[kind])
        back = STOCK[kind](6)
        back.load_state_dict(fused.state_dict())
        for k, v in stock.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        assert list(fused.state_dict().keys()) == list(stock.state_dict().keys())
        converted = FUSED[kind].from_batchnorm(stock)
        assert torch.equal(converted.running_mean, stock.running_mean)


def test_convert_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(model)(x)
    torchfast.nn.convert_batchnorm_relu(model)
    assert isinstance(model[1], BatchNormReLU2d) and isinstance(model[2], nn.Identity)
    assert type(model[4]) is nn.BatchNorm2d  # no ReLU after it: left alone
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_saves_only_input_and_channel_stats(device, backend):
    torchfast.set_backend(backend)
    x = _make_input((4, 8, 6, 6), "contiguous", torch.float32, device).requires_grad_()
    layer = BatchNormReLU2d(8).to(device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    full = [t for t in saved if t.numel() == x.numel()]
    assert len(full) == 1 and full[0].data_ptr() == x.data_ptr(), "only the input may be saved full-size"
    assert all(t.numel() <= 8 for t in saved if t.numel() != x.numel())
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_float_inputs_get_stock_errors(dtype, training):
    """An integer, bool or complex input gets stock's exception (type and message), from the layers and
    the functionals alike (it was a TypeError of torchfast's own)."""
    def outcome(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            return type(e), str(e)
        return "accepted"

    x = torch.ones(4, 3, 2, 2, dtype=dtype)
    stock = nn.BatchNorm2d(3).train(training)
    want = outcome(lambda: F.relu(stock(x)))
    assert want[0] is NotImplementedError
    assert outcome(lambda: BatchNormReLU2d(3).train(training)(x)) == want
    assert outcome(lambda: BatchNormAddReLU2d(3).train(training)(x, x)) == want
    assert outcome(lambda: batch_norm_relu(x, stock.running_mean, stock.running_var, training=training)) == want
    assert outcome(lambda: batch_norm_add_relu(x, x, stock.running_mean, stock.running_var, training=training)) == want


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_errors(device, backend):
    torchfast.set_backend(backend)
    layer = BatchNormReLU2d(3).to(device)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BatchNormReLU1d(3).to(device)(torch.randn(1, 3, device=device))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(2, 4, 3, 3, device=device))
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):  # stock's error
        batch_norm_relu(torch.ones(2, 3, 2, 2, dtype=torch.int64, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        batch_norm_relu(torch.randn(5, device=device), None, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batch_norm_relu(torch.randn(2, 3, device=device), None, None, training=False)
    with pytest.raises(RuntimeError, match="weight is on meta but input is on"):
        batch_norm_relu(torch.randn(2, 3, device=device), None, None, torch.ones(3, device="meta"), training=True)


# Scalar arguments F.batch_norm takes or refuses: the functionals must give stock's result or error.
_SCALAR_CASES = {
    "eps string": dict(eps="1e-5"), "eps None": dict(training=True, eps=None), "eps int": dict(eps=1),
    "eps bool": dict(eps=True), "eps numpy": dict(eps=np.float32(1e-3)), "eps 0-dim": dict(eps=torch.tensor(1e-3)),
    "eps 0-dim requiring grad": dict(eps=torch.tensor(1e-3, requires_grad=True)), "eps negative": dict(eps=-1.0),
    "eps 0 in training": dict(training=True, eps=0.0), "eps 0 in eval": dict(eps=0.0),
    "momentum None in training": dict(training=True, momentum=None), "momentum None in eval": dict(momentum=None),
    "momentum string in eval": dict(momentum="0.1"), "momentum numpy": dict(training=True, momentum=np.float64(0.3)),
    "momentum int": dict(training=True, momentum=1), "training int": dict(training=1),
    "training numpy": dict(training=np.bool_(True)), "training None": dict(training=None),
    "training 0-dim": dict(training=torch.tensor(True)),
    "eps negative and wrong running_mean": dict(eps=-1.0, running_mean=torch.zeros(4)),
}


def _outcome(f):
    try:
        return f()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("case", list(_SCALAR_CASES))
def test_scalar_arguments_as_stock(cpu_backend_built, case, residual):
    """training, momentum and eps of every type F.batch_norm takes (numpy scalars, 0-dim tensors, ints)
    give stock's outputs and running statistics; every one it refuses (a string, None, a non-bool
    training, a non-positive eps in training, a negative one) gives stock's exception and message, even
    in eval mode, where the momentum is not read, and before a wrong tensor argument."""
    kw = dict(_SCALAR_CASES[case])
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    rm = kw.pop("running_mean", torch.randn(3, generator=g))
    rv = torch.rand(3, generator=g) + 0.5

    def stock():
        mean, var = rm.clone(), rv.clone()
        y = F.batch_norm(x, mean, var, **kw)
        return torch.relu(y + r if residual else y), mean, var

    def fused():
        mean, var = rm.clone(), rv.clone()
        with torchfast.use_backend("cpu"):
            y = batch_norm_add_relu(x, r, mean, var, **kw) if residual else batch_norm_relu(x, mean, var, **kw)
        return y, mean, var

    want, got = _outcome(stock), _outcome(fused)
    if isinstance(want[0], type):  # stock raised
        assert got == want
    else:
        assert not isinstance(got[0], type), got
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_running_stats_requiring_grad_refused_as_stock(device, backend):
    """Running statistics that require grad: refused with stock's error while grad mode is on (train and
    eval), accepted under no_grad, with stock's result, by both functionals and on every backend."""
    torchfast.set_backend(backend)
    x = torch.randn(4, 3, 2, 2, device=device)
    for residual in (False, True):
        for training in (True, False):
            for grad in (True, False):
                for which in ("running_mean", "running_var"):
                    outcomes = []
                    for fused in (False, True):
                        rm = torch.zeros(3, device=device, requires_grad=which == "running_mean")
                        rv = torch.ones(3, device=device, requires_grad=which == "running_var")

                        def call():
                            with torch.set_grad_enabled(grad):
                                if fused:
                                    return (batch_norm_add_relu(x, x, rm, rv, training=training) if residual
                                            else batch_norm_relu(x, rm, rv, training=training)), rm.detach(), rv.detach()
                                y = F.batch_norm(x, rm, rv, training=training)
                                return torch.relu(y + x if residual else y), rm.detach(), rv.detach()

                        outcomes.append(_outcome(call))
                    want, got = outcomes
                    if isinstance(want[0], type):
                        assert grad and got == want, (residual, training, which)
                    else:
                        assert not grad and not isinstance(got[0], type), got
                        for a, b in zip(got, want):
                            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_running_statistics_versions_as_stock(device, backend):
    """The running statistics are updated without a version bump, as stock's native_batch_norm does
    (its schema does not mark them written): a bump would refuse backwards that stock runs."""
    torchfast.set_backend(backend)
    fused, stock = BatchNormReLU2d(3).to(device), nn.BatchNorm2d(3).to(device)
    before = [(t._version, u._version) for t, u in ((fused.running_mean, stock.running_mean),
                                                   (fused.running_var, stock.running_var))]
    x = torch.randn(4, 3, 2, 2, device=device)
    fused(x), stock(x)
    after = [(t._version, u._version) for t, u in ((fused.running_mean, stock.running_mean),
                                                  (fused.running_var, stock.running_var))]
    assert [a[0] - b[0] for a, b in zip(after, before)] == [a[1] - b[1] for a, b in zip(after, before)]
    torch.testing.assert_close(fused.running_var, stock.running_var)


def test_compiled_layer_keeps_the_fused_op(cpu_backend_built):
    """The scalar checks in front of the fused op trace under torch.compile: the graph calls the fused
    op, not stock's composition (train and eval, a layer built with an int eps too)."""
    seen = []

    def backend(gm, _inputs):
        seen.append(str(gm.graph))
        return gm.forward

    for eps in (1e-5, 1):
        layer = BatchNormReLU2d(3, eps=eps)
        with torchfast.use_backend("cpu"):
            for train in (True, False):
                layer.train(train)
                torch._dynamo.reset()
                seen.clear()
                torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(4, 3, 2, 2))
                assert len(seen) == 1 and "torchfast.bn_relu" in seen[0] and "batch_norm" not in seen[0], seen


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_empty_batch(device, backend):
    torchfast.set_backend(backend)
    layer = BatchNormReLU2d(3).to(device)
    before = layer.running_mean.clone()
    out = layer(torch.randn(0, 3, 4, 4, device=device))
    assert out.shape == (0, 3, 4, 4)
    assert torch.equal(layer.running_mean, before)


def test_opcheck_compiled_and_reference():
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ops = [torch.ops.torchfast.bn_relu_fwd_reference]
    if torchfast._ext._C is not None:
        ops.append(torch.ops.torchfast.bn_relu_fwd)
    for op in ops:
        for training in (True, False):
            for inp in (x, xcl):
                torch.library.opcheck(op, (inp, w, b, rm, rv, training, 1e-5))
            torch.library.opcheck(op, (x.detach().double(), None, None, rm.double(), rv.double(), training, 1e-3))
    if torchfast._ext._C is not None:
        out, mean, invstd, _ = torch.ops.torchfast.bn_relu_fwd(x.detach(), w, b, rm, rv, True, 1e-5)
        torch.library.opcheck(torch.ops.torchfast.bn_relu_bwd,
                              (torch.randn_like(out), x.detach(), w.detach(), b.detach(), mean, invstd, True))


def test_torch_compile_module():
    """The fused layer traces into a torch.compile graph (fake kernel + registered autograd)."""
    layer = BatchNormReLU2d(4)
    stock = nn.BatchNorm2d(4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 5, 5)
    xc, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = compiled(xc)
    ys = F.relu(stock(xs))
    torch.testing.assert_close(yc, ys, rtol=1e-5, atol=1e-5)
    yc.sum().backward()
    ys.sum().backward()
    torch.testing.assert_close(xc.grad, xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.running_var, stock.running_var)


@requires_cuda
def test_triton_compiles_fullgraph():
    """The Triton forward/backward are triton_ops: torch.compile traces them without graph breaks."""
    layer = BatchNormReLU2d(8).cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda", requires_grad=True)
    with torchfast.use_backend("triton"):
        y = torch.compile(layer, fullgraph=True)(x)
        y.sum().backward()
    ref = F.relu(F.batch_norm(x.detach(), None, None, layer.weight, layer.bias, training=True))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@requires_cuda
def test_triton_compiles_with_dynamic_batch():
    """torch.compile(dynamic=True) over the Triton ops: batch sizes 3..9 in both layouts give stock's
    results, and the batch size stays symbolic (at most one recompile per layout, not one per size)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    layer = BatchNormReLU2d(8).cuda()
    compiled = torch.compile(layer, dynamic=True, backend=counter)
    with torchfast.use_backend("triton"):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for n in (3, 5, 9):
                x = torch.randn(n, 8, 14, 14, device="cuda").contiguous(memory_format=fmt).requires_grad_()
                y = compiled(x)
                y.sum().backward()
                ref = F.relu(F.batch_norm(x.detach(), None, None, layer.weight, layer.bias, training=True))
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # one graph per layout at most: a recompile per batch size would make 6
    assert counter.frame_count <= 2, counter.frame_count


@requires_cuda
def test_cuda_autocast_and_graph():
    layer = BatchNormReLU2d(8).cuda()
    x = torch.randn(4, 8, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    layer.eval()
    static_x = torch.randn(4, 8, 16, 16, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = layer(static_x)
    static_x.copy_(x)
    g.replay()
    torch.testing.assert_close(static_y, F.relu(F.batch_norm(x, layer.running_mean, layer.running_var,
                                                               layer.weight, layer.bias)))


try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # hypothesis is in the test extras; without it these property tests are skipped
    given = None

if given is not None:
    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(1, 5), c=st.integers(1, 9), h=st.integers(1, 7), w=st.integers(1, 7),
           channels_last=st.booleans(), training=st.booleans(), affine=st.booleans(),
           seed=st.integers(0, 2 ** 16))
    def test_property_cpu_matches_reference(n, c, h, w, channels_last, training, affine, seed):
        """Random shapes and layouts: the C++ kernels agree with the reference, forward and backward."""
        if torchfast._backends.why_not("cpu", "bn_relu", "cpu", torch.float32) is not None:
            pytest.skip("cpu backend not built")
        if training and n * h * w == 1:
            return
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 3 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wt = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if affine else None
        bs = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
        rm, rv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        gy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
        outs = {}
        for backend in ("reference", "cpu"):
            xi = x.clone().requires_grad_()
            with torchfast.use_backend(backend):
                y = batch_norm_relu(xi, rm.clone(), rv.clone(), wt, bs, training, 0.1, 1e-5)
                y.backward(gy)
            outs[backend] = (y.detach(), xi.grad)
        torch.testing.assert_close(outs["cpu"][0], outs["reference"][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(outs["cpu"][1], outs["reference"][1], rtol=1e-8, atol=1e-9)

else:
    def test_property_cpu_matches_reference():
        pytest.skip("hypothesis is a test extra (pip install .[test]); the property test needs it")


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_conversions_exhaustive(device, backend, dtype):
    """Eval with mean 0, var 1, eps 0, weight 1, bias 0 is relu(x * 1 + 0) exactly: every one of the
    65536 half/bfloat16 bit patterns must come back bit for bit (negative and -0 -> +0, NaN stays NaN)."""
    skip_unsupported(backend, "bn_relu", device, dtype)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).to(device)
    expected = torch.where(x <= 0, torch.zeros((), dtype=dtype, device=device), x)
    torchfast.set_backend(backend)
    for shaped in (x.view(1, 1, 256, 256), x.view(65536, 1), x.view(256, 1, 256)):
        c = shaped.shape[1]
        ones = torch.ones(c, device=device)
        y = batch_norm_relu(shaped, torch.zeros(c, device=device), ones, ones, torch.zeros(c, device=device),
                            training=False, eps=0.0).reshape(-1)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(y), nan)
        assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_nan_propagates_like_stock(device, backend):
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 3] = float("nan")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    torchfast.set_backend(backend)
    y = batch_norm_relu(x, rm, rv, training=False)
    ref = F.relu(F.batch_norm(x, rm, rv, training=False))
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_cpu_instruction_set_paths_agree(cpu_backend_built, tmp_path):
    """The CPU kernels compiled for AVX2 (8-lane rows, chosen when the CPU has AVX2) against the baseline
    set with the portable half conversions (TORCHFAST_NO_AVX2=1, TORCHFAST_NO_F16C=1: SSE2 rows, float16
    through float32 copies), for both ops, every dtype and both layouts, with C % 8 == 0 (the 8-lane
    channels_last rows) and C % 8 != 0. Both must be within rounding of each other: the sums are formed
    in another order, the elementwise formulas are the same. And the streaming-store rows (forced on
    these small tensors) against the ordinary ones: bitwise equal."""
    import os
    import subprocess
    import sys
    code = (
        "import sys, torch, torchfast\n"
        "out = {}\n"
        "for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):\n"
        "    for c in (24, 20):\n"
        "        for cl in (False, True):\n"
        "            g = torch.Generator().manual_seed(c)\n"
        "            x = (torch.randn(4, c, 9, 37, generator=g) * 2 + 0.3).to(dt)\n"
        "            r = torch.randn(4, c, 9, 37, generator=g).to(dt)\n"
        "            dy = torch.randn(4, c, 9, 37, generator=g).to(dt)\n"
        "            if cl:\n"
        "                x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))\n"
        "            w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)\n"
        "            if dt == torch.float64:\n"
        "                w, b = w.double(), b.double()\n"
        "            for tr in (True, False):\n"
        "                rm, rv = torch.randn(c, generator=g).to(w), (torch.rand(c, generator=g) + 0.5).to(w)\n"
        "                y, m, i, v = torch.ops.torchfast.bn_relu_fwd(x, w, b, rm, rv, tr, 1e-5)\n"
        "                out[(str(dt), c, cl, tr, 'relu')] = (y, m, i, v) + tuple(\n"
        "                    torch.ops.torchfast.bn_relu_bwd(dy, x, w, b, m, i, tr))\n"
        "                y, m, i, v = torch.ops.torchfast.bn_add_relu_fwd(x, r, w, b, rm, rv, tr, 1e-5)\n"
        "                out[(str(dt), c, cl, tr, 'add')] = (y, m, i, v) + tuple(\n"
        "                    torch.ops.torchfast.bn_add_relu_bwd(dy, y, x, w, m, i, tr))\n"
        "torch.save(out, sys.argv[1])\n")
    results = {}
    for name, env in [("default", {}), ("portable", {"TORCHFAST_NO_AVX2": "1", "TORCHFAST_NO_F16C": "1"}),
                      ("streaming", {"TORCHFAST_STREAM_MIN_BYTES": "0"}),
                      ("portable streaming", {"TORCHFAST_NO_AVX2": "1", "TORCHFAST_STREAM_MIN_BYTES": "0"})]:
        path = str(tmp_path / (name + ".pt"))
        r = subprocess.run([sys.executable, "-c", code, path], env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        results[name] = torch.load(path)
    # Non-temporal stores (taken for outputs past half the last-level cache; forced here) write what the
    # ordinary stores write, bit for bit, within each instruction set.
    for plain, streamed in (("default", "streaming"), ("portable", "portable streaming")):
        for key, a in results[plain].items():
            if key[0] == "torch.float32":
                for u, v in zip(a, results[streamed][key]):
                    assert torch.equal(u, v), (plain, key)
    tol = {"torch.float32": (1e-5, 1e-5), "torch.float64": (1e-12, 1e-12), "torch.float16": (2 * 2.0 ** -10, 2e-3),
           "torch.bfloat16": (2 * 2.0 ** -7, 2e-2)}
    for key, default in results["default"].items():
        rtol, atol = tol[key[0]]
        for a, b in zip(default, results["portable"][key]):
            # a value at a rounding boundary may land one step apart in half precision
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=str(key))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_short_rows(cpu_backend_built, dtype):
    """Contiguous maps of 1-7 and 9 elements (rows shorter than a vector: read and written with masked
    loads and stores, 16-bit types in pairs plus an odd last element), both ops, forward and backward,
    against the float64 oracle; and on 1 and 2 threads bit for bit alike (a store past its row would
    overwrite the next row, which the other thread may already have written)."""
    g = torch.Generator().manual_seed(11)
    ops = torch.ops.torchfast
    for hw in ((1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 3), (1, 7), (3, 3)):
        shape = (64, 13) + hw  # 832 rows: the second thread starts before the first is done
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3)
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        w, b = torch.rand(13, generator=g) + 0.5, torch.randn(13, generator=g)
        xl, rl, dyl = (t.to(dtype) for t in (x, r, dy))
        runs = []
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                y, m, i, _ = ops.bn_relu_fwd(xl, w, b, None, None, True, 1e-5)
                gx, gw, gb = ops.bn_relu_bwd(dyl, xl, w, b, m, i, True)
                ya, ma, ia, _ = ops.bn_add_relu_fwd(xl, rl, w, b, None, None, True, 1e-5)
                gxa, gra, gwa, gba = ops.bn_add_relu_bwd(dyl, ya, xl, w, ma, ia, True)
            finally:
                torch.set_num_threads(before)
            runs.append((y, gx, gw, gb, ya, gxa, gra, gwa, gba))
        for a, c in zip(*runs):
            assert torch.equal(a, c), (hw, dtype)
        # the float64 oracle, through the fused output's mask (an element at 0 in dtype may be above it in float64)
        xo, ro = xl.double().requires_grad_(), rl.double().requires_grad_()
        wo, bo = w.double().requires_grad_(), b.double().requires_grad_()
        pre = F.batch_norm(xo, None, None, wo, bo, True, 0.1, 1e-5)
        for pre_act, out, grads in ((pre, runs[0][0], runs[0][1:4]), (pre + ro, runs[0][4], runs[0][5:])):
            ref = torch.where(out > 0, pre_act, torch.zeros_like(pre_act))
            inputs = (xo, wo, bo) if len(grads) == 3 else (xo, ro, wo, bo)
            ref_grads = torch.autograd.grad(ref, inputs, dyl.double(), retain_graph=True)
            tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
            torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol, msg=str((hw, dtype)))
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10, msg=str((hw, dtype)))


def test_layer_reads_parametrized_weights_and_running_stats_switches():
    """The layer reads its parameters and buffers from the module's dicts (a per-call shortcut) but
    must still see what attribute access sees: a parametrized weight (no longer in _parameters), and
    track_running_stats switched off after construction (batch statistics, running ones untouched)."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    x = torch.randn(4, 3, 5, 5)
    fused, stock = BatchNormReLU2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        stock.weight.copy_(fused.weight)
    parametrize.register_parametrization(fused, "weight", Double())
    parametrize.register_parametrization(stock, "weight", Double())
    torch.testing.assert_close(fused(x), torch.relu(stock(x)))
    torch.testing.assert_close(fused.running_mean, stock.running_mean)
    fused.track_running_stats = stock.track_running_stats = False
    before = fused.running_mean.clone(), fused.num_batches_tracked.clone()
    torch.testing.assert_close(fused(x), torch.relu(stock(x)))
    assert torch.equal(fused.running_mean, before[0]) and torch.equal(fused.num_batches_tracked, before[1])
    fused.eval()
    stock.eval()
    torch.testing.assert_close(fused(x), torch.relu(stock(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_half_rows_of_every_tail_length(cpu_backend_built, dtype):
    """float16/bfloat16 contiguous rows of 1 to 40 elements (every remainder the 8-element steps, the
    16-element backward steps and the 32-element sum chunks leave; 7x7 and 14x14 maps end the same
    way) against the float32 kernels fed the same values. The statistics and per-channel gradients
    are float32 sums of the same terms in another order (1e-5), each output element is the float32
    result rounded once (one step apart at most, where the sums' order moves it over a rounding
    boundary), and the residual's gradient is exactly dy where the output is positive: an element
    of a row's tail dropped, counted twice or written from the wrong lane fails this."""
    ops = torch.ops.torchfast
    step = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    for s in range(1, 41):
        g = torch.Generator().manual_seed(s)
        shape = (3, 5, s)
        x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
        r = torch.randn(shape, generator=g).to(dtype)
        dy = torch.randn(shape, generator=g).to(dtype)
        w, b = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g) * 0.3
        half = ops.bn_relu_fwd(x, w, b, None, None, True, 1e-5)
        full = ops.bn_relu_fwd(x.float(), w, b, None, None, True, 1e-5)
        for a, e in zip(half[1:], full[1:]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg="statistics, S=%d" % s)
        torch.testing.assert_close(half[0].float(), full[0], rtol=step, atol=1e-5, msg="output, S=%d" % s)
        mean, invstd = half[1], half[2]
        gi, gw, gb = ops.bn_relu_bwd(dy, x, w, b, mean, invstd, True)
        fi, fw, fb = ops.bn_relu_bwd(dy.float(), x.float(), w, b, mean, invstd, True)
        torch.testing.assert_close(gw, fw, rtol=1e-5, atol=1e-5, msg="grad_weight, S=%d" % s)
        torch.testing.assert_close(gb, fb, rtol=1e-5, atol=1e-5, msg="grad_bias, S=%d" % s)
        torch.testing.assert_close(gi.float(), fi, rtol=step, atol=1e-4, msg="grad_input, S=%d" % s)
        out, mean, invstd, _ = ops.bn_add_relu_fwd(x, r, w, b, None, None, True, 1e-5)
        ref = ops.bn_add_relu_fwd(x.float(), r.float(), w, b, None, None, True, 1e-5)[0]
        torch.testing.assert_close(out.float(), ref, rtol=step, atol=1e-5, msg="add output, S=%d" % s)
        gi, gr, gw, gb = ops.bn_add_relu_bwd(dy, out, x, w, mean, invstd, True)
        assert torch.equal(gr, torch.where(out > 0, dy, torch.zeros((), dtype=dtype))), s
        fi, _, fw, fb = ops.bn_add_relu_bwd(dy.float(), out.float(), x.float(), w, mean, invstd, True)
        torch.testing.assert_close(gw, fw, rtol=1e-5, atol=1e-5, msg="add grad_weight, S=%d" % s)
        torch.testing.assert_close(gi.float(), fi, rtol=step, atol=1e-4, msg="add grad_input, S=%d" % s)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
def test_empty_batch_gradients_are_stock(device, backend):
    torchfast.set_backend(backend)
    m = BatchNormReLU2d(3).to(device)
    x = torch.randn(0, 3, 2, 2, device=device, requires_grad=True)
    m(x).sum().backward()
    assert torch.equal(m.weight.grad, torch.zeros(3, device=device))  # stock: zeros (was NaN)
    assert torch.equal(m.bias.grad, torch.zeros(3, device=device))


def test_conversion_keeps_objects_flags_and_hooks():
    """from_batchnorm / convert_batchnorm_relu share the Parameters and buffers, keep requires_grad,
    training mode and the hooks that see what they saw before (forward pre-hooks: the input): an
    optimizer built before the conversion keeps updating the layer. (A BatchNorm with hooks on its
    output is not converted: test_convert_leaves_batchnorms_with_output_hooks.)"""
    bn = nn.BatchNorm2d(4)
    calls = []
    bn.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    frozen = nn.BatchNorm2d(4).eval()
    frozen.requires_grad_(False)
    torchfast.nn.convert_batchnorm_relu(model)
    fused = model[1]
    assert isinstance(fused, BatchNormReLU2d)
    assert fused.weight is bn.weight and fused.bias is bn.bias and fused.running_mean is bn.running_mean
    before = bn.weight.detach().clone()
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    opt.step()
    assert not torch.equal(bn.weight, before), "the optimizer built before conversion must still update it"
    assert calls == [torch.Size([2, 4, 5, 5])]
    f2 = BatchNormReLU2d.from_batchnorm(frozen)
    assert not f2.weight.requires_grad and not f2.training


@pytest.mark.parametrize("fused_cls,add", [(BatchNormReLU2d, False), (torchfast.nn.BatchNormAddReLU2d, True)],
                         ids=["bn_relu", "bn_add_relu"])
def test_forward_ad_and_torch_func_follow_stock(fused_cls, add):
    """Forward-mode AD and torch.func transforms get stock's tangents, gradients and errors (the
    stock composition runs under them), never a silent zero tangent."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    fused, stock = fused_cls(3), nn.BatchNorm2d(3)
    x, t, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def run_fused(m, v):
        return m(v, r) if add else m(v)

    def run_stock(m, v):
        return F.relu(m(v) + r) if add else F.relu(m(v))

    for mode in (True, False):
        fused.train(mode)
        stock.train(mode)
        with fwAD.dual_level():
            tf = fwAD.unpack_dual(run_fused(fused, fwAD.make_dual(x, t))).tangent
            ts = fwAD.unpack_dual(run_stock(stock, fwAD.make_dual(x, t))).tangent
        torch.testing.assert_close(tf, ts)
        assert tf.abs().sum() > 0
        if not mode:  # in training both update the captured num_batches_tracked, which torch.func refuses
            _, tf = torch.func.jvp(lambda v: run_fused(fused, v), (x,), (t,))
            torch.testing.assert_close(tf, ts)
        gf = torch.func.grad(lambda p, b: torch.func.functional_call(fused, (p, b), (x, r) if add else (x,)).sum())(
            dict(fused.named_parameters()), dict(fused.named_buffers()))
        gs = torch.func.grad(lambda p, b: (torch.func.functional_call(stock, (p, b), (x,)) + (r if add else 0))
                             .relu().sum())(dict(stock.named_parameters()), dict(stock.named_buffers()))
        for k in gs:
            torch.testing.assert_close(gf[k], gs[k])
    fused.eval()
    stock.eval()
    torch.testing.assert_close(torch.func.vmap(lambda v: run_fused(fused, v.unsqueeze(0)))(x),
                               torch.func.vmap(lambda v: run_stock(stock, v.unsqueeze(0)))(x))
    with fwAD.dual_level():
        rm = fwAD.make_dual(torch.zeros(3), torch.ones(3))
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            torchfast.nn.functional.batch_norm_relu(fwAD.make_dual(x, t), rm, torch.ones(3), training=False)


@pytest.mark.parametrize("device,backend", backend_params("bn_relu"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_backward_mask_agrees_with_forward_output(device, backend, dtype):
    """The recomputed ReLU mask lets a gradient through exactly where the stored output is positive:
    pre-ReLU values in (0, half the smallest subnormal] round to an output of 0 in half precision and
    must get no gradient (stock: output > 0). Crafted boundary values, then a large random hunt."""
    skip_unsupported(backend, "bn_relu", device, dtype)
    torchfast.set_backend(backend)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # smallest subnormal
    c = 4
    w = torch.full((c,), 0.25, device=device)
    b = torch.zeros(c, device=device)
    rm = torch.zeros(c, device=device)
    rv = torch.ones(c, device=device)
    boundary = torch.tensor([1, 2, 3, 4, -1, 0, 5, 7], dtype=torch.float64) * tiny
    g = torch.Generator().manual_seed(0)
    hunt = torch.randn(64, c, 33, 31, generator=g, dtype=torch.float64) * tiny * 8
    for x0 in (boundary.repeat(2 * c).view(2, c, 8), hunt):
        x = x0.to(dtype).to(device).requires_grad_()
        out = batch_norm_relu(x, rm, rv, w, b, training=False, momentum=0.1, eps=0.0)
        out.backward(torch.ones_like(out))
        assert torch.equal(x.grad != 0, out.detach() != 0), "gradient reaches elements whose output is 0"
        assert (out.detach() == 0).any() and (out.detach() > 0).any()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_results_do_not_depend_on_thread_count(cpu_backend_built, layout):
    """The CPU reductions sum fixed blocks in a fixed order, whatever the number of threads: 1, 2 and 3
    threads give bitwise-equal statistics, outputs and gradients (channels_last with few rows and wide
    channels, where the work is split over channel tiles too; contiguous with whole channels and rows;
    (N, C) inputs of few rows, whose elementwise passes split rows finer), in every kernel dtype."""
    before = torch.get_num_threads()
    results = []
    shapes = [(8, 2056, 3, 3), (3, 40, 17, 19)] + ([(40, 2100), (24, 4096)] if layout == "contiguous" else [])
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = []
            for shape, dtype in itertools.product(shapes, (torch.float32, torch.float16, torch.bfloat16)):
                g = torch.Generator().manual_seed(5)
                x = (_make_input(shape, layout, torch.float32, "cpu", seed=6) * 3 + 1).to(dtype)
                r = _make_input(shape, layout, dtype, "cpu", seed=7)
                dy = _make_input(shape, layout, dtype, "cpu", seed=8)
                w, b = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
                y, m, i, v = torch.ops.torchfast.bn_relu_fwd(x, w, b, None, None, True, 1e-5)
                out += [y, m, i, v, *torch.ops.torchfast.bn_relu_bwd(dy, x, w, b, m, i, True)]
                y, m, i, v = torch.ops.torchfast.bn_add_relu_fwd(x, r, w, b, None, None, True, 1e-5)
                out += [y, m, i, v, *torch.ops.torchfast.bn_add_relu_bwd(dy, y, x, w, m, i, True)]
            results.append(out)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mixed_dtypes_follow_stock(op, training):
    """Every input/parameter/running-statistics dtype combination: where stock raises, the fused op raises
    the same error; where stock computes (float16/bfloat16 input with float32 parameters, or all alike),
    the fused op gives stock's dtypes, values and running statistics."""
    import itertools
    checked = 0
    for x_dt, w_dt, r_dt in itertools.product(_DTYPES, _DTYPES + [None], _DTYPES):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 5, 5, generator=g).to(x_dt)
        res = torch.randn(4, 3, 5, 5, generator=g).to(x_dt)
        w = (torch.rand(3, generator=g) + 0.5).to(w_dt) if w_dt else None
        b = torch.randn(3, generator=g).to(w_dt) if w_dt else None
        runs = [(torch.randn(3, generator=g).to(r_dt), (torch.rand(3, generator=g) + 0.5).to(r_dt)) for _ in (0, 1)]
        runs[1] = (runs[0][0].clone(), runs[0][1].clone())

        def stock(rm, rv):
            y = F.batch_norm(x, rm, rv, w, b, training)
            return torch.relu(y + res if op == "bn_add_relu" else y)

        def fused(rm, rv):
            if op == "bn_add_relu":
                return batch_norm_add_relu(x, res, rm, rv, w, b, training)
            return batch_norm_relu(x, rm, rv, w, b, training)
        try:
            expected, err = stock(*runs[0]), None
        except RuntimeError as e:
            expected, err = None, str(e)
        if err is not None:
            with pytest.raises(RuntimeError) as info:
                fused(*runs[1])
            assert str(info.value) == err, (x_dt, w_dt, r_dt)
        else:
            got = fused(*runs[1])
            assert got.dtype == expected.dtype, (x_dt, w_dt, r_dt)
            tol = 1e-2 if x_dt in (torch.float16, torch.bfloat16) else 1e-5
            torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)
            rtol = 2 ** -7 if r_dt in (torch.float16, torch.bfloat16) else 1e-5  # one step of the running dtype
            for a, s_ in zip(runs[1], runs[0]):
                assert a.dtype == s_.dtype
                torch.testing.assert_close(a.double(), s_.double(), rtol=rtol, atol=1e-5, msg=str((x_dt, w_dt, r_dt)))
        checked += err is None
    assert checked >= 8  # the accepted combinations were compared, not only the refusals


class _ScaledReLU(nn.ReLU):
    def forward(self, x):
        return 2 * super().forward(x)


def test_convert_leaves_relu_subclasses_and_hooked_relus():
    """convert_batchnorm_relu fuses exactly nn.ReLU: a subclass (which may compute something else) and a
    ReLU with hooks (which the Identity it becomes would never call) stay as they are, and the model
    computes what it did."""
    from torchfast.nn import convert_batchnorm_relu
    seen = []
    model = nn.Sequential(nn.BatchNorm2d(3), _ScaledReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU())
    model[3].register_forward_hook(lambda *a: seen.append(1))
    x = torch.randn(2, 3, 4, 4)
    want = copy.deepcopy(model)(x)
    convert_batchnorm_relu(model)
    assert type(model[1]) is _ScaledReLU and type(model[3]) is nn.ReLU and type(model[0]) is nn.BatchNorm2d
    assert isinstance(model[4], BatchNormReLU2d) and type(model[5]) is nn.Identity
    seen.clear()
    torch.testing.assert_close(model(x), want)
    assert seen == [1]


def _forward_hook(seen):
    return lambda m, args, out: seen.append(out.detach().clone())


_OUTPUT_HOOKS = {
    "forward hook": lambda bn, seen: bn.register_forward_hook(_forward_hook(seen)),
    "forward hook with kwargs": lambda bn, seen: bn.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(out.detach().clone()), with_kwargs=True),
    "full backward hook": lambda bn, seen: bn.register_full_backward_hook(
        lambda m, gin, gout: seen.append(gout[0].detach().clone())),
    "backward pre-hook": lambda bn, seen: bn.register_full_backward_pre_hook(
        lambda m, gout: seen.append(gout[0].detach().clone())),
}


@pytest.mark.parametrize("hook", list(_OUTPUT_HOOKS))
def test_convert_leaves_batchnorms_with_output_hooks(hook):
    """A hook that sees a BatchNorm's output or its gradient must see stock's, before the ReLU (a fused
    layer's output is after it: such a hook saw max(0, .) and a gradient masked by the ReLU), so
    convert_batchnorm_relu leaves that pair stock, as it leaves a hooked ReLU; the other pairs are still
    converted, and every hook sees what it sees in the stock model. from_batchnorm refuses such a
    BatchNorm, saying why and what to do."""
    from torchfast.nn import convert_batchnorm_relu
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),
                          nn.ReLU())
    stock = copy.deepcopy(model)
    seen, seen_stock = [], []
    _OUTPUT_HOOKS[hook](model[1], seen)
    _OUTPUT_HOOKS[hook](stock[1], seen_stock)
    convert_batchnorm_relu(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is nn.ReLU
    assert isinstance(model[4], BatchNormReLU2d) and type(model[5]) is nn.Identity
    x = torch.randn(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4)
    model(x).backward(g)
    stock(x).backward(g)
    assert len(seen) == len(seen_stock) == 1
    torch.testing.assert_close(seen[0], seen_stock[0])
    assert (seen[0] < 0).any()  # before the ReLU (the output) or before its mask (the gradient)
    with pytest.raises(ValueError, match="hook.*(remove|convert)"):
        BatchNormReLU2d.from_batchnorm(stock[1])


def test_conversion_carries_pre_and_state_dict_hooks():
    """Hooks that do not see the output are carried over: a forward pre-hook (it may replace the input,
    which the fused layer then normalises) and state_dict hooks."""
    from torchfast.nn import convert_batchnorm_relu
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    stock = copy.deepcopy(model)
    for m in (model, stock):
        m[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
        m[0]._register_state_dict_hook(lambda mod, sd, prefix, local: sd.__setitem__(prefix + "extra", torch.ones(1)))
    convert_batchnorm_relu(model)
    assert isinstance(model[0], BatchNormReLU2d)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), stock(x))
    assert "0.extra" in model.state_dict()


def test_convert_sync_batchnorm_keeps_the_relu():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm on a model with fused layers gives the fused sync
    layers (was: a plain SyncBatchNorm, the ReLU silently dropped), sharing the Parameters and buffers;
    converting twice keeps them; stock BatchNorms convert exactly as before. In one process the sync
    layers compute stock's relu(SyncBatchNorm(x)) (+ residual), running statistics included."""
    from torchfast.nn import BatchNormAddReLU2d, SyncBatchNormAddReLU, SyncBatchNormReLU

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.plain = BatchNormReLU2d(4), BatchNormAddReLU2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.plain(self.b(self.a(x), x))

    torch.manual_seed(0)
    model = Block()
    weight, running = model.a.weight, model.b.running_mean
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted.a) is SyncBatchNormReLU and type(converted.b) is SyncBatchNormAddReLU
    assert type(converted.plain) is nn.SyncBatchNorm
    assert converted.a.weight is weight and converted.b.running_mean is running
    again = torchfast.nn.convert_sync_batchnorm(converted)
    assert type(again.a) is SyncBatchNormReLU and type(again.b) is SyncBatchNormAddReLU
    stock = Block()
    stock.load_state_dict(model.state_dict())
    bn_a, bn_b = nn.SyncBatchNorm(4), nn.SyncBatchNorm(4)
    bn_a.load_state_dict(stock.a.state_dict())
    bn_b.load_state_dict(stock.b.state_dict())
    assert set(converted.a.state_dict()) == set(bn_a.state_dict())
    for training in (True, False):
        converted.train(training)
        bn_a.train(training)
        bn_b.train(training)
        x = torch.randn(3, 4, 5, 5)
        y = converted.b(converted.a(x), x)
        want = torch.relu(bn_b(torch.relu(bn_a(x))) + x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(converted.b.running_var, bn_b.running_var, rtol=1e-6, atol=1e-6)


def test_profiler_names_the_fused_ops(cpu_backend_built):
    """The profiler files the fused forward and backward under torchfast's op names (the Python
    autograd wrapper used to file the forward under GeneratedBackwardFor_torchfast_bn_relu_fwd_default)."""
    from torchfast.nn import BatchNormAddReLU2d
    layers = (BatchNormReLU2d(4), BatchNormAddReLU2d(4))
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torchfast.use_backend("cpu"):
            layers[0](x).sum().backward()
            layers[1](x, x).sum().backward()
    names = {e.name for e in prof.events()}
    for op in ("bn_relu_fwd", "bn_relu_bwd", "bn_add_relu_fwd", "bn_add_relu_bwd"):
        assert "torchfast::" + op in names, sorted(names)
    assert not any(n.startswith("GeneratedBackwardFor") for n in names), sorted(names)
    assert any("BnReluFunction" in n for n in names) and any("BnAddReluFunction" in n for n in names)
    # An eager layer call is one op (forward and running-statistics update): torchfast::bn_relu, and
    # torchfast::bn_add_relu, each with the update inside it.
    for op in ("bn_relu", "bn_add_relu"):
        calls = [e for e in prof.events() if e.name == "torchfast::" + op]
        assert len(calls) == 1, sorted(names)
        inner = {c.name for c in calls[0].cpu_children}
        assert {"torchfast::%s_fwd" % op, "torchfast::bn_update_running_stats_"} <= inner, inner


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_whole_op_is_the_forward_and_update(cpu_backend_built, dtype, momentum):
    """torchfast::bn_relu / bn_add_relu (the eager functional call in one op) against the two ops they
    stand for, bit for bit: the output, and the running statistics updated in training (in the parameters'
    dtype, float32 ones for a half-precision input included), untouched in eval and for an empty batch."""
    ops = torch.ops.torchfast
    for pdt in {dtype, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype}:
        for shape in [(5, 6, 3, 7), (0, 6, 3, 7), (9, 6)]:
            g = torch.Generator().manual_seed(sum(shape))
            x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
            r = torch.randn(shape, generator=g).to(dtype)
            w, b = (torch.rand(6, generator=g) + 0.5).to(pdt), torch.randn(6, generator=g).to(pdt)
            rm, rv = torch.randn(6, generator=g).to(pdt), (torch.rand(6, generator=g) + 0.5).to(pdt)
            for training in (True, False):
                for add in (False, True):
                    args = (x, r) if add else (x,)
                    whole_rs, two_rs = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
                    got = (ops.bn_add_relu if add else ops.bn_relu)(*args, w, b, *whole_rs, training, momentum, 1e-5)
                    y, mean, _, var = (ops.bn_add_relu_fwd if add else ops.bn_relu_fwd)(*args, w, b, *two_rs,
                                                                                       training, 1e-5)
                    count = x.numel() // 6
                    if training and count > 0:
                        ops.bn_update_running_stats_(*two_rs, mean, var, momentum, count)
                    key = (shape, pdt, training, add)
                    assert torch.equal(got, y), key
                    for a, b_ in zip(whole_rs, two_rs):
                        assert torch.equal(a, b_), key
                    if not training or count == 0:
                        assert torch.equal(whole_rs[0], rm) and torch.equal(whole_rs[1], rv), key
                    else:
                        assert not torch.equal(whole_rs[0], rm), key


def test_whole_op_refuses_what_stock_refuses(cpu_backend_built):
    """The whole-call ops are called with no Python checks first, so they must refuse by themselves
    what F.batch_norm refuses and what the forward ops would mis-serve: one value per channel in
    training, and a tensor on another device (the dispatcher would run that device's kernel: a meta
    weight gave meta outputs)."""
    ops = torch.ops.torchfast
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_relu(torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.bn_add_relu(torch.randn(1, 3, 1), torch.randn(1, 3, 1), None, None, None, None, True, 0.1, 1e-5)
    ops.bn_relu(torch.randn(1, 3), None, None, torch.zeros(3), torch.ones(3), False, 0.1, 1e-5)  # eval: fine
    meta = torch.ones(3, device="meta")
    for i in range(4):
        args = [None, None, None, None]
        args[i] = meta
        with pytest.raises(RuntimeError, match="is on meta but input is on cpu"):
            ops.bn_relu(x, *args, True, 0.1, 1e-5)
        with pytest.raises(RuntimeError, match="is on meta but input is on cpu"):
            ops.bn_add_relu(x, x, *args, True, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="residual is on meta but input is on cpu"):
        ops.bn_add_relu(x, torch.ones(2, 3, device="meta"), None, None, None, None, True, 0.1, 1e-5)


def test_eager_calls_check_in_python_only_when_the_op_refuses(cpu_backend_built, monkeypatch):
    """Eager calls on a compiled backend go straight to the whole-call op (the Python checks cost a
    small layer ~5 us a call); the Python checks run when the op refuses, and word the error as stock.
    Under a torch.func transform the checked path runs (it may hand the call to stock's composition)."""
    from torchfast.nn import functional as TF
    real, seen = TF._check_bn_args, []

    def spy(op, *args):
        seen.append(op)
        return real(op, *args)

    monkeypatch.setattr(TF, "_check_bn_args", spy)
    with torchfast.use_backend("cpu"):
        x = torch.randn(4, 3, 2, 2)
        BatchNormReLU2d(3)(x)
        batch_norm_add_relu(x, x, torch.zeros(3), torch.ones(3), training=True)
        assert seen == []
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as info:
            BatchNormReLU1d(3)(torch.randn(1, 3))
        assert info.value.__suppress_context__  # stock's error alone, not chained to the op's
        with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
            batch_norm_add_relu(torch.randn(2, 4), torch.randn(2, 4), torch.zeros(3), torch.ones(3), training=True)
        assert seen == ["batch_norm_relu", "batch_norm_add_relu"]
        with pytest.raises(TypeError, match="NoneType"):  # a scalar stock refuses: stock's composition raises
            batch_norm_relu(x, None, None, training=True, eps=None)
        assert len(seen) == 2

        def op_error():
            raise KeyError("the op's own")

        with pytest.raises(KeyError, match="the op's own"):  # arguments the checks pass: the op's error as it is
            TF._call_unchecked(op_error, ("batch_norm_relu", x, None, None, None, None, True))
        assert len(seen) == 3
        torch.func.grad(lambda t: batch_norm_relu(t, None, None, training=True).sum())(x)
        assert seen[-1] == "batch_norm_relu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_parameter_gradients_are_rounded_as_to(cpu_backend_built, dtype):
    """The layer's float16/bfloat16 weight and bias gradients (converted from the kernels' float32 sums
    without .to()) are the float32 gradients rounded to nearest, as .to() rounds them, bit for bit; float32
    parameters of a half-precision input get the float32 gradients themselves."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 40, 5, 5, generator=g) * 2).to(dtype)
    dy = torch.randn(6, 40, 5, 5, generator=g).to(dtype)
    for pdt in (dtype, torch.float32):
        w = (torch.rand(40, generator=g) * 3 + 0.5).to(pdt).requires_grad_()
        b = (torch.randn(40, generator=g) * 5).to(pdt).requires_grad_()
        with torchfast.use_backend("cpu"):
            batch_norm_relu(x, None, None, w, b, True).backward(dy)
        _, mean, invstd, _ = torch.ops.torchfast.bn_relu_fwd(x, w.detach(), b.detach(), None, None, True, 1e-5)
        _, gw, gb = torch.ops.torchfast.bn_relu_bwd(dy, x, w.detach(), b.detach(), mean, invstd, True)
        assert gw.dtype == torch.float32
        assert w.grad.dtype == pdt and b.grad.dtype == pdt
        assert torch.equal(w.grad, gw.to(pdt)) and torch.equal(b.grad, gb.to(pdt))
        if pdt != torch.float32:  # a test that could not fail if the sums came out representable
            assert not torch.equal(gw, gw.to(pdt).float())


# ------------------------------------------------------------------------------------------------
# TorchScript (torch.jit.script / trace / save / load)

def _randomized(layer, seed=3):
    """`layer` with weight, bias and running statistics away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(layer, name)
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name in ("weight", "running_var")
                        else torch.randn(t.shape, generator=g) * 0.3)
    return layer


def _same_state_and_grads(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, t), u in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(t, u), name


def _cpu_kernels_built():
    from torchfast import _backends
    return _backends.why_not("cpu", "bn_relu", "cpu", torch.float32) is None


_SCRIPT_CASES = [
    pytest.param(2, (4, 3, 5, 5), {}, torch.float32, id="2d"),
    pytest.param(2, (4, 3, 5, 5), {"momentum": None}, torch.float32, id="2d-cumulative-average"),
    pytest.param(2, (4, 3, 5, 5), {"track_running_stats": False}, torch.float32, id="2d-no-running-stats"),
    pytest.param(2, (4, 3, 5, 5), {}, torch.bfloat16, id="2d-bfloat16-input-float32-params"),
    pytest.param(1, (8, 3), {}, torch.float32, id="1d-NC"),
    pytest.param(1, (4, 3, 7), {"affine": False}, torch.float64, id="1d-NCL-no-affine-float64"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,shape,kw,dtype", _SCRIPT_CASES)
def test_jit_script_matches_eager(kind, shape, kw, dtype, training):
    """torch.jit.script of a fused layer (was: a TorchScript error; stock BatchNorm scripts) computes
    what the eager layer computes, bit for bit, through the same fused op: outputs, input and parameter
    gradients, running statistics and num_batches_tracked over several steps (momentum=None's cumulative
    average, track_running_stats=False, mixed precision). It updates the layer's own Parameters'
    gradients and buffers, and its state_dict keys are stock's."""
    torch.manual_seed(0)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32  # (float32 with a half input)
    layer = _randomized(FUSED[kind](shape[1], dtype=pdtype, **kw)).train(training)
    eager = copy.deepcopy(layer)
    scripted = script_module(layer)
    assert list(scripted.state_dict()) == list(STOCK[kind](shape[1], **kw).state_dict())
    if _cpu_kernels_built():
        assert "torchfast::bn_relu" in str(scripted.inlined_graph)  # the fused op, not stock's composition
    for _ in range(3):
        x = (torch.randn(shape) * 2 + 0.5).to(dtype)
        xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, ye = scripted(xs), eager(xe)
        assert torch.equal(ys, ye)
        g = torch.randn(shape, dtype=dtype)
        ys.backward(g)
        ye.backward(g)
        assert torch.equal(xs.grad, xe.grad)
    _same_state_and_grads(layer, eager)
    if training and layer.track_running_stats:
        assert int(layer.num_batches_tracked) == 3


def test_jit_script_save_load_round_trip(tmp_path):
    """A scripted fused layer saves and loads (torch.jit.save / load, torchfast imported) and the loaded
    module keeps computing what the eager layer computes in train and eval mode, with stock's keys."""
    layer = _randomized(BatchNormReLU2d(3))
    eager = copy.deepcopy(layer)
    path = str(tmp_path / "bn_relu.pt")
    loaded = jit_save_load(script_module(layer), path)
    assert list(loaded.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    for training in (True, False, True):
        loaded.train(training)
        eager.train(training)
        x = torch.randn(4, 3, 5, 5)
        assert torch.equal(loaded(x), eager(x))
    for name, t in eager.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_jit_script_of_a_model_holding_fused_layers():
    """Scripting a model that holds fused layers scripts them too; the eager model goes on computing
    as before: TorchScript's __prepare_scriptable__ protocol puts, in the eager model, the module
    prepared for scripting in the layer's place, which is the same layer (its Parameters, buffers,
    hooks and mode; a change to either is seen by both), and pickles and copies as the layer's class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _randomized(BatchNormReLU2d(4)), nn.Conv2d(4, 2, 1),
                          _randomized(BatchNormReLU2d(2), seed=4))
    layer = model[1]
    eager = copy.deepcopy(model)
    scripted = script_module(model)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(scripted(x), eager(x))
    assert torch.equal(model(x), eager(x))
    assert type(model[1]).__name__ == "BatchNormReLU2d" and isinstance(model[1], BatchNormReLU2d)
    assert model[1].weight is layer.weight and model[1].running_mean is layer.running_mean
    layer.eval()
    assert not model[1].training
    model.eval()
    assert not layer.training and torch.equal(model(x), eager.eval()(x))
    assert type(copy.deepcopy(model)[1]) is BatchNormReLU2d
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    assert type(reloaded[1]) is BatchNormReLU2d and torch.equal(reloaded(x), eager(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_matches_eager(training):
    """torch.jit.trace of a fused layer records the fused op and computes what the eager layer does."""
    layer = _randomized(BatchNormReLU2d(3)).train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(layer), torch.randn(4, 3, 5, 5))
    traced.load_state_dict(layer.state_dict())
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5)
        assert torch.equal(traced(x), layer(x))
    for name, t in layer.state_dict().items():
        assert torch.equal(traced.state_dict()[name], t), name


def test_jit_script_sync_layer():
    """A scripted SyncBatchNormReLU (stock SyncBatchNorm does not script at all) computes the eager
    layer's result where no synchronisation is involved (eval); in training, which TorchScript cannot
    synchronise (no torch.distributed in TorchScript), it refuses instead of computing local statistics."""
    from torchfast.nn import SyncBatchNormReLU
    layer = _randomized(SyncBatchNormReLU(3)).eval()
    scripted = script_module(layer)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(scripted(x), layer(x))
    scripted.train()
    with pytest.raises(torch.jit.Error, match="synchronise"):
        scripted(x)
