"""torchfast clipping on sharded gradients, in real processes: torch.distributed with gloo on 127.0.0.1,
2 and 3 ranks spawned per test, a free port each time, a deadline after which every rank is killed (a
rank that fails must not leave the others waiting), and the group torn down in every rank.

Each rank runs the cases below and writes "ok", "skip: <reason>" or its traceback to a file the test
reads back."""
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

import torchfast

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, case, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    status = "ok"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
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


def _run(case, world, tmp_path, timeout=180):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, str(tmp_path))) for r in range(world)]
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


def case_sync_batchnorm_relu(rank, world):
    """In a group of several processes a SyncBatchNormReLU training call synchronises as stock's
    SyncBatchNorm does: stock supports GPU inputs only, so CPU inputs raise stock's error, in the fused
    sync layers and in a fused model alike (the single-process fallbacks are tested elsewhere); eval
    needs no synchronisation and runs the fused op."""
    from torch import nn
    from torchfast.nn import SyncBatchNormReLU
    x = torch.randn(4, 3, 5, 5)
    stock, fused = nn.SyncBatchNorm(3), SyncBatchNormReLU(3)
    for layer in (stock, fused):
        try:
            layer(x)
        except ValueError as e:
            msg = str(e)
        else:
            msg = None
        if layer is stock:
            want = msg
    assert want is not None and msg == want, (want, msg)
    fused.eval()
    torch.testing.assert_close(fused(x), torch.relu(stock.eval()(x)))


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", ["case_plain_shards", "case_dtensor", "case_fsdp2", "case_sync_batchnorm_relu"])
def test_sharded_clipping_matches_unsharded(case, world, tmp_path):
    _run(case, world, tmp_path)


def test_process_group_needs_plain_tensors_and_positive_norms():
    with pytest.raises(ValueError, match="norm types > 0"):
        torchfast.get_total_norm([torch.ones(3)], 0.0, process_group=object())
    with pytest.raises(ValueError, match="at least one tensor"):
        torchfast.get_total_norm([], 2.0, process_group=object())
