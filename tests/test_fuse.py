"""torchfast.nn.fuse on hand-written patterns and on real torchvision / timm architectures (random
weights, nothing downloaded): every eligible BatchNorm -> ReLU and BatchNorm -> add -> ReLU fused,
the same training trajectory as stock, and the model still the user's model."""
import copy
import io
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import torchfast
from torchfast.nn import fuse
from torchfast.nn import modules as fused_modules

from conftest import assert_close_to_oracle, jit_save_load, script_module

torchvision = pytest.importorskip("torchvision", reason="torchvision is a test extra (pip install .[test])")
timm = pytest.importorskip("timm", reason="timm is a test extra (pip install .[test])")


# ------------------------------------------------------------------------------------------------
# An independent count of the eligible patterns, from the stock model's own fx graph.

class _Leaves(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)


def _count_eligible(model):
    """(pairs, triples): BatchNorms whose output goes only to a ReLU, and only to an add whose
    output goes only to a ReLU (nn.Identity calls looked through; a BatchNorm on the other side
    of an add already claimed counts once)."""
    graph = _Leaves().trace(model)
    mods = dict(model.named_modules())

    def through_identity(node):
        while len(node.users) == 1:
            (u,) = node.users
            if u.op == "call_module" and type(mods[u.target]) is nn.Identity:
                node = u
            else:
                return u, node
        return None, node

    def is_relu(n):
        return ((n.op == "call_module" and type(mods[n.target]) is nn.ReLU)
                or (n.op == "call_function" and n.target in (F.relu, torch.relu, torch.relu_))
                or (n.op == "call_method" and n.target in ("relu", "relu_")))

    pairs, triples, claimed = 0, 0, set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        m = mods[node.target]
        act = getattr(m, "act", None)
        if isinstance(act, nn.ReLU):
            pairs += 1
            continue
        user, _ = through_identity(node)
        if user is None:
            continue
        if is_relu(user):
            pairs += 1
        elif user.op == "call_function" and user.target in (operator.add, operator.iadd, torch.add) \
                and user not in claimed:
            nxt, _ = through_identity(user)
            if nxt is not None and is_relu(nxt):
                claimed.add(user)
                triples += 1
    return pairs, triples


def _build(name):
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():  # dropout would make the runs draw different masks
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "densenet121",
          "timm:resnet50", "timm:resnet18d", "timm:regnety_002"]


@pytest.mark.parametrize("name", MODELS)
def test_fuses_every_eligible_pattern(name):
    model = _build(name)
    pairs, triples = _count_eligible(model)
    assert pairs > 0
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    fused, report = fuse(model, return_report=True)
    assert fused is model
    assert (len(report.pairs), len(report.triples)) == (pairs, triples), str(report)
    code = model.forward.src
    assert code.count("_modules_bn_relu_module(") == pairs and code.count("_modules_bn_add_relu_module(") == triples
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.pairs) + len(report.triples) + len(report.left) == n_bn
    # Same state, same objects.
    assert list(model.state_dict()) == list(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_resnet50_counts_and_summary():
    model, report = fuse(torchvision.models.resnet50(), return_report=True)
    assert (len(report.pairs), len(report.triples)) == (33, 16)
    assert sorted(n for n, _ in report.left) == ["layer%d.0.downsample.1" % i for i in range(1, 5)]
    assert all("residual side" in why for _, why in report.left)
    assert "33 BatchNorm->ReLU and 16 BatchNorm->add->ReLU fused" in str(report)


def _step(model, x, y, lr=0.01):
    """One SGD step; returns (output, loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return out.detach(), loss.detach(), grads


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(layout, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g).to(dtype)
    y = torch.randint(0, 1000, (4,), generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _models(name, layout):
    fused = fuse(_build(name))
    stock = _build(name)
    if layout == "channels_last":
        for m in (stock, fused):
            m.to(memory_format=torch.channels_last)
    return fused, stock


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_matches_stock_float64(name, layout):
    """Float64, where rounding almost never flips a ReLU mask: three SGD steps of the fused model, stock
    taking each step from the same state. Outputs, losses, every gradient, the running statistics
    after each step, then the eval outputs, all to float64 rounding amplified by one step."""
    if layout == "channels_last" and name not in ("resnet50", "timm:regnety_002"):
        pytest.skip("channels_last is covered on two architectures (time)")
    fused, stock = (m.double() for m in _models(name, layout))
    x, y = _inputs(layout, torch.float64)
    close = dict(rtol=1e-7, atol=1e-10)
    for step in range(3):
        stock.load_state_dict(fused.state_dict())
        rf, rs = _step(fused, x, y), _step(stock, x, y)
        torch.testing.assert_close(rf[0], rs[0], **close, msg="step %d output" % step)
        torch.testing.assert_close(rf[1], rs[1], **close, msg="step %d loss" % step)
        # Gradients relative to the largest one (a conv bias before a BatchNorm has a gradient of exactly 0
        # in exact arithmetic: rounding noise on both sides).
        g = max(t.abs().max().item() for t in rs[2].values())
        for k in rs[2]:
            torch.testing.assert_close(rf[2][k], rs[2][k], rtol=1e-6, atol=1e-9 * g, msg="step %d grad %s" % (step, k))
        for (k, a), b in zip(fused.named_buffers(), stock.buffers()):
            torch.testing.assert_close(a, b, **close, msg="step %d %s" % (step, k))
    stock.load_state_dict(fused.state_dict())
    fused.eval()
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x), **close)


def _global_rel(tensors, refs):
    num = sum(((t.double() - r) ** 2).sum() for t, r in zip(tensors, refs))
    den = sum((r ** 2).sum() for r in refs)
    return (num / den).sqrt().item()


def test_training_float32_within_stock_error():
    """Float32 on every architecture: three SGD steps of the fused model; at each, stock float32 and
    float64 take the same step from the fused model's state. For the outputs, the loss, all the
    gradients together and all the running statistics together, the fused model's relative error
    against float64 is compared with stock float32's: the ratio's geometric mean and median over all
    (architecture, step, quantity) must be at most 1.5.

    Why statistics and not 2x per tensor: a random-init network on a small batch is ill-conditioned.
    An element within rounding of zero flips a ReLU mask in one run and not in another, and that
    moves the gradients by far more than rounding: single ratios from 1/7 to 2000 between two
    float32 runs (each BatchNorm layer of VGG, fed the float64 run's own inputs and gradients, is
    as accurate as stock's: 5.5e-8 against 5.6e-8 relative for the first one; the whole network's
    first-layer gradient then differs by 2000x in one step). A systematic loss of accuracy moves the
    geometric mean and the median; the exact check of every formula is the float64 test above."""
    ratios = []
    for name in MODELS:
        fused, stock = _models(name, "contiguous")
        stock64 = copy.deepcopy(stock).double()
        x, y = _inputs("contiguous")
        for step in range(3):
            state = fused.state_dict()
            stock.load_state_dict(state)
            stock64.load_state_dict(state)
            rf, r32, r64 = _step(fused, x, y), _step(stock, x, y), _step(stock64, x.double(), y)
            bufs = [[b for b in m.buffers() if b.is_floating_point()] for m in (fused, stock, stock64)]
            for what, f, s32, ref in (("output", [rf[0]], [r32[0]], [r64[0]]),
                                      ("loss", [rf[1]], [r32[1]], [r64[1]]),
                                      ("gradients", list(rf[2].values()), list(r32[2].values()), list(r64[2].values())),
                                      ("running statistics", bufs[0], bufs[1], bufs[2])):
                floor = 1e-7  # below float32 rounding: both exact
                ratio = max(_global_rel(f, ref), floor) / max(_global_rel(s32, ref), floor)
                ratios.append((ratio, name, step, what))
    logs = torch.tensor([r[0] for r in ratios]).log()
    worst = max(ratios)
    summary = "geometric mean %.2f, median %.2f, worst %.2f (%s step %d %s)" % (
        logs.mean().exp().item(), logs.median().exp().item(), *worst)
    print(summary)
    assert logs.mean().exp().item() <= 1.5 and logs.median().exp().item() <= 1.5, summary


# ------------------------------------------------------------------------------------------------
# The fused model is still the user's model.

def test_checkpoints_objects_and_module_operations(tmp_path):
    stock = torchvision.models.resnet18()
    stock_sd = copy.deepcopy(stock.state_dict())
    model = torchvision.models.resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # built before fuse: must keep working
    fuse(model)
    model.load_state_dict(stock_sd, strict=True)
    back = torchvision.models.resnet18()
    back.load_state_dict(model.state_dict(), strict=True)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)  # classes and hierarchy kept
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d
    x = torch.randn(2, 3, 32, 32)
    before = model.conv1.weight.detach().clone()
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    assert not torch.equal(model.conv1.weight, before)
    # train/eval, deepcopy, torch.save of the whole module, .to(dtype), channels_last; from the
    # untrained state (running statistics from one small batch make eval ill-conditioned)
    model.load_state_dict(stock_sd)
    model.eval()
    ref = back.eval()
    ref.load_state_dict(stock_sd)

    def close(a, b):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        want = ref(x)
        close(model(x), want)
        close(copy.deepcopy(model)(x), want)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        close(loaded(x), want)
        assert isinstance(loaded.forward, torchfast.nn.FusedForward)
        m64 = copy.deepcopy(model).to(torch.float64)
        close(m64(x.double()), ref.double()(x.double()))
        ref.float()
        mcl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        close(mcl(xcl), want)
    # The module's own forward is untouched: symbolic_trace / feature extraction see the stock graph.
    from torchvision.models.feature_extraction import create_feature_extractor
    feats = create_feature_extractor(model, return_nodes=["layer2"])
    with torch.no_grad():
        assert feats(x)["layer2"].shape == (2, 128, 4, 4)


def _stock_pair(model):
    """Stock resnet18 in float32 and float64 with `model`'s state."""
    stock = torchvision.models.resnet18()
    stock.load_state_dict(model.state_dict())
    return stock, copy.deepcopy(stock).double()


def test_sync_batchnorm_models_fuse():
    """A model converted with torch.nn.SyncBatchNorm.convert_sync_batchnorm, then fused: every pattern is
    fused on the SyncBatchNorm modules themselves; in one process (no synchronisation) the result is
    stock's, and a call that synchronises runs stock's SyncBatchNorm (tests/test_distributed.py)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18())
    stock = copy.deepcopy(model)
    model, report = fuse(model, return_report=True)
    assert len(report.pairs) == 9 and len(report.triples) == 8
    assert all(type(m) is nn.SyncBatchNorm for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = torch.randn(2, 3, 64, 64)
    for training in (True, False):
        model.train(training)
        stock.train(training)
        torch.testing.assert_close(model(x), stock(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.layer1[0].bn2.running_var, stock.layer1[0].bn2.running_var)


def test_torch_compile_fullgraph_forward_backward():
    """The compiled fused model (one graph: no break allowed) computes what the eager fused model does,
    forward and backward, and its output and statistics are stock's to stock's own float32 error.
    Gradients are compared with the eager fused model, not with stock: in float32 a pre-activation
    within rounding of 0 can take the other side of the ReLU in either model (a BatchNorm + residual
    that cancels), and one such element moves a layer's weight gradient by its dy, far more than
    rounding; how close the fused gradients stay to stock's over training is
    test_training_float32_within_stock_error's (median and geometric mean over every layer)."""
    model = fuse(torchvision.models.resnet18())
    eager = copy.deepcopy(model)
    stock, stock64 = _stock_pair(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break allowed
    x = torch.randn(4, 3, 64, 64)
    out, out_eager, want, want64 = compiled(x), eager(x), stock(x), stock64(x.double())
    assert_close_to_oracle(out.detach(), want.detach(), want64.detach(), "output")
    torch.testing.assert_close(out, out_eager)
    for o in (out, out_eager, want64):
        o.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert model.conv1.weight.grad.abs().max() > 0
    assert_close_to_oracle(model.bn1.running_mean, stock.bn1.running_mean, stock64.bn1.running_mean, "stats")
    # and the gradient is the float64 model's, except where a mask flips (within 5 % here)
    rel = (model.conv1.weight.grad.double() - stock64.conv1.weight.grad).norm() / stock64.conv1.weight.grad.norm()
    assert rel < 0.05, rel.item()


def test_torch_export_and_signature():
    """torch.export of a fused model (it read the forward's __code__, which the callable object had
    not): the exported graph calls the fused ops and computes what the eager fused model does; the
    forward's signature is the model's own (it was (*args, **kwargs))."""
    import inspect
    model = fuse(torchvision.models.resnet18()).eval()
    assert str(inspect.signature(model.forward)) == str(inspect.signature(torchvision.models.resnet18().forward))
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    assert "torchfast.bn_relu" in str(ep.graph) and "torchfast.bn_add_relu" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), model(x))


def test_ddp_wraps_fused_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method="file://%s" % (tmp_path / "pg"), rank=0, world_size=1)
    try:
        model = fuse(torchvision.models.resnet18())
        stock, stock64 = _stock_pair(model)
        ddp = DDP(model)
        x = torch.randn(4, 3, 64, 64)
        out = ddp(x)
        assert_close_to_oracle(out.detach(), stock(x).detach(), stock64(x.double()).detach(), "output")
        out.sum().backward()
        assert model.fc.weight.grad is not None
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Hand-written patterns: every ReLU and add spelling, and what must be left alone.

class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(11))
        self.relu = nn.ReLU(inplace=True)  # one instance, several call sites

    def forward(self, x):
        b = self.bns
        x = self.relu(b[0](x))
        x = F.relu(b[1](x))
        x = torch.relu(b[2](x))
        x = torch.relu_(b[3](x))
        x = b[4](x).relu()
        x = b[5](x).relu_()
        x = F.relu(b[6](x), inplace=True)
        x = self.relu(b[7](x) + x)        # +
        y = b[8](x)
        y += x                            # +=
        x = self.relu(y)
        x = torch.relu(torch.add(x, b[9](x)))  # torch.add, residual on the left
        x = F.relu(x + b[10](x))          # residual on the left
        return x


def test_every_relu_and_add_spelling():
    model = Spellings()
    stock = copy.deepcopy(model)
    model, report = fuse(model, return_report=True)
    assert len(report.pairs) == 7 and len(report.triples) == 4 and not report.left, str(report)
    x = torch.randn(3, 4, 5, 5)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = stock(xs), model(xf)
    torch.testing.assert_close(yf, ys, rtol=1e-4, atol=1e-5)
    ys.sum().backward()
    yf.sum().backward()
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-3, atol=1e-4)
    for a, b in zip(model.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
    for a, b in zip(model.buffers(), stock.buffers()):
        torch.testing.assert_close(a, b)


class MyBN(nn.BatchNorm2d):
    pass


class LeftAlone(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_twice = nn.BatchNorm2d(4)
        self.bn_relu6 = nn.BatchNorm2d(4)
        self.bn_silu = nn.BatchNorm2d(4)
        self.bn_sub = MyBN(4)
        self.bn_hooked = nn.BatchNorm2d(4)
        self.bn_iadd = nn.BatchNorm2d(4)
        self.bn_alpha = nn.BatchNorm2d(4)
        self.bn_hooked.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        t = self.bn_twice(x)
        x = F.relu(t) + t
        x = F.relu6(self.bn_relu6(x))
        x = F.silu(self.bn_silu(x))
        x = F.relu(self.bn_sub(x))
        x = F.relu(self.bn_hooked(x))
        r = x * 1.0
        r.add_(self.bn_iadd(x))           # in-place into the residual
        x = F.relu(r)
        x = F.relu(torch.add(self.bn_alpha(x), x, alpha=2.0))
        return x


def test_leaves_alone_what_it_cannot_prove_and_says_why():
    model = LeftAlone()
    model, report = fuse(model, return_report=True)
    why = dict(report.left)
    assert not report.pairs and not report.triples
    assert "used by 2 nodes" in why["bn_twice"]
    assert "relu6" in why["bn_relu6"] and "silu" in why["bn_silu"]
    assert "MyBN" in why["bn_sub"] and "hooks" in why["bn_hooked"]
    assert "residual" in why["bn_iadd"] and "alpha" in why["bn_alpha"]


class Later(nn.Module):
    """A BatchNorm -> ReLU module pair at the top and one inside an inlined Sequential."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()
        self.blk = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Identity())

    def forward(self, x):
        return self.blk(self.act(self.bn(self.conv(x))))


_LATER_CHANGES = {
    "hook on a fused BatchNorm": lambda m, seen: m.bn.register_forward_hook(lambda *a: seen.append("bn")),
    "hook on a fused ReLU": lambda m, seen: m.blk[2].register_forward_hook(lambda *a: seen.append("relu")),
    "pre-hook on an inlined block": lambda m, seen: m.blk.register_forward_pre_hook(lambda *a: seen.append("blk")),
    "hook on a dropped Identity": lambda m, seen: m.blk[3].register_forward_hook(lambda *a: seen.append("id")),
    "ReLU replaced": lambda m, seen: setattr(m, "act", nn.GELU()),
    "BatchNorm replaced": lambda m, seen: setattr(m, "bn", nn.GroupNorm(1, 3)),
    "Identity replaced": lambda m, seen: m.blk.__setitem__(3, nn.Tanh()),
    "block replaced": lambda m, seen: setattr(m, "blk", nn.Sequential(nn.Tanh())),
}


@pytest.mark.parametrize("change", list(_LATER_CHANGES))
def test_changes_after_fuse_are_followed(change):
    """The fused forward stands for the submodules it inlined and the calls it removed as they were at
    fuse time; a module replaced or given hooks afterwards (a feature-extraction hook on a block, a
    swapped activation) is followed, not skipped: the output is stock's, every hook runs, a warning
    says so once; a deepcopy follows it too, and fusing again takes the new structure (no warning)."""
    stock, seen_stock = Later(), []
    fused, seen_fused = fuse(copy.deepcopy(stock)), []
    x = torch.randn(2, 3, 4, 4)
    _LATER_CHANGES[change](stock, seen_stock)
    _LATER_CHANGES[change](fused, seen_fused)
    with pytest.warns(UserWarning, match="changed since it was fused") as record:
        out = fused(x)
        fused(x)
    assert len([w for w in record if "changed since" in str(w.message)]) == 1
    torch.testing.assert_close(out, stock(x))
    stock(x)
    assert seen_fused == seen_stock
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(copy.deepcopy(fused)(x), stock(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fuse(fused)(x), stock(x))


def _noop_hook(*args):
    return None


def test_unchanged_fused_model_calls_the_fused_ops(monkeypatch):
    """Without changes every call runs the fused code, after a deepcopy and a save/load too; a ReLU
    module with a hook at fuse time is left alone (its hook must run) and said so."""
    model = Later()
    model.act.register_forward_hook(_noop_hook)  # (a module-level function: the model is pickled)
    model, report = fuse(model, return_report=True)
    assert report.pairs == ["blk.1"] and "ReLU" in dict(report.left)["bn"]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    calls = []
    real = fused_modules.batch_norm_relu
    monkeypatch.setattr(fused_modules, "batch_norm_relu", lambda *a: calls.append(1) or real(*a))
    for m in (model, copy.deepcopy(model), torch.load(buf, weights_only=False)):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m(torch.randn(2, 3, 4, 4))
        assert len(calls) == 1


class TrainBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.inner(x)
        if self.training:
            x = x * 2
        return F.relu(self.bn(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this forward
            return self.block(x)
        return -self.block(x)


def test_mode_dependent_and_untraceable_forwards_fall_back_to_children():
    for cls in (TrainBranch, Untraceable):
        model = cls()
        stock = copy.deepcopy(model)
        model, report = fuse(model, return_report=True)
        assert len(report.pairs) == 1 and report.untraced and report.untraced[0][0] == "", str(report)
        x = torch.randn(2, 3, 4, 4)
        for mode in (True, False):
            model.train(mode)
            stock.train(mode)
            torch.testing.assert_close(model(x), stock(x))


def test_timm_batchnormact():
    from timm.layers import BatchNormAct2d

    relu = nn.Sequential(BatchNormAct2d(4, act_layer=nn.ReLU))
    silu = nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU))
    x = torch.randn(2, 4, 3, 3)
    for model, n in ((relu, 1), (silu, 0)):
        stock = copy.deepcopy(model)
        model, report = fuse(model, return_report=True)
        assert len(report.pairs) == n
        torch.testing.assert_close(model(x), stock(x))
    assert "SiLU" in dict(report.left)["0"]
    with pytest.raises(ValueError, match="SiLU"):
        torchfast.nn.BatchNormReLU2d.from_batchnorm(BatchNormAct2d(4, act_layer=nn.SiLU))


def test_fused_layers_trace_with_fx():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), torchfast.nn.BatchNormReLU2d(4))
    gm = fx.symbolic_trace(model)
    assert any(n.op == "call_module" and n.target == "1" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 4, 4)
    model.eval()
    gm.eval()
    torch.testing.assert_close(gm(x), model(x))
    assert fused_modules.BatchNormAddReLU2d(4)  # module form importable


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "googlenet", "shufflenet_v2_x0_5",
                                  "regnet_y_400mf", "convnext_tiny", "timm:dla34", "timm:cspresnet50"])
def test_other_architectures_keep_their_outputs(name):
    """Architectures with other activations (refused), forwards that branch on self.training or do
    not trace (their children are fused instead), channel splits and concatenations: whatever fuse
    does or refuses, train and eval outputs stay stock's."""
    torch.manual_seed(0)
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False)
    else:
        model = getattr(torchvision.models, name)(**({"aux_logits": False, "init_weights": True}
                                                      if name == "googlenet" else {}))
    stock = copy.deepcopy(model)
    model, report = fuse(model, return_report=True)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(report.pairs) + len(report.triples) + len(report.left) == n_bn
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        model.train(mode)
        stock.train(mode)
        torch.manual_seed(1)
        got = model(x)
        torch.manual_seed(1)
        want = stock(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ------------------------------------------------------------------------------------------------
# TorchScript

class ResBlocks(nn.Module):
    """conv-bn-relu, a residual block (bn-add-relu), a BatchNorm1d -> ReLU head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None)
        self.fc, self.bn3 = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(y)) + x)
        return torch.relu(self.bn3(self.fc(x.mean((2, 3)))))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_script_of_a_fused_model(training, tmp_path):
    """torch.jit.script of a fused model (was: an error, its forward being a FusedForward instance)
    scripts the fused graph: the fused ops, not stock's composition, computing what the eager fused model
    computes, bit for bit (outputs, gradients, running statistics, over steps), on the model's own
    Parameters and buffers, with its state_dict keys. The eager model is left as it was (same forward,
    same submodules), and the scripted model saves and loads."""
    torch.manual_seed(0)
    model, report = fuse(ResBlocks(), return_report=True)
    assert len(report.pairs) == 3 and report.triples == ["bn2"]
    model.train(training)
    eager = copy.deepcopy(model)
    children = dict(model.named_modules())
    scripted = script_module(model)
    assert isinstance(model.forward, torchfast.nn.FusedForward)
    assert dict(model.named_modules()) == children
    assert list(scripted.state_dict()) == list(model.state_dict())
    graph = str(scripted.inlined_graph)
    assert graph.count("torchfast::bn_relu(") == 3 and graph.count("torchfast::bn_add_relu(") == 1
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, ye = scripted(xs), eager(xe)
        assert torch.equal(ys, ye)
        ys.sum().backward()
        ye.sum().backward()
        assert torch.equal(xs.grad, xe.grad)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, t), u in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(t, u), name
    path = str(tmp_path / "fused.pt")
    loaded = jit_save_load(scripted, path)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(loaded(x), eager(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(eager).eval(), x)
    torch.testing.assert_close(traced(x), eager.eval()(x))


def test_jit_script_of_fused_resnet18():
    """A fused torchvision resnet18 scripts with every fused call in the scripted graph, and computes what
    the eager fused model computes, bit for bit, through train and eval steps (gradients, running
    statistics)."""
    model = fuse(_build("resnet18"))
    eager = copy.deepcopy(model)
    scripted = script_module(model)
    graph = str(scripted.inlined_graph)
    assert graph.count("torchfast::bn_relu(") == 9 and graph.count("torchfast::bn_add_relu(") == 8
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False, True):
        scripted.train(training)
        eager.train(training)
        ys, ye = scripted(x), eager(x)
        assert torch.equal(ys, ye)
        ys.sum().backward()
        ye.sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, t), u in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(t, u), name


def _python_only(x):
    try:  # no TorchScript
        return x * 13
    finally:
        pass


torch.fx.wrap("_python_only")


class ScriptsOnlyItsOwnForward(nn.Module):
    """The fused graph (the eager branch, traced) calls a Python-only function; the scripted branch
    of the class's forward does not."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if torch.jit.is_scripting():
            return F.relu(self.bn(x)) * 13
        return _python_only(F.relu(self.bn(x)))


def test_jit_script_falls_back_to_the_class_forward():
    """A fused graph TorchScript cannot compile is scripted as the class's own forward (stock), with a
    warning that says so; a fused model changed since fuse (its eager calls run the class's forward) is
    scripted as the class's own forward too."""
    model = fuse(ScriptsOnlyItsOwnForward())
    assert isinstance(model.forward, torchfast.nn.FusedForward)
    with pytest.warns(UserWarning, match="scripting its own forward"):
        scripted = script_module(model)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(scripted(x), F.relu(copy.deepcopy(model.bn)(x)) * 13)
    later = fuse(Later())
    later.act = nn.ReLU()  # replaced since fuse: eager runs Later.forward
    scripted = script_module(later)
    assert "torchfast::bn_relu" not in str(scripted.inlined_graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(scripted(x), later(x))


_HOOKS = {
    "forward pre-hook": lambda bn: bn.register_forward_pre_hook(lambda m, args: None),
    "forward hook": lambda bn: bn.register_forward_hook(lambda m, args, out: None),
    "full backward hook": lambda bn: bn.register_full_backward_hook(lambda m, gin, gout: None),
    "backward pre-hook": lambda bn: bn.register_full_backward_pre_hook(lambda m, gout: None),
}


@pytest.mark.parametrize("hook", list(_HOOKS))
def test_hooked_batchnorms_in_fuse_and_convert(hook):
    """The two passes agree on what a hook allows: neither fuses a BatchNorm whose hook sees its output or
    output gradient (fused, that would be after the ReLU); a forward pre-hook (the input only) is kept
    by convert_batchnorm_relu, whose fused layer is still called as a module, and makes fuse leave the
    BatchNorm (its fused call is no module call, so the hook would not run)."""
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    _HOOKS[hook](seq[1])
    converted = torchfast.nn.convert_batchnorm_relu(copy.deepcopy(seq))
    assert isinstance(converted[1], torchfast.nn.BatchNormReLU2d) == (hook == "forward pre-hook")
    _, report = fuse(copy.deepcopy(seq), return_report=True)
    assert not report.pairs and "hooks" in dict(report.left)["1"]
