"""torchfast clipping on sharded gradients, in real processes: torch.distributed with gloo on 127.0.0.1,
2 and 3 ranks spawned per test, a free port each time, a deadline after which every rank is killed (a
rank that fails must not leave the others waiting), and the group torn down in every rank.

Each rank runs the cases below and writes "ok", "skip: <reason>" or its traceback to a file the test
reads back."""
import contextlib
import datetime
import math
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchfast

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, out_dir, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    status = "ok"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            getattr(sys.modules[__name__], case)(rank, world)
        finally:
            dist.destroy_process_group()
    except _Skip as e:
        status = "skip: %s" % e
    except BaseException:  # noqa: BLE001 - reported to the test, whatever it is
        status = traceback.format_exc()
    with open(os.path.join(out_dir, "rank%d" % rank), "w") as f:
        f.write(status)


class _Skip(Exception):
    pass


def _run(case, world, tmp_path, timeout=180, backend="gloo"):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, str(tmp_path), backend)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "%d of %d ranks still running after %d s: killed" % (len(hung), world, timeout)
    statuses = [(tmp_path / ("rank%d" % r)).read_text() for r in range(world)]
    if all(s.startswith("skip:") for s in statuses):
        pytest.skip(statuses[0][len("skip: "):])
    failed = ["rank %d:\n%s" % (r, s) for r, s in enumerate(statuses) if s != "ok"]
    assert not failed, "\n".join(failed)


def _full_list(dtype=torch.float32):
    """The same list on every rank (seeded): sizes with remainders, an empty tensor, one with fewer rows
    than ranks."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype) for s in ((37, 3), (5, 9), (0, 4), (1000, 2), (2, 6))]


# ------------------------------------------------------------------------------------------ rank code

def case_plain_shards(rank, world):
    """ZeRO-style: each rank holds a disjoint slice of every tensor; process_group= makes the norm (and
    so the clip coefficient) global, equal to the unsharded list's."""
    for p in (1.0, 2.0, 3.0, math.inf):
        # stock refuses the inf-norm of a list holding an empty tensor (no identity for the max); a
        # rank's shard may be empty either way, and counts as nothing
        full = [t for t in _full_list(torch.float64) if t.numel() or not math.isinf(p)]
        shards = [t.flatten().tensor_split(world)[rank].clone() for t in full]
        want = torch.nn.utils.get_total_norm(full, p)
        got = torchfast.get_total_norm(shards, p, process_group=dist.group.WORLD)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        params = [torch.nn.Parameter(torch.empty_like(s)) for s in shards]
        for q, s in zip(params, shards):
            q.grad = s.clone()
        ref = [torch.nn.Parameter(torch.empty_like(t)) for t in full]
        for q, t in zip(ref, full):
            q.grad = t.clone()
        max_norm = 0.5 * float(want)
        n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, p)
        n_got = torchfast.clip_grad_norm_(params, max_norm, p, process_group=dist.group.WORLD)
        torch.testing.assert_close(n_got, n_ref, rtol=1e-12, atol=0)
        for q, r in zip(params, ref):
            torch.testing.assert_close(q.grad, r.grad.flatten().tensor_split(world)[rank], rtol=1e-12, atol=1e-15)


def case_dtensor(rank, world):
    """DTensor gradients (Shard(0), including shards that are empty on some ranks, and Replicate), as
    FSDP2 and tensor parallelism produce: the norm and the clipped gradients equal torch.nn.utils', the
    norm is a DTensor as torch's is, and all Shard(0) tensors cost one all-reduce together."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))

    def params(p=2.0):
        # stock's inf-norm fails on a rank whose local shard is empty (no identity for the max): the
        # comparison leaves those out; torchfast's own result on them is checked below
        full = [t for t in _full_list() if not math.isinf(p) or t.shape[0] >= world]
        out = []
        for i, t in enumerate(full):
            placement = Replicate() if i == 1 else Shard(0)
            q = torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [placement]))
            q.grad = distribute_tensor(t.clone(), mesh, [placement])
            out.append(q)
        return out
    for p in (2.0, 1.0, math.inf):
        stock, fast = params(p), params(p)
        want = torch.nn.utils.get_total_norm([q.grad for q in stock], p)
        got = torchfast.get_total_norm([q.grad for q in fast], p)
        assert isinstance(got, DTensor) and isinstance(want, DTensor)
        torch.testing.assert_close(got.full_tensor(), want.full_tensor(), rtol=1e-6, atol=0)
        max_norm = 0.3 * float(want.full_tensor())
        n_want = torch.nn.utils.clip_grad_norm_(stock, max_norm, p)
        n_got = torchfast.clip_grad_norm_(fast, max_norm, p)
        assert isinstance(n_got, DTensor)
        torch.testing.assert_close(n_got.full_tensor(), n_want.full_tensor(), rtol=1e-6, atol=0)
        for a, b in zip(fast, stock):
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-6, atol=1e-7)
    # empty local shards (2 rows over 3 ranks) in the inf-norm too, against the unsharded list
    full = [t for t in _full_list() if t.numel()]
    grads = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full]
    torch.testing.assert_close(torchfast.get_total_norm(grads, math.inf).full_tensor(),
                               torch.nn.utils.get_total_norm(full, math.inf), rtol=0, atol=0)
    # one all-reduce for all the Shard(0) gradients (the Replicate one needs none)
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    dist.all_reduce = counting
    try:
        torchfast.get_total_norm([q.grad for q in params()], 2.0)
    finally:
        dist.all_reduce = real
    assert len(calls) == 1, calls


def case_fsdp2(rank, world):
    """A small model sharded with FSDP2 (fully_shard) on CPU/gloo: torchfast.clip_grad_norm_ against
    torch.nn.utils.clip_grad_norm_ on an identical sharded copy, same norm and clipped gradients."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise _Skip("FSDP2 (fully_shard) is not in this torch: %s" % e)
    from torch import nn

    def model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 5))
        for layer in (m[0], m[2]):
            fully_shard(layer)
        fully_shard(m)
        return m
    try:
        stock, fast = model(), model()
    except Exception as e:  # noqa: BLE001 - an FSDP2 build without CPU support
        raise _Skip("fully_shard on CPU/gloo failed in this torch: %s" % str(e).splitlines()[0][:200])
    torch.manual_seed(1 + rank)
    x = torch.randn(8, 16)
    for m in (stock, fast):
        m(x).square().sum().backward()
    n_want = torch.nn.utils.clip_grad_norm_(stock.parameters(), 0.1)
    n_got = torchfast.clip_grad_norm_(fast.parameters(), 0.1)
    torch.testing.assert_close(n_got.full_tensor(), n_want.full_tensor(), rtol=1e-6, atol=0)
    for a, b in zip(fast.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-6, atol=1e-7)


def _global_batch(world, dtype, channels_last, seed):
    """Per-rank batch sizes (unequal; with 3 ranks one is empty) and the global input, residual and
    output gradient, the same on every rank."""
    sizes = {2: [3, 5], 3: [2, 0, 4]}[world]
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 5, 6, 7, generator=g) * 2 + 0.5
    r = torch.randn(n, 5, 6, 7, generator=g)
    dy = torch.randn(n, 5, 6, 7, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, r, dy = (t.to(dtype).contiguous(memory_format=fmt) for t in (x, r, dy))
    return sizes, x, r, dy


def _rank_slice(t, sizes, rank):
    return t[sum(sizes[:rank]):sum(sizes[:rank + 1])]


@contextlib.contextmanager
def _counting_collectives():
    """The names of the torch.distributed collectives called inside, in order."""
    names = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter_tensor")
    real = {n: getattr(dist, n) for n in names}
    calls = []

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return call
    for n in names:
        setattr(dist, n, counting(n))
    try:
        yield calls
    finally:
        for n in names:
            setattr(dist, n, real[n])


def case_sync_batchnorm_relu(rank, world):
    """SyncBatchNormReLU / SyncBatchNormAddReLU over the group equal BatchNormReLU2d / BatchNormAddReLU2d
    in one process on the concatenated global batch: output, input and residual gradients (this rank's
    rows), the weight and bias gradients summed over the ranks (each rank's own, as stock's), and the
    running statistics (global count for the unbiased variance), with unequal and empty per-rank
    batches, both layouts, float32 and bfloat16, on the CPU kernels and on the tensor-op engine
    (reference backend). Eval needs no synchronisation and runs the fused op."""
    from torchfast.nn import SyncBatchNormReLU
    _check_sync_layers(rank, world, "cpu", [(torch.float32, False, None), (torch.float32, True, None),
                                            (torch.bfloat16, True, None), (torch.float32, False, "reference"),
                                            (torch.bfloat16, False, "reference")])
    # eval: no synchronisation, the fused op with the running statistics
    x = torch.randn(4, 3, 5, 5)
    stock, fused = nn.SyncBatchNorm(3).eval(), SyncBatchNormReLU(3).eval()
    torch.testing.assert_close(fused(x), torch.relu(stock(x)))


def case_sync_batchnorm_relu_cuda(rank, world):
    """case_sync_batchnorm_relu's checks on CUDA tensors, every rank on the first GPU, gloo carrying the
    collectives: stock's CUDA statistics and gradient-sum kernels around torchfast's fused passes, on
    both GPU backends. The single-process reference runs on the GPU too."""
    if not torch.cuda.is_available():
        raise _Skip("no CUDA device")
    device = "cuda:%d" % rank if dist.get_backend() == "nccl" else "cuda"
    _check_sync_layers(rank, world, device, [(torch.float32, False, None), (torch.bfloat16, True, None),
                                             (torch.float16, False, "triton"), (torch.float32, True, "triton")])


def _check_sync_layers(rank, world, device, cases):
    from torchfast.nn import BatchNormAddReLU2d, BatchNormReLU2d, SyncBatchNormAddReLU, SyncBatchNormReLU
    for k, (dtype, cl, backend) in enumerate(cases):
        for add in (False, True):
            sizes, x, r, dy = (t.to(device) if isinstance(t, torch.Tensor) else t
                               for t in _global_batch(world, dtype, cl, seed=10 * k + add))
            single = (BatchNormAddReLU2d if add else BatchNormReLU2d)(5, momentum=0.3).to(device)
            sync = (SyncBatchNormAddReLU if add else SyncBatchNormReLU)(5, momentum=0.3).to(device)
            with torch.no_grad():
                for m in (single, sync):
                    m.weight.copy_(torch.linspace(0.5, 1.5, 5))
                    m.bias.copy_(torch.linspace(-0.3, 0.3, 5))
            xs = x.clone().requires_grad_()
            rs = r.clone().requires_grad_()
            want = single(xs, rs) if add else single(xs)
            want.backward(dy)
            xl = _rank_slice(x, sizes, rank).clone().requires_grad_()
            rl = _rank_slice(r, sizes, rank).clone().requires_grad_()
            with torchfast.use_backend(backend), _counting_collectives() as calls:
                got = sync(xl, rl) if add else sync(xl)
                n_forward = len(calls)
                got.backward(_rank_slice(dy, sizes, rank))
            assert calls == ["all_reduce", "all_reduce"] and n_forward == 1, calls  # one each way
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
            what = "%s cl=%s backend=%s add=%s" % (dtype, cl, backend, add)
            torch.testing.assert_close(got, _rank_slice(want, sizes, rank), **tol, msg=lambda m: what + ": out " + m)
            torch.testing.assert_close(xl.grad, _rank_slice(xs.grad, sizes, rank), **tol,
                                       msg=lambda m: what + ": grad_input " + m)
            if add:
                torch.testing.assert_close(rl.grad, _rank_slice(rs.grad, sizes, rank), **tol,
                                           msg=lambda m: what + ": grad_residual " + m)
            if cl and xl.numel():
                assert xl.grad.is_contiguous(memory_format=torch.channels_last), what
            gw = sync.weight.grad.clone()
            gb = sync.bias.grad.clone()
            dist.all_reduce(gw)
            dist.all_reduce(gb)
            torch.testing.assert_close(gw, single.weight.grad, rtol=1e-4, atol=1e-3 if dtype == torch.bfloat16 else 1e-5,
                                       msg=lambda m: what + ": grad_weight " + m)
            torch.testing.assert_close(gb, single.bias.grad, rtol=1e-4, atol=1e-3 if dtype == torch.bfloat16 else 1e-5,
                                       msg=lambda m: what + ": grad_bias " + m)
            torch.testing.assert_close(sync.running_mean, single.running_mean, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: what + ": running_mean " + m)
            torch.testing.assert_close(sync.running_var, single.running_var, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: what + ": running_var " + m)
            assert int(sync.num_batches_tracked) == 1


def case_sync_batchnorm_relu_variants(rank, world):
    """The module options and input ranks stock SyncBatchNorm takes, against one process on the whole
    batch: (N, C) and (N, C, L) and (N, C, D, H, W) inputs, float64, affine=False,
    track_running_stats=False, momentum=None (cumulative average over two steps), eval after training."""
    from torchfast.nn import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, SyncBatchNormReLU
    sizes = {2: [3, 4], 3: [2, 0, 5]}[world]
    n = sum(sizes)
    cases = [((n, 6), BatchNormReLU1d, {}, torch.float32), ((n, 6, 5), BatchNormReLU1d, {}, torch.float64),
             ((n, 6, 3, 4, 2), BatchNormReLU3d, {}, torch.float32),
             ((n, 6, 4, 5), BatchNormReLU2d, dict(affine=False), torch.float32),
             ((n, 6, 4, 5), BatchNormReLU2d, dict(track_running_stats=False), torch.float32),
             ((n, 6, 4, 5), BatchNormReLU2d, dict(momentum=None), torch.float64)]
    for k, (shape, single_cls, kw, dtype) in enumerate(cases):
        single = single_cls(6, **kw).to(dtype)
        sync = SyncBatchNormReLU(6, **kw).to(dtype)
        for step in range(2):
            g = torch.Generator().manual_seed(100 * k + step)
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
            dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            xs = x.clone().requires_grad_()
            want = single(xs)
            want.backward(dy)
            xl = _rank_slice(x, sizes, rank).clone().requires_grad_()
            got = sync(xl)
            got.backward(_rank_slice(dy, sizes, rank))
            what = "%s %s %s step %d" % (shape, kw, dtype, step)
            torch.testing.assert_close(got, _rank_slice(want, sizes, rank), msg=lambda m: what + ": out " + m)
            torch.testing.assert_close(xl.grad, _rank_slice(xs.grad, sizes, rank),
                                       msg=lambda m: what + ": grad " + m)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                a, b = getattr(sync, name), getattr(single, name)
                assert (a is None) == (b is None), (what, name)
                if a is not None:
                    torch.testing.assert_close(a, b, msg=lambda m: what + ": " + name + " " + m)
            if sync.weight is not None:
                gw = sync.weight.grad.clone()
                dist.all_reduce(gw)
                torch.testing.assert_close(gw, single.weight.grad, msg=lambda m: what + ": grad_weight " + m)
                sync.weight.grad = single.weight.grad = None
                sync.bias.grad = single.bias.grad = None
        if sync.track_running_stats:  # eval: the running statistics, no synchronisation
            sync.eval()
            single.eval()
            x = torch.randn(shape, dtype=dtype)
            torch.testing.assert_close(sync(x), single(x))


class _Net(nn.Module):
    """A small residual CNN with the fused layers: conv, BatchNorm+ReLU, conv, BatchNorm+add+ReLU."""

    def __init__(self):
        super().__init__()
        from torchfast.nn import BatchNormAddReLU2d, BatchNormReLU2d
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormReLU2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = BatchNormAddReLU2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.conv2(y), y)
        return self.head(y.mean((2, 3)))


def case_ddp_training(rank, world):
    """The fused CNN converted with torchfast.nn.convert_sync_batchnorm and trained under DDP (4 images
    per rank, 3 SGD steps) ends with the same weights and running statistics as the unconverted model
    trained in one process on the concatenated batches: synchronised statistics and gradients are the
    global batch's."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torchfast.nn import SyncBatchNormAddReLU, SyncBatchNormReLU, convert_sync_batchnorm
    torch.manual_seed(0)
    single = _Net()
    dist_model = _Net()
    dist_model.load_state_dict(single.state_dict())
    dist_model = convert_sync_batchnorm(dist_model)
    assert isinstance(dist_model.bn1, SyncBatchNormReLU) and isinstance(dist_model.bn2, SyncBatchNormAddReLU)
    ddp = DDP(dist_model)
    with pytest.raises(ValueError, match="only work with GPU modules"):  # stock's layer still needs a GPU
        DDP(nn.Sequential(nn.Conv2d(3, 3, 1), nn.SyncBatchNorm(3)))
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    opt_dist = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4 * world, 3, 9, 9, generator=g)
        target = torch.randn(4 * world, 4, generator=g)
        for model, opt, xs, ts in ((single, opt_single, x, target),
                                   (ddp, opt_dist, x[4 * rank:4 * rank + 4], target[4 * rank:4 * rank + 4])):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ts).backward()
            opt.step()
    got, want = dist_model.state_dict(), single.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: k + ": " + m)


# ------------------------------------------------------------------------------------------- tests

def test_sync_batchnorm_relu_cuda(tmp_path):
    """The synchronised layers on CUDA tensors (2 ranks sharing the first GPU, gloo)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _run("case_sync_batchnorm_relu_cuda", 2, tmp_path)


def test_sync_batchnorm_relu_nccl(tmp_path):
    """The synchronised layers over NCCL, one GPU per rank (2 ranks)."""
    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("NCCL needs two GPUs (found %d) and a torch built with NCCL" % torch.cuda.device_count())
    _run("case_sync_batchnorm_relu_cuda", 2, tmp_path, backend="nccl")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["case_plain_shards", "case_dtensor", "case_fsdp2", "case_sync_batchnorm_relu",
                                  "case_sync_batchnorm_relu_variants", "case_ddp_training"])
def test_sharded_clipping_matches_unsharded(case, world, tmp_path):
    _run(case, world, tmp_path)


def test_process_group_needs_plain_tensors_and_positive_norms():
    with pytest.raises(ValueError, match="norm types > 0"):
        torchfast.get_total_norm([torch.ones(3)], 0.0, process_group=object())
    with pytest.raises(ValueError, match="at least one tensor"):
        torchfast.get_total_norm([], 2.0, process_group=object())
