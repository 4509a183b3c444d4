"""Fused BatchNorm + residual add + ReLU against stock relu(batch_norm(x) + r) and the reference, on
every backend."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfast
from torchfast.nn import BatchNormAddReLU1d, BatchNormAddReLU2d, BatchNormAddReLU3d
from torchfast.nn.functional import batch_norm_add_relu

from conftest import (FLOAT_DTYPES, assert_close_to_oracle, backend_params, jit_save_load, script_module,
                      skip_unsupported)

STOCK = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUSED = {1: BatchNormAddReLU1d, 2: BatchNormAddReLU2d, 3: BatchNormAddReLU3d}

# (kind, shape, input layout, residual layout)
CASES = [
    (1, (7, 3), "contiguous", "contiguous"),
    (1, (5, 4, 9), "contiguous", "contiguous"),
    (2, (3, 5, 7, 9), "contiguous", "contiguous"),
    (2, (3, 5, 7, 9), "channels_last", "channels_last"),
    (2, (3, 5, 7, 9), "contiguous", "channels_last"),
    (2, (3, 8, 7, 7), "channels_last", "contiguous"),
    (2, (1, 3, 1, 2), "channels_last", "channels_last"),
    (2, (2, 16, 1, 1), "contiguous", "contiguous"),
    (3, (2, 3, 4, 5, 3), "channels_last", "channels_last"),
]


def _make(shape, layout, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _modules(kind, c, dtype, device):
    """Stock BN in float64 (oracle) and in dtype, and the fused module, with the same state."""
    g = torch.Generator().manual_seed(1)
    stock64 = STOCK[kind](c, dtype=torch.float64)
    with torch.no_grad():
        stock64.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        stock64.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
        stock64.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
        stock64.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    stock_lowp = copy.deepcopy(stock64).to(pdtype)
    fused = FUSED[kind](c, dtype=pdtype)
    fused.load_state_dict(stock_lowp.state_dict())
    return stock64.to(device), stock_lowp.to(device), fused.to(device)


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
@pytest.mark.parametrize("kind,shape,layout,rlayout", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_stock(device, backend, kind, shape, layout, rlayout, dtype, training):
    skip_unsupported(backend, "bn_add_relu", device, dtype)
    if training and torch.Size(shape).numel() // shape[1] == 1:
        pytest.skip("one value per channel is an error in training")
    stock64, stock_lowp, fused = _modules(kind, shape[1], dtype, device)
    for m in (stock64, stock_lowp, fused):
        m.train(training)
    x, r = _make(shape, layout, dtype, device, 0), _make(shape, rlayout, dtype, device, 5)
    x64, r64 = x.double().clone().requires_grad_(), r.double().clone().requires_grad_()
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    xf, rf = x.clone().requires_grad_(), r.clone().requires_grad_()
    y64 = F.relu(stock64(x64) + r64)
    yl = F.relu(stock_lowp(xl) + rl)
    torchfast.set_backend(backend)
    yf = fused(xf, rf)
    assert yf.dtype == x.dtype and yf.shape == x.shape and yf.stride() == x.stride()
    assert_close_to_oracle(yf.detach(), yl.detach(), y64.detach(), "output")

    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    (y64 * gy).sum().backward()
    (yl * gy.to(dtype)).sum().backward()
    (yf * gy.to(dtype)).sum().backward()
    # The residual's gradient is grad_out where the output is positive: exact, by construction.
    assert torch.equal(rf.grad, torch.where(yf.detach() > 0, gy.to(dtype), torch.zeros((), dtype=dtype,
                                                                                       device=device)))
    assert_close_to_oracle(xf.grad, xl.grad, x64.grad, "grad_input")
    per_channel = x[:, 0].numel()
    assert_close_to_oracle(fused.weight.grad, stock_lowp.weight.grad, stock64.weight.grad, "grad_weight",
                           atol_ulps=16 * per_channel)
    assert_close_to_oracle(fused.bias.grad, stock_lowp.bias.grad, stock64.bias.grad, "grad_bias",
                           atol_ulps=16 * per_channel)
    assert_close_to_oracle(fused.running_mean, stock_lowp.running_mean, stock64.running_mean, "running_mean")
    assert_close_to_oracle(fused.running_var, stock_lowp.running_var, stock64.running_var, "running_var")
    assert fused.num_batches_tracked.item() == stock64.num_batches_tracked.item()


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
@pytest.mark.parametrize("shape,layout", [((64, 40, 9, 11), "contiguous"), ((64, 40, 9, 11), "channels_last"),
                                          ((3, 70, 33, 35), "contiguous"), ((2, 130, 17, 19), "channels_last")],
                         ids=lambda v: str(v).replace(" ", ""))
def test_larger_shapes(device, backend, shape, layout):
    """Past the small cases: whole-channel and multi-split reductions, vector tails, streaming stores."""
    torchfast.set_backend(backend)
    x, r = _make(shape, layout, torch.float32, device, 0), _make(shape, layout, torch.float32, device, 1)
    gen = torch.Generator().manual_seed(2)
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(device)
    b = torch.randn(shape[1], generator=gen).to(device)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    x64, r64 = x.double().clone().requires_grad_(), r.double().clone().requires_grad_()
    y = batch_norm_add_relu(xs, rs, None, None, w, b, training=True)
    pre64 = F.batch_norm(x64, None, None, w.double(), b.double(), training=True) + r64
    yl = F.relu(F.batch_norm(x.clone(), None, None, w, b, training=True) + r)
    assert_close_to_oracle(y.detach(), yl, F.relu(pre64).detach(), "output")
    g = torch.randn(y.shape, generator=gen).to(device)
    y.backward(g)
    mask = y.detach() > 0
    assert torch.equal(rs.grad, torch.where(mask, g, torch.zeros_like(g)))
    # The float64 oracle through the output's own mask: an element whose pre-activation rounds to 0 in
    # float32 but not in float64 flips the mask, and with it its channel's sums (a whole channel off).
    (pre64 * mask).backward(g.double())
    torch.testing.assert_close(xs.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(device, backend, training, layout):
    skip_unsupported(backend, "bn_add_relu", device, torch.float64)
    x = _make((3, 4, 3, 5), layout, torch.float64, device, 0).requires_grad_()
    r = _make((3, 4, 3, 5), "contiguous", torch.float64, device, 1).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    b = (torch.randn(4, dtype=torch.float64, device=device) * 0.2).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=device) * 0.1
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    torchfast.set_backend(backend)

    def f(x, r, w, b):
        return batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradgradcheck(f, (x, r, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)  # double backward


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
def test_saves_output_input_and_channel_stats(device, backend):
    torchfast.set_backend(backend)
    x = _make((4, 8, 6, 6), "contiguous", torch.float32, device, 0).requires_grad_()
    r = _make((4, 8, 6, 6), "contiguous", torch.float32, device, 1).requires_grad_()
    layer = BatchNormAddReLU2d(8).to(device)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, r)
    full = sorted(t.data_ptr() for t in saved if t.numel() == x.numel())
    assert full == sorted([x.data_ptr(), y.data_ptr()]), "only the input and the output may be saved full-size"
    assert all(t.numel() <= 8 for t in saved if t.numel() != x.numel())
    y.sum().backward()


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
def test_empty_batch(device, backend):
    torchfast.set_backend(backend)
    layer = BatchNormAddReLU2d(3).to(device)
    before = layer.running_mean.clone()
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    r = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = layer(x, r)
    assert out.shape == (0, 3, 4, 4)
    assert torch.equal(layer.running_mean, before)
    out.sum().backward()
    # Stock gives zero parameter gradients for an empty batch, not NaN.
    assert torch.equal(layer.weight.grad, torch.zeros(3, device=device))
    assert torch.equal(layer.bias.grad, torch.zeros(3, device=device))


@pytest.mark.parametrize("device,backend", backend_params("bn_add_relu"))
def test_errors_and_stock_fallback(device, backend):
    torchfast.set_backend(backend)
    layer = BatchNormAddReLU2d(3).to(device)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        layer(torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 4, 3, 3, device=device))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        batch_norm_add_relu(torch.randn(2, 3, device=device), torch.randn(2, 3, device=device), None, None)
    # A residual that broadcasts or promotes: stock's composition, stock's result and errors.
    x = torch.randn(2, 3, 4, 4, device=device)
    for r in (torch.randn(1, 3, 1, 1, device=device), torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64),
              1.5):
        stock = nn.BatchNorm2d(3).to(device)
        want = F.relu(stock(x) + r)
        got = layer.to(device).train()(x, r) if isinstance(r, float) else BatchNormAddReLU2d(3).to(device)(x, r)
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError):
        BatchNormAddReLU2d(3).to(device)(x, torch.randn(2, 3, 5, 4, device=device))


def test_opcheck_compiled_and_reference():
    x = torch.randn(3, 4, 5, 2, requires_grad=True)
    r = torch.randn(3, 4, 5, 2, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    ops = [(torch.ops.torchfast.bn_add_relu_fwd_reference, torch.ops.torchfast.bn_add_relu_bwd_reference)]
    if torchfast._backends.why_not("cpu", "bn_add_relu", "cpu", torch.float32) is None:
        ops.append((torch.ops.torchfast.bn_add_relu_fwd, torch.ops.torchfast.bn_add_relu_bwd))
    for fwd, bwd in ops:
        for training in (True, False):
            for inp, res in ((x, r), (xcl, r), (xcl, r.detach().contiguous(memory_format=torch.channels_last))):
                torch.library.opcheck(fwd, (inp, res, w, b, rm, rv, training, 1e-5))
            torch.library.opcheck(fwd, (x.detach().double(), r.detach().double(), None, None, rm.double(),
                                        rv.double(), training, 1e-3))
            out, mean, invstd, _ = fwd(x.detach(), r.detach(), w, b, rm, rv, training, 1e-5)
            torch.library.opcheck(bwd, (torch.randn_like(out), out.detach(), x.detach(), w.detach(), mean, invstd,
                                        training))


def test_module_state_dict_and_from_batchnorm():
    stock = nn.BatchNorm2d(5)
    with torch.no_grad():
        stock.weight.uniform_()
        stock.running_var.uniform_(0.5, 2)
    fused = BatchNormAddReLU2d.from_batchnorm(stock)
    assert fused.weight is stock.weight and fused.running_var is stock.running_var
    assert list(fused.state_dict()) == list(stock.state_dict())
    other = BatchNormAddReLU2d(5)
    other.load_state_dict(stock.state_dict(), strict=True)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(other.state_dict(), strict=True)
    x, r = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(fused(x, r), F.relu(copy.deepcopy(stock)(x) + r))


def test_torch_compile_module():
    """The fused add layer traces into a torch.compile graph with no break (fake kernels + autograd)."""
    layer, stock = BatchNormAddReLU2d(4), nn.BatchNorm2d(4)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    xc, rc, xs, rs = (t.clone().requires_grad_() for t in (x, r, x, r))
    yc = compiled(xc, rc)
    ys = F.relu(stock(xs) + rs)
    torch.testing.assert_close(yc, ys, rtol=1e-5, atol=1e-5)
    yc.sum().backward()
    ys.sum().backward()
    torch.testing.assert_close(xc.grad, xs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rc.grad, rs.grad)
    torch.testing.assert_close(layer.running_var, stock.running_var)


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.float64], ids=["fused", "promoting-residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_script_matches_eager(training, residual_dtype):
    """torch.jit.script of BatchNormAddReLU2d (was: a TorchScript error) computes what the eager layer
    computes, bit for bit: the fused op for a residual it takes, stock's composition for one it does not
    (another dtype, which promotes), as eager; gradients of input, residual and parameters, running
    statistics; the layer's own Parameters and buffers, stock's state_dict keys."""
    torch.manual_seed(0)
    layer = BatchNormAddReLU2d(3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_(0, 0.3)
        layer.running_mean.normal_(0, 0.3)
        layer.running_var.uniform_(0.5, 1.5)
    layer.train(training)
    eager = copy.deepcopy(layer)
    scripted = script_module(layer)
    assert list(scripted.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    from torchfast import _backends
    if _backends.why_not("cpu", "bn_add_relu", "cpu", torch.float32) is None:
        assert "torchfast::bn_add_relu" in str(scripted.inlined_graph)
    for _ in range(3):
        x, r, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5, dtype=residual_dtype), torch.randn(4, 3, 5, 5)
        xs, rs, xe, re = (t.clone().requires_grad_() for t in (x, r, x, r))
        ys, ye = scripted(xs, rs), eager(xe, re)
        assert ys.dtype == ye.dtype and torch.equal(ys, ye)
        ys.backward(g.to(ys.dtype))
        ye.backward(g.to(ye.dtype))
        assert torch.equal(xs.grad, xe.grad) and torch.equal(rs.grad, re.grad)
    for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, t), u in zip(layer.named_buffers(), eager.buffers()):
        assert torch.equal(t, u), name


def test_jit_script_save_load_round_trip(tmp_path):
    layer = BatchNormAddReLU2d(3)
    eager = copy.deepcopy(layer)
    path = str(tmp_path / "bn_add_relu.pt")
    loaded = jit_save_load(script_module(layer), path)
    for training in (True, False):
        loaded.train(training)
        eager.train(training)
        x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        assert torch.equal(loaded(x, r), eager(x, r))
    for name, t in eager.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
